"""Mixed precision on CUDA: fp16 with GradScaler (a step the scaler skips does not advance the step
count or the LR schedule) and bf16 autocast. Skipped without a GPU; run on the GPU machine with
``python -m pytest tests/test_amp_cuda.py -q``."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_helpers import metric_rows, poison_first_loss, tiny_run

import vla_ft.train as train_mod
from vla_ft.train import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = ["train.device=cuda", "checkpoint.every=0"]


def cuda_run(run_dir: Path, *overrides: str):
    return tiny_run(run_dir, *CUDA, *overrides)


def watch_attempts(monkeypatch) -> list[tuple[train_mod.StepResult, bool, int]]:
    """Per train_step call: (applied, weights moved, step count before it)."""
    attempts = []
    real = train_mod.train_step

    def watched(run, group, *args, **kwargs):
        before = [p.detach().clone() for p in run.model.parameters()]
        step = run.state.step
        result = real(run, group, *args, **kwargs)
        moved = any(not torch.equal(a, p) for a, p in zip(before, run.model.parameters(), strict=True))
        attempts.append((result, moved, step))
        return result

    monkeypatch.setattr(train_mod, "train_step", watched)
    return attempts


def resolved(attempts: list) -> list[tuple[bool, bool, int]]:
    """``watch_attempts``' records after ``fit``, when every step's ``applied`` is known (a queued
    step's flags are read while the next step is queued)."""
    return [(result.applied, moved, step) for result, moved, step in attempts]


def test_an_fp16_overflow_skipped_by_the_scaler_does_not_advance_step_or_schedule(tmp_path, monkeypatch):
    run = cuda_run(tmp_path / "run", "train.precision=fp16", "train.steps=3")
    assert run.scaler is not None and run.optimizer.defaults["fused"]
    calls = []
    weight = run.model.action_head[-1].weight
    weight.register_hook(lambda g: calls.append(1) or (g * math.inf if len(calls) == 1 else g))  # an "overflow"
    scale = run.scaler.get_scale()
    attempts = watch_attempts(monkeypatch)
    fit(run)

    assert resolved(attempts) == [(False, False, 0), (True, True, 0), (True, True, 1), (True, True, 2)]
    assert (run.state.step, run.state.scaler_skips, run.state.skipped) == (3, 1, 0)  # routine, not a fault
    assert run.scaler.get_scale() == scale * 0.5
    rows = [r for r in metric_rows(tmp_path / "run") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["lr/projector"] == pytest.approx(1e-3 * 0.5)  # update 0 still in warmup: not advanced
    assert [r["amp/scaler_skips"] for r in rows] == [1.0, 1.0, 1.0]


def test_an_fp16_nonfinite_loss_is_a_fault_and_the_scaler_keeps_working(tmp_path, monkeypatch):
    run = cuda_run(tmp_path / "run", "train.precision=fp16", "train.steps=2")
    poison_first_loss(monkeypatch, run.loss_fn)
    fit(run)  # a scaler left mid-step would raise "unscale_() has already been called"
    assert (run.state.step, run.state.skipped) == (2, 1)


@pytest.mark.parametrize("param_dtype", ["fp32", "auto"])
def test_bf16_autocast_trains_on_cuda(tmp_path, param_dtype):
    run = cuda_run(tmp_path / "run", "train.precision=bf16", "train.steps=4", f"train.param_dtype={param_dtype}")
    assert run.scaler is None
    dtypes = []
    run.model.action_head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    before = [p.detach().clone() for p in run.model.parameters()]
    fit(run)
    assert set(dtypes) == {torch.bfloat16}
    rows = [r for r in metric_rows(tmp_path / "run") if "loss" in r]
    assert len(rows) == 4 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    weights = torch.float32 if param_dtype == "fp32" else torch.bfloat16  # auto: bf16 weights, fp32 masters
    assert all(p.dtype == weights for p in run.model.parameters())
    assert (run.model.master_weights is None) == (param_dtype == "fp32")
    assert sum(not torch.equal(a, p) for a, p in zip(before, run.model.parameters(), strict=True)) > 10
    assert rows[-1]["perf/gpu_mem_gb"] > 0
