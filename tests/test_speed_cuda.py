"""Speed paths that only exist on a GPU. Skipped without CUDA; on the GPU machine:
``python -m pytest tests/test_speed_cuda.py -q``.

The fused AdamW step is queued before the host reads the finite flags (vla_ft.train.queue_update):
a non-finite step must still leave weights, optimizer moments and step counts untouched."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import QUICKSTART, TINY

import vla_ft.train as train_mod
from vla_ft.config import load_recipe
from vla_ft.run_setup import setup
from vla_ft.train import fit

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("log_every", [1, 100])  # 100: the flags of steps 1 and 2 are read one step late
def test_a_queued_step_with_a_nonfinite_gradient_changes_nothing(tmp_path, monkeypatch, log_every):
    overrides = [
        "train.device=cuda",
        "train.precision=bf16",
        "logging.tensorboard=false",
        "train.val_every=0",
        "checkpoint.every=0",
        "train.steps=3",
        f"logging.every={log_every}",
        f"output_dir={tmp_path / 'run'}",
    ]
    run = setup(load_recipe(QUICKSTART, [*TINY, *overrides]))
    assert run.optimizer.defaults["fused"] and run.scaler is None
    calls = []
    run.model.action_head[-1].weight.register_hook(
        lambda g: calls.append(1) or (g * math.nan if len(calls) == 2 else g)
    )
    queued, attempts = [], []
    real_queue, real_step = train_mod.queue_update, train_mod.train_step

    def spy_queue(run, *args):
        flags = real_queue(run, *args)
        queued.append(flags is not None)
        return flags

    def watched(run, group, *args, **kwargs):
        before = [p.detach().clone() for p in run.model.parameters()]
        moments = [s["exp_avg"].clone() for s in run.optimizer.state.values() if "exp_avg" in s]
        steps = [float(s["step"]) for s in run.optimizer.state.values() if "step" in s]
        result = real_step(run, group, *args, **kwargs)
        moved = any(not torch.equal(a, p) for a, p in zip(before, run.model.parameters(), strict=True))
        after = [s["exp_avg"] for s in run.optimizer.state.values() if "exp_avg" in s]
        same_moments = len(moments) == len(after) and all(map(torch.equal, moments, after))
        same_steps = steps == [float(s["step"]) for s in run.optimizer.state.values() if "step" in s]
        attempts.append((result, moved, same_moments and same_steps, run.state.step))
        return result

    read_late, settle = [], train_mod.StepLoop.settle_pending

    def spy_settle(loop):
        result = loop.pending[0]
        settle(loop)
        read_late.append(result.applied)

    monkeypatch.setattr(train_mod, "queue_update", spy_queue)
    monkeypatch.setattr(train_mod, "train_step", watched)
    monkeypatch.setattr(train_mod.StepLoop, "settle_pending", spy_settle)
    fit(run)
    assert read_late == ([] if log_every == 1 else [True, False, True])
    assert all(queued) and len(queued) == 4
    assert [(a[0].applied, a[1]) for a in attempts] == [(True, True), (False, False), (True, True), (True, True)]
    assert attempts[1][2]  # the skipped attempt left moments and step counters as they were
    assert (run.state.step, run.state.skipped) == (3, 1)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])  # bf16: bf16 weights, the fused update on fp32 masters
def test_the_queued_fused_step_trains_like_the_plain_one(tmp_path, monkeypatch, precision):
    """Clipping inside the fused update (grad_scale) and the queued step give the weights and
    logged gradient norms of clip_grad_norm_ + a plain optimizer step, with clipping active."""
    overrides = [
        "train.device=cuda",
        f"train.precision={precision}",
        "logging.tensorboard=false",
        "train.val_every=0",
        "checkpoint.every=0",
        "train.steps=4",
        "optim.grad_clip=0.01",  # small enough that every step clips
        "logging.every=1",
    ]
    results = {}
    for name, queue in (("queued", True), ("plain", False)):
        run = setup(load_recipe(QUICKSTART, [*TINY, *overrides, f"output_dir={tmp_path / name}"]))
        monkeypatch.setattr(train_mod, "queues_step", lambda run, queue=queue: queue)
        fit(run)
        rows = [json.loads(line) for line in run.logger.path.read_text().splitlines()]
        norms = [r["grad_norm"] for r in rows if "grad_norm" in r]
        assert (run.model.master_weights is not None) == (precision == "bf16")
        trained = [p.detach().clone() for g in run.optimizer.param_groups for p in g["params"]]  # the masters
        results[name] = (trained, norms)
    (w_q, n_q), (w_p, n_p) = results["queued"], results["plain"]
    assert len(n_p) == 4 and min(n_p) > 0.01  # clipping was active on every step
    assert n_q == pytest.approx(n_p, rel=1e-4)
    for a, b in zip(w_q, w_p, strict=True):
        # Adam moves a weight by about lr (1e-3) whatever the size of its gradient, so an element whose
        # gradient sits at rounding level (the plain path rescales the gradients, the fused one the
        # update) may land a fraction of a step away: allow 1 in 1000 such elements (1 in a smaller tensor),
        # none beyond lr / 10.
        far = (~torch.isclose(a, b, atol=1e-5, rtol=1e-4)).sum().item()
        assert far <= max(1, a.numel() // 1000) and (a - b).abs().max() < 1e-4, (far, a.numel(), (a - b).abs().max())


@pytest.mark.parametrize("compile_", [False, True])
def test_a_training_step_never_blocks_the_host_before_its_one_wait(tmp_path, compile_):
    """Nothing in ``prepare_update`` or ``train_step`` may copy from pageable memory or read a
    device value (``.item()``, ``new_tensor`` on a CUDA tensor...): each such call waits for all
    queued GPU work, so the GPU then idles while the host catches up. (The FLOP meter's
    ``new_tensor`` did this once per step: 2.7% of the reference VLA's step.) The step's one
    intended wait is an event synchronize, which sync-debug mode does not flag."""
    overrides = [
        "train.device=cuda",
        "train.precision=bf16",
        f"train.compile={str(compile_).lower()}",
        "logging.tensorboard=false",
        "train.val_every=0",
        "checkpoint.every=0",
        f"output_dir={tmp_path / 'run'}",
    ]
    run = setup(load_recipe(QUICKSTART, [*TINY, *overrides]))
    batches = iter(run.train_loader)
    for _ in range(2):  # first steps: compilation, optimizer state and kernel tables
        train_mod.prepare_update(run)
        train_mod.train_step(run, [next(batches)])
        run.state.step += 1
    batch = train_mod.to_device(next(batches), run.rt.device)  # the loader's copy is not part of the step
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        train_mod.prepare_update(run)
        result = train_mod.train_step(run, [batch])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.applied
