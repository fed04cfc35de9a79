"""Checkpoints: atomic directories, keep-last-K rotation, ``latest``/``best`` pointers, safe loading.

A run directory's checkpoints::

    checkpoints/
      latest                    text file: name of the newest complete checkpoint
      best                      text file: name of the checkpoint with the best validation metric
      step_000200/
        model.safetensors       every weight of the VLA (tied tensors stored once)
        model_meta.json         dims, cameras, image size, chunk, history, the training data's
                                fps, gripper convention, prompt template, the model recipe
                                section (for inference)
        language_model/         config.json of the LM: inference rebuilds it from this, offline
        adapter/                LM LoRA adapters in PEFT's format (only with model.lora.enabled)
        vision_adapter/         vision LoRA adapters in PEFT's format (only with model.lora.vision)
        optimizer.pt            optimizer state (torch.save of tensors; loaded weights_only)
        ema.safetensors         fp32 average of the trained weights (only with train.ema_decay);
                                inference loads it over model.safetensors
        model_dcp/              FSDP only, instead of the two above: sharded weights and optimizer
                                state (torch.distributed.checkpoint), readable by any world size
        loss_state.safetensors  loss-weighting state (uncertainty log-vars, DWA averages)
        rng.pt                  torch CPU/CUDA RNG states of rank 0, and of every rank under
                                "ranks" when several processes wrote it (loaded weights_only)
        trainer_state.json      step, data position, best metric, skip counters, scaler,
                                python/numpy RNG states, world size, frozen modules, and each
                                rank's train-log window (sums since the last logged row)
        norm_stats.json         normalisation statistics (the policy inverts with these)
        config.yaml             the resolved recipe
        tokenizer/              the tokenizer (save_pretrained)
        COMPLETE                written last: a directory without it is never loaded

Writes go to ``.tmp_step_N`` first; every file is fsync'ed, then ``COMPLETE`` is written and
fsync'ed last, then the directory is renamed into place, so a crash (even SIGKILL) mid-save
leaves the previous checkpoint as the newest complete one. Nothing is ever unpickled:
weights come from safetensors and the rest from ``torch.load(weights_only=True)`` or JSON.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

COMPLETE = "COMPLETE"
# Errors that mean "the disk is full" however the writing library reports them: torch.save
# raises a RuntimeError without errno, safetensors a SafetensorError quoting "os error 28".
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_FULL_TEXT = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122")
STEP_DIR = re.compile(r"step_(\d+)")  # a checkpoint directory's name; anything else (step_000200.bak) is not one


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message says why and what to do."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def step_of(path: Path) -> int:
    """The step of a ``step_<N>`` checkpoint directory."""
    match = STEP_DIR.fullmatch(path.name)
    if match is None:
        raise CheckpointError(f"{path}: not a step_<N> checkpoint directory")
    return int(match[1])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _is_disk_full(err: BaseException, root: Path, need: int) -> bool:
    """Whether ``err`` (or an error it chains to) says the disk is full, or the disk is simply
    too full for ``need`` bytes (libraries that report a failed write without a reason)."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        if any(t in str(seen).lower() for t in DISK_FULL_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(root).free < need
    except OSError:
        return False


def write_pointer(root: Path, name: str, target: str) -> None:
    """Atomically point ``root/name`` (e.g. ``latest``) at checkpoint directory ``target``."""
    tmp = root / f".{name}.tmp"
    tmp.write_text(target)
    os.replace(tmp, root / name)


def read_pointer(root: Path, name: str) -> Path | None:
    """The complete checkpoint ``root/name`` points at, or None."""
    pointer = root / name
    if not pointer.is_file():
        return None
    candidate = root / pointer.read_text().strip()
    return candidate if is_complete(candidate) else None


def write_checkpoint(root: Path, step: int, write_files: Callable[[Path], None], estimate_bytes: int = 0) -> Path:
    """Atomically create ``root/step_<N>`` by calling ``write_files(tmp_dir)``; returns its path.

    On any failure (even KeyboardInterrupt) the temporary directory is removed and the earlier
    checkpoints stay as they were; a full disk is reported as a :class:`CheckpointError` giving
    the space the checkpoint needed (``estimate_bytes`` or what was written, whichever is larger).
    """

    def disk_full(err: BaseException, tmp: Path) -> None:  # asked before the cleanup frees space
        need = max(estimate_bytes, _tree_bytes(tmp))
        if isinstance(err, Exception) and _is_disk_full(err, root, need):
            free = shutil.disk_usage(root).free
            raise CheckpointError(
                f"disk full while saving checkpoint step {step} to {root}: it needs about {need / 2**20:.1f} MiB "
                f"and {free / 2**20:.1f} MiB are free; the earlier checkpoints are intact ({err})"
            ) from err

    final = write_dir_atomically(root / step_dir_name(step), write_files, (COMPLETE, str(step)), disk_full)
    write_pointer(root, "latest", final.name)
    return final


