"""A step's finite flags read while the next step is queued (``train.StepLoop``) must train
exactly like reading them at once: same weights, optimizer state, counters, logs and
checkpoints, through late-found skips, a staged unfreeze, a checkpoint and a resume, and a stop
request. The fused optimizer's device-side skip makes this path the same on CPU and GPU."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
from train_helpers import assert_same_weights, deterministic, metric_rows, poison, tiny_run

import vla_ft.train as train_mod
from vla_ft import checkpoint as ck
from vla_ft.signals import StopRequest
from vla_ft.train import fit

# logs every 4 steps and checkpoints every 6: the steps in between may be left unread
DEFERRING = [
    "train.steps=12",
    "logging.every=4",
    "checkpoint.every=6",
    "freeze.vision_encoder=true",
    "unfreeze.vision_encoder.at_step=5",
]


def deferring_run(run_dir: Path, *overrides: str):
    return tiny_run(run_dir, *DEFERRING, *overrides)


def read_late(monkeypatch) -> list[bool]:
    """Record, for every step read late (while the next one was queued), whether it counted."""
    seen, settle = [], train_mod.StepLoop.settle_pending

    def spy(self):
        result = self.pending[0]
        settle(self)
        seen.append(result.applied)

    monkeypatch.setattr(train_mod.StepLoop, "settle_pending", spy)
    return seen


def train(run_dir: Path, monkeypatch, late: bool, *overrides: str, bad_calls: frozenset[int] = frozenset()):
    run = deferring_run(run_dir, *overrides)
    assert train_mod.queues_step(run)  # the fused AdamW's update is queued and skipped on the device
    poison(run, set(bad_calls))
    with monkeypatch.context() as m:
        if not late:
            m.setattr(train_mod, "can_defer", lambda run, stop: False)
        seen = read_late(m)
        fit(run)
    return run, seen


def optimizer_state(run) -> list[torch.Tensor]:
    return [t for s in run.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("ema", [[], ["train.ema_decay=0.8"]], ids=["plain", "ema"])
def test_reading_each_step_late_trains_exactly_like_reading_it_at_once(tmp_path, monkeypatch, ema):
    bad = frozenset({2, 7, 8})  # one skip, then two in a row: 15 attempts for 12 updates
    at_once, seen_at_once = train(tmp_path / "at_once", monkeypatch, False, *ema, bad_calls=bad)
    late, seen_late = train(tmp_path / "late", monkeypatch, True, *ema, bad_calls=bad)

    assert seen_at_once == []
    assert len(seen_late) >= 6 and seen_late.count(False) >= 2  # most steps, and skips, were read late
    for a, b in zip(at_once.model.parameters(), late.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(map(torch.equal, optimizer_state(at_once), optimizer_state(late)))
    if ema:  # a skipped update, found late or at once, leaves the average as it was
        assert all(map(torch.equal, at_once.ema.averages, late.ema.averages))
    assert at_once.state == late.state
    assert (late.state.step, late.state.skipped, late.state.consecutive_skips) == (12, 3, 0)
    assert at_once.loss_fn.step_state() == late.loss_fn.step_state()
    rows_at_once, rows_late = metric_rows(tmp_path / "at_once"), metric_rows(tmp_path / "late")
    assert [deterministic(r) for r in rows_at_once] == [deterministic(r) for r in rows_late]
    assert [r["step"] for r in rows_late if "loss" in r] == [4, 8, 12]
    for name in ("step_000006", "step_000012"):
        assert_same_weights(tmp_path / "at_once" / "checkpoints" / name, tmp_path / "late" / "checkpoints" / name)


def interrupt_at(monkeypatch, step: int) -> None:
    """SIGINT during the update that starts at ``state.step == step`` (read late: once the one
    before it was read): the loop then checkpoints after that update and exits."""
    real = train_mod.train_step

    def interrupted(run, group, *args, **kwargs):
        result = real(run, group, *args, **kwargs)
        if run.state.step == step:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(train_mod, "train_step", interrupted)


@pytest.mark.parametrize("ema", [[], ["train.ema_decay=0.8"]], ids=["plain", "ema"])
def test_a_resume_from_a_deferring_run_ends_where_the_uninterrupted_run_does(tmp_path, monkeypatch, ema):
    whole, _ = train(tmp_path / "whole", monkeypatch, True, *ema)
    with monkeypatch.context() as m:
        interrupt_at(m, 4)
        first, _ = train(tmp_path / "split", m, True, *ema)
    assert first.state.step == 5
    resumed, seen = train(tmp_path / "split", monkeypatch, True, *ema, "train.resume=true")
    assert resumed.resumed_from.name == "step_000005" and len(seen) >= 2
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert whole.state == resumed.state
    assert_same_weights(*(tmp_path / d / "checkpoints" / "step_000012" for d in ("whole", "split")))


@pytest.mark.parametrize("late", [False, True])
def test_a_stop_request_checkpoints_the_step_it_arrives_in(tmp_path, monkeypatch, late):
    interrupt_at(monkeypatch, 2)
    run, _ = train(tmp_path / "run", monkeypatch, late)
    assert (run.state.step, run.state.consumed) == (3, 3 * run.recipe.train.batch_size)
    assert ck.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_000003"


def test_a_step_is_read_at_once_where_the_next_one_depends_on_it(tmp_path):
    run = deferring_run(tmp_path / "run")
    stop = StopRequest()

    def defers_at(step: int) -> bool:
        train_mod.apply_freeze_plan(run, step)
        run.state.step = step
        return train_mod.can_defer(run, stop)

    # not before index 4 or 8 (logged), 5 (the vision encoder unfreezes), 6 (checkpoint), 12 (the end)
    assert [s for s in range(12) if defers_at(s)] == [0, 1, 2, 6, 8, 9, 10]
    stop.requested = True
    assert not defers_at(0)
    stop.requested = False
    for key, value in (("strategy", "dwa"), ("strategy", "scheduled"), ("grad_norm_every", 10)):
        cfg = run.loss_fn.cfg
        before, run.loss_fn.cfg = cfg, type(cfg)(**{**cfg.__dict__, key: value})
        assert run.loss_fn.reads_step and not defers_at(0), key
        run.loss_fn.cfg = before
    assert defers_at(0)


def test_a_halt_found_late_names_the_step_batch_and_lrs_of_the_at_once_run(tmp_path, monkeypatch):
    """In warmup each update has its own LR: the message gives the skipped update's (a step read
    late named the next update's, already set when it was read)."""
    messages = []
    for late in (False, True):
        with pytest.raises(train_mod.TrainingHalted) as err:
            overrides = ("train.max_consecutive_skips=2", "optim.warmup_steps=4")
            train(tmp_path / str(late), monkeypatch, late, *overrides, bad_calls=frozenset({1, 2}))
        messages.append(str(err.value))
    assert messages[0] == messages[1] and messages[0].startswith("halted at step 2 after 2 consecutive")
    assert "lr/projector=0.0005;" in messages[0] or "lr/projector=0.0005," in messages[0]  # update 1: 1e-3 * 2/4
