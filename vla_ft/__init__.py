"""vla-ft: fine-tune vision-language-action robot policies from a YAML recipe."""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["ChunkRunner", "VLAPolicy", "__version__"]


def __getattr__(name: str):
    # Lazy: `import vla_ft` stays cheap for the CLI and for robot_data users.
    if name == "VLAPolicy":
        from vla_ft.policy import VLAPolicy

        return VLAPolicy
    if name == "ChunkRunner":
        from vla_ft.execution import ChunkRunner

        return ChunkRunner
    raise AttributeError(f"module 'vla_ft' has no attribute {name!r}")