def write_dir_atomically(
    final: Path,
    write_files: Callable[[Path], None],
    marker: tuple[str, str] | None = None,
    on_failure: Callable[[BaseException, Path], None] | None = None,
) -> Path:
    """Create directory ``final`` whole or not at all: ``write_files`` fills ``.tmp_<name>``, every
    file is fsync'ed, the ``marker`` file (name, text) is written last, then the directory is renamed
    into place, replacing an existing ``final``. Checkpoints, exports and feature caches are written so.

    On any failure (even KeyboardInterrupt) ``on_failure(err, tmp)`` may raise a clearer error, the
    temporary directory is removed and ``final`` is as it was.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".tmp_{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_files(tmp)
        for f in sorted(tmp.rglob("*")):  # directories too: their entries (the files' names) must last
            _fsync(f)
        if marker is not None:
            (tmp / marker[0]).write_text(marker[1])  # last: its presence vouches for every other file
            _fsync(tmp / marker[0])
        _fsync(tmp)
        _replace_dir(tmp, final)
        _fsync(final.parent)
    except BaseException as err:
        try:
            if on_failure is not None:
                on_failure(err, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``; an existing ``dst`` (same step saved again) is moved
    aside to ``.old_<name>`` first and deleted after. A crash between the two renames leaves
    only ``.old_<name>``, which :func:`complete_checkpoints` moves back."""
    old = dst.with_name(f".old_{dst.name}")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _restore_moved_aside(root: Path) -> None:
    """Put back a complete ``.old_step_N`` whose ``step_N`` is missing (a re-save of step N
    interrupted between its renames), so the scan finds it and rotation does not delete it."""
    for old in root.glob(".old_step_*"):
        final = root / old.name.removeprefix(".old_")
        if is_complete(old) and not final.exists():
            with contextlib.suppress(OSError):  # another process restored it first
                os.replace(old, final)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories (``step_<N>``), oldest first."""
    if not root.is_dir():
        return []
    _restore_moved_aside(root)
    found = [(int(m[1]), p) for p in root.iterdir() if (m := STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if is_complete(p)]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint: the ``latest`` pointer if it names it, else a scan.

    The scan wins over a stale pointer (e.g. a crash between the rename and the pointer update).
    """
    ckpts = complete_checkpoints(root)
    pointed = read_pointer(root, "latest")
    if pointed is not None and (not ckpts or ckpts[-1] == pointed):
        return pointed
    return ckpts[-1] if ckpts else None


def rotate(root: Path, keep_last: int, protect: set[Path]) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` (0 = keep all), never one
    in ``protect`` (the best, the one resumed from). Leftovers of interrupted saves
    (``.tmp_*``, ``.old_*``, FSDP's ``.dcp_*`` staging) are removed too. Returns the deleted directories."""
    complete = complete_checkpoints(root)  # first: it restores a moved-aside checkpoint
    for leftover in [*root.glob(".tmp_step_*"), *root.glob(".old_step_*"), *root.glob(".dcp_step_*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    if keep_last <= 0:
        return []
    protected = {p.resolve() for p in protect if p is not None}
    doomed = [p for p in complete[:-keep_last] if p.resolve() not in protected]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def save_json(path: Path, obj: Any) -> None:
    write_atomically(path, json.dumps(obj, indent=1, sort_keys=True))


def write_atomically(path: Path, text: str) -> None:
    """Replace file ``path`` by ``text`` whole or not at all: written and fsync'ed under a temporary
    name, then renamed over it (a crash or a full disk mid-write keeps the old file)."""
    tmp = path.with_name(f".tmp_{path.name}")
    try:
        tmp.write_text(text)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync(path.parent)


def damaged(directory: Path) -> str:
    """What to tell a user whose checkpoint or export directory lacks a file or holds a broken one."""
    return (
        f"the checkpoint or export {directory} is damaged or incomplete; "
        "load another checkpoint of the run, or export again"
    )


@contextlib.contextmanager
def reading(path: Path, whole: Path | None = None) -> Iterator[None]:
    """Report a checkpoint file that is missing, damaged or does not fit this run as one
    :class:`CheckpointError` naming it (parsers' own errors rarely say which file).

    ``whole``: the checkpoint or export directory ``path`` belongs to, when the model is rebuilt
    from that directory's own files (inference, export, eval). The file then cannot fail to fit,
    so a failure means the directory is damaged or incomplete, and the error says so.
    """
    if not path.exists():
        raise CheckpointError(f"{path} is missing: {damaged(whole)}" if whole else f"checkpoint file missing: {path}")
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:
        cause = f"{type(err).__name__}: {err}"
        if whole is not None:
            raise CheckpointError(f"{path}: unreadable ({cause}): {damaged(whole)}") from err
        raise CheckpointError(
            f"{path}: unreadable, or not from this recipe's model ({cause}); nothing was changed"
        ) from err


def load_json(path: Path, whole: Path | None = None) -> Any:
    """The JSON in ``path``; ``whole`` as in :func:`reading`."""
    with reading(path, whole):
        return json.loads(path.read_text())


def torch_load(path: Path) -> Any:
    """Load tensors/containers saved with torch.save; refuses arbitrary pickled objects."""
    with reading(path):
        return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def rng_file(states: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
    """What ``rng.pt`` holds for the :func:`rng_state` of every rank, in rank order: rank 0's at the
    top (the single-process layout), every rank's under ``ranks`` when there are several. The ranks'
    streams part ways (dropout draws as many numbers as its input has elements, and each rank's
    batches are padded to their own lengths), so each rank resumes its own."""
    return {**states[0], "ranks": states} if len(states) > 1 else states[0]


def rank_rng_state(saved: dict[str, Any], rank: int, world_size: int) -> dict[str, torch.Tensor]:
    """This rank's state from ``rng.pt``; rank 0's when another number of processes wrote it (every
    rank starts from the same seed, so that is where a fresh run of this size starts too)."""
    ranks = saved.get("ranks")
    if ranks is not None and len(ranks) == world_size:
        return ranks[rank]
    return {k: v for k, v in saved.items() if k != "ranks"}


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
