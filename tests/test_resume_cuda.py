"""Resume on CUDA with what only a GPU run has: fp16 autocast with GradScaler and the compiled
forward, across a staged unfreeze (the compiled graphs are re-traced when the vision encoder starts
training). Runs each leg in a new interpreter (CUDA does not survive a fork). GPU kernels with
atomics are not bitwise repeatable, so values are compared to fp16 resolution; the scaler state and
the schedule must match exactly. ``python -m pytest tests/test_resume_cuda.py -q`` on a GPU machine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import TINY
from train_helpers import metric_rows, run_fresh, train_argv, weights

from vla_ft import checkpoint as ck

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N, K = 6, 3
RECIPE = [
    *TINY,
    "train.device=cuda",
    "train.precision=fp16",
    "train.compile=true",
    "freeze.vision_encoder=true",
    "unfreeze.vision_encoder.at_step=2",
    "unfreeze.vision_encoder.warmup_steps=2",
    f"train.steps={N}",
    "train.val_every=0",
    "checkpoint.every=1",
    "checkpoint.keep_last=0",
    "logging.tensorboard=false",
    "logging.progress=plain",
]


def run(run_dir: Path, *extra: str) -> str:
    proc = run_fresh(train_argv(run_dir, [*RECIPE, *extra]))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return log


def state(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / "checkpoints" / ck.step_dir_name(step) / "trainer_state.json").read_text())


def test_fp16_compiled_run_resumes_across_a_staged_unfreeze(tmp_path):
    straight = tmp_path / "straight"
    run(straight)
    rows = [r for r in metric_rows(straight) if "loss" in r]
    assert [r["lr/vision_encoder"] > 0 for r in rows] == [False, False, True, True, True, True]
    frozen_vit, trained_vit = (weights(straight / "checkpoints" / ck.step_dir_name(s)) for s in (2, N))
    vit = [k for k in frozen_vit if k.startswith("vision_encoder.")]
    assert vit and any(not torch.equal(frozen_vit[k], trained_vit[k]) for k in vit)  # it trained once unfrozen
    scaler = state(straight, N)["scaler"]
    assert scaler and scaler["scale"] > 0

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    for path in (resumed / "checkpoints").glob("step_*"):
        if int(path.name.split("_")[1]) > K:
            shutil.rmtree(path)
    ck.write_pointer(resumed / "checkpoints", "latest", ck.step_dir_name(K))
    log = run(resumed, "train.resume=true")
    assert f"at step {K}" in log

    assert state(resumed, N)["scaler"] == scaler
    assert state(resumed, N)["state"]["step"] == N
    again = [r for r in metric_rows(resumed) if "loss" in r]
    assert [r["step"] for r in again] == [r["step"] for r in rows]
    for a, b in zip(again[K:], rows[K:], strict=True):
        assert a["lr/vision_encoder"] == b["lr/vision_encoder"]
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-4)
    w_straight, w_resumed = (
        weights(straight / "checkpoints" / ck.step_dir_name(N)),
        weights(resumed / "checkpoints" / ck.step_dir_name(N)),
    )
    assert w_straight.keys() == w_resumed.keys()
    for k in w_straight:
        torch.testing.assert_close(w_resumed[k], w_straight[k], rtol=2e-3, atol=1e-4, msg=k)


def test_a_bf16_resume_inside_a_log_window_logs_the_rows_of_the_straight_run(tmp_path):
    """The log window (device sums, bf16 or fp32) is saved with the checkpoint: resumed at step 2
    of a 4-step window, the row at step 4 still averages steps 1-4, as the straight run's does."""
    extra = ("train.precision=bf16", "logging.every=4")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, *extra)
    shutil.copytree(straight, resumed)
    for path in (resumed / "checkpoints").glob("step_*"):
        if int(path.name.split("_")[1]) > 2:
            shutil.rmtree(path)
    ck.write_pointer(resumed / "checkpoints", "latest", ck.step_dir_name(2))
    run(resumed, *extra, "train.resume=true")
    rows, again = ([r for r in metric_rows(d) if "loss" in r] for d in (straight, resumed))
    assert [r["step"] for r in again] == [r["step"] for r in rows] == [4, 6]
    for a, b in zip(again, rows, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=2e-3, abs=1e-4)
        assert a["perf/samples_per_s"] > 0
