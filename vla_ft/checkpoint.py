"""Checkpoints: atomic directories, keep-last-K rotation, a ``latest`` pointer, safe loading.

A run directory's checkpoints::

    checkpoints/
      latest                    text file: name of the newest complete checkpoint
      step_000200/
        model.safetensors       every weight of the VLA (tied tensors stored once)
        adapter/                LoRA adapters in PEFT's format (only with model.lora)
        optimizer.pt            optimizer state (torch.save of tensors; loaded weights_only)
        loss_state.safetensors  loss-weighting state (uncertainty log-vars, DWA averages)
        rng.pt                  torch CPU/CUDA RNG states (loaded weights_only)
        trainer_state.json      step, data position, best metric, skip counters, scaler,
                                python/numpy RNG states, world size
        norm_stats.json         normalisation statistics (the policy inverts with these)
        config.yaml             the resolved recipe
        tokenizer/              the tokenizer (save_pretrained)
        COMPLETE                written last: a directory without it is never loaded

Writes go to ``.tmp_step_N`` first; ``COMPLETE`` is written and fsync'ed last, then the
directory is renamed into place, so a crash (even SIGKILL) mid-save leaves the previous
checkpoint as the newest complete one. Nothing is ever unpickled: weights come from
safetensors and the rest from ``torch.load(weights_only=True)`` or JSON.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

COMPLETE = "COMPLETE"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def write_checkpoint(root: Path, step: int, write_files: Callable[[Path], None], estimate_bytes: int = 0) -> Path:
    """Atomically create ``root/step_<N>`` by calling ``write_files(tmp_dir)``.

    On any failure the temporary directory is removed and the previous checkpoints stay as
    they were; a full disk is reported with the space the checkpoint needed.
    """
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / step_dir_name(step), root / f".tmp_{step_dir_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_files(tmp)
        (tmp / COMPLETE).write_text(str(step))
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
    except OSError as err:
        written = _tree_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if err.errno == errno.ENOSPC:
            need = max(estimate_bytes, written)
            free = shutil.disk_usage(root).free
            raise CheckpointError(
                f"disk full while saving checkpoint step {step} to {root}: it needs about {need / 2**20:.1f} MiB, "
                f"{free / 2**20:.1f} MiB free; earlier checkpoints are intact"
            ) from err
        raise
    (root / "latest.tmp").write_text(final.name)
    os.replace(root / "latest.tmp", root / "latest")
    return final


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint: the ``latest`` pointer if it is complete, else a scan."""
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        ckpts = complete_checkpoints(root)
        if is_complete(candidate) and (not ckpts or ckpts[-1] == candidate):
            return candidate
    ckpts = complete_checkpoints(root)
    return ckpts[-1] if ckpts else None


def rotate(root: Path, keep_last: int, protect: set[Path]) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last``, never one in ``protect``
    (the best, the one resumed from). Leftover ``.tmp_*`` directories are removed too."""
    for tmp in root.glob(".tmp_step_*"):
        shutil.rmtree(tmp, ignore_errors=True)
    if keep_last <= 0:
        return []
    ckpts = complete_checkpoints(root)
    protected = {p.resolve() for p in protect if p is not None}
    doomed = [p for p in ckpts[:-keep_last] if p.resolve() not in protected]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def save_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True))


def load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file missing: {path}") from None


def torch_load(path: Path):
    """Load tensors/containers saved with torch.save; refuses arbitrary pickled objects."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file missing: {path}")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
