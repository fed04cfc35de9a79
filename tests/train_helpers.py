"""Helpers for the training-control tests: runs in separate processes, metrics and weights.

A fresh interpreter costs ~10 s of imports (torch, timm, transformers) on the CI's 2 cores, so
most "new process" runs are forked from the test process after those imports: a forked child is
a real OS process (own PID, own signals, killable) that shares nothing with the run it resumes
and starts from the same imported-only state. One resume per matrix still goes through
``python -m vla_ft`` to cover the real entry point.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from conftest import QUICKSTART, ROOT, TINY
from safetensors.torch import load_file

FAST = [*TINY, "logging.tensorboard=false", "train.val_every=0"]


def tiny_run(run_dir: Path, *overrides: str):
    """The quickstart recipe with the tiny model, no TensorBoard and no validation, set up in-process."""
    from vla_ft.config import load_recipe
    from vla_ft.run_setup import setup

    return setup(load_recipe(QUICKSTART, [*FAST, *overrides, f"output_dir={run_dir}"]))


def train_argv(run_dir: Path, overrides: list[str]) -> list[str]:
    return ["train", str(QUICKSTART), *overrides, f"output_dir={run_dir}"]


def _child(argv: list[str], log: str, prepare: Callable[[], None] | None) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # noqa: SIM115 (lives as long as the child)
    if prepare is not None:
        prepare()
    from vla_ft.cli import main

    sys.exit(main(argv))


def warm_imports() -> None:
    """Import what building a model needs (timm, transformers' Qwen2, tokenizers: seconds) in this
    process, once, so that forked children start training at once."""
    global _WARM
    if not _WARM:
        from vla_ft.config import load_recipe
        from vla_ft.run_setup import build_components

        build_components(load_recipe(QUICKSTART, TINY), torch.device("cpu"))
        _WARM = True


_WARM = False


def start_forked(argv: list[str], log: Path, prepare: Callable[[], None] | None = None):
    """``vla-ft <argv>`` in a forked child process (started, not waited for); output goes to ``log``.
    ``prepare`` runs in the child first (fault injection through monkeypatching). Where CUDA exists
    the child is spawned instead: after the first backward, autograd's CUDA worker threads make
    a forked child's backward fail (``prepare`` must then pickle: a module-level function)."""
    method = "spawn" if torch.cuda.is_available() else "fork"
    if method == "fork":
        warm_imports()
    proc = multiprocessing.get_context(method).Process(target=_child, args=(argv, str(log), prepare))
    proc.start()
    return proc


def run_forked(argv: list[str], log: Path, prepare: Callable[[], None] | None = None, timeout: float = 300) -> int:
    """Run ``vla-ft <argv>`` in a forked child to the end; returns its exit code."""
    proc = start_forked(argv, log, prepare)
    proc.join(timeout)
    if proc.exitcode is None:
        proc.kill()
        proc.join()
        raise TimeoutError(f"forked run did not finish in {timeout}s; log:\n{log.read_text()[-3000:]}")
    return proc.exitcode


def run_fresh(argv: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m vla_ft <argv>`` in a new interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "vla_ft", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def wait_for(condition: Callable[[], bool], timeout: float, what: str, proc: Any = None) -> None:
    t0 = time.monotonic()
    while not condition():
        if proc is not None and not proc.is_alive():
            raise AssertionError(f"the child exited (code {proc.exitcode}) before {what}")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"waited {timeout}s for {what}")
        time.sleep(0.02)


def metric_rows(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def deterministic(row: dict[str, Any]) -> dict[str, Any]:
    """A metrics row without the wall-clock values (throughput, data wait)."""
    return {k: v for k, v in row.items() if not k.startswith("perf/")}


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    """The two checkpoints hold the same weights, bit for bit, and the same weight average if any."""
    for name in ("model.safetensors", "ema.safetensors"):
        assert (a / name).is_file() == (b / name).is_file(), name
        if not (a / name).is_file():
            continue
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys()
        different = [k for k in wa if not torch.equal(wa[k], wb[k])]
        assert not different, f"{len(different)} tensors of {name} differ between {a} and {b}, e.g. {different[:3]}"


def poison_first_loss(monkeypatch, loss_fn, finite_grads: bool = False) -> None:
    """Make the first training forward of ``loss_fn`` return a NaN total (a real non-finite loss);
    ``finite_grads``: a NaN added to the value only, so the gradients stay finite."""
    forward, calls = loss_fn.forward, []

    def nan_once(outputs, batch, share=None):
        total, parts = forward(outputs, batch, share)
        calls.append(1)
        if len(calls) > 1:
            return total, parts
        return (total + torch.tensor(math.nan) if finite_grads else total * float("nan")), parts

    monkeypatch.setattr(loss_fn, "forward", nan_once)


def poison(run, bad_calls: set[int]) -> None:
    """NaN into the action head's gradient on the given backward calls (0-based)."""
    calls: list[int] = []

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls.append(len(calls))
        return grad * math.nan if calls[-1] in bad_calls else grad

    run.model.action_head[-1].weight.register_hook(hook)
