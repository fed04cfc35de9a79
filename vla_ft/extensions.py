"""Optional run features that attach to the one loop through :class:`vla_ft.run_setup.Run` hooks.

Each installer looks at the recipe and the runtime and either does nothing or sets hooks
(``run.hooks``) / wraps ``run.wrapped``. Keeping them here keeps the loop itself short.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vla_ft import compilation, distributed, feature_cache, flops

if TYPE_CHECKING:
    from vla_ft.run_setup import Run

INSTALLERS: list = []
INSTALLERS.append(feature_cache.install)  # train.cache_features: cached-trunk loaders for head-only runs
INSTALLERS.append(compilation.install)  # train.compile: torch.compile of the trunk (training forwards)
INSTALLERS.append(distributed.install)  # under torchrun: DDP or FSDP2 wrapping and the cross-rank hooks
INSTALLERS.append(flops.install_meter)  # perf/tflops and perf/mfu from the model FLOPs of each training forward


def install(run: Run) -> None:
    for installer in INSTALLERS:
        installer(run)
