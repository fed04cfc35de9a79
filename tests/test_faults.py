"""Faults injected for real: a poisoned gradient, a full disk during a save, SIGTERM and SIGINT
during training, and SIGKILL in the middle of writing a checkpoint."""

from __future__ import annotations

import errno
import hashlib
import math
import os
import shutil
import signal
import time
from functools import partial
from pathlib import Path

import pytest
import torch
from train_helpers import FAST, metric_rows, poison_first_loss, start_forked, tiny_run, train_argv, wait_for

import vla_ft.train as train_mod
from vla_ft import checkpoint as ck
from vla_ft.checkpoint import CheckpointError
from vla_ft.cli import main as cli
from vla_ft.train import fit


def poison_gradient(run, bad_calls: set[int] | None) -> list[int]:
    """NaN into the action head's gradient on the given backward calls (None: every call)."""
    calls: list[int] = []
    weight = run.model.action_head[-1].weight

    def hook(grad: torch.Tensor) -> torch.Tensor:
        calls.append(len(calls))
        return grad * math.nan if bad_calls is None or calls[-1] in bad_calls else grad

    weight.register_hook(hook)
    return calls


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + f.read_bytes())
    return h.hexdigest()


def test_a_nonfinite_gradient_skips_the_step_without_moving_weights_or_schedule(tmp_path, monkeypatch):
    run = tiny_run(tmp_path / "run", "train.steps=4", "checkpoint.every=0")
    poison_gradient(run, bad_calls={1})  # the second attempt
    attempts = []

    def watched(run, group, *args, **kwargs):
        before = [p.detach().clone() for p in run.model.parameters()]
        result = step(run, group, *args, **kwargs)
        moved = any(not torch.equal(a, p) for a, p in zip(before, run.model.parameters(), strict=True))
        attempts.append((result, moved, run.state.step))  # result.applied is read after fit: it may be pending
        return result

    step = train_mod.train_step
    monkeypatch.setattr(train_mod, "train_step", watched)
    fit(run)
    attempts = [(result.applied, moved, step) for result, moved, step in attempts]

    # attempt 2 was skipped: weights untouched, step count not advanced; training still did 4 updates
    assert attempts == [(True, True, 0), (False, False, 1), (True, True, 1), (True, True, 2), (True, True, 3)]
    assert (run.state.step, run.state.skipped, run.state.consecutive_skips) == (4, 1, 0)
    rows = metric_rows(tmp_path / "run")
    assert {"step": 1, "fault/nonfinite_skips": 1.0} in rows
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    # the schedule counts applied updates only: warmup 2 of 4 steps, cosine to 0.1 from step 2
    expected = [0.5, 1.0, 1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))]
    assert [r["lr/projector"] for r in train_rows] == pytest.approx([1e-3 * f for f in expected], rel=1e-12)
    assert [r["fault/nonfinite_skips"] for r in train_rows] == [0.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("optimizer", "finite_grads"), [("adamw", False), ("adamw", True), ("sgd", True)], ids=["nan", "value", "sgd"]
)
def test_a_nonfinite_loss_is_skipped_too(tmp_path, monkeypatch, optimizer, finite_grads):
    """Also when only the loss's value is NaN (its gradients finite): on the fused path (AdamW,
    flags read on the device) and the plain one (SGD, read on the host) the step does not count."""
    run = tiny_run(tmp_path / "run", "train.steps=2", "checkpoint.every=0", f"optim.name={optimizer}")
    poison_first_loss(monkeypatch, run.loss_fn, finite_grads=finite_grads)
    fit(run)
    assert (run.state.step, run.state.skipped) == (2, 1)


def test_consecutive_nonfinite_steps_halt_naming_step_samples_and_lr(tmp_path, monkeypatch, capsys):
    seen: list[list[tuple[int, int]]] = []
    real_setup, real_step = train_mod.setup, train_mod.train_step

    def poisoned_setup(recipe):
        run = real_setup(recipe)
        poison_gradient(run, bad_calls=None)
        return run

    def recording_step(run, group, *args, **kwargs):
        seen.append(
            [(int(e), int(f)) for b in group for e, f in zip(b["episode_index"], b["frame_index"], strict=True)]
        )
        return real_step(run, group, *args, **kwargs)

    monkeypatch.setattr(train_mod, "setup", poisoned_setup)
    monkeypatch.setattr(train_mod, "train_step", recording_step)
    argv = train_argv(tmp_path / "run", [*FAST, "train.max_consecutive_skips=3"])
    assert cli(argv) == 2  # a user-facing error: message, no traceback
    err = capsys.readouterr().err
    assert "halted at step 1 after 3 consecutive non-finite steps" in err
    assert "lr/projector=0.0005" in err and "lr/action_head=0.001" in err  # warmup 1/2 of 1e-3 and 2e-3
    assert len(seen) == 3
    assert "last batch (episode/frame): " + ", ".join(f"ep{e}/f{f}" for e, f in seen[-1]) in err
    assert [r["fault/nonfinite_skips"] for r in metric_rows(tmp_path / "run")] == [1.0, 2.0, 3.0]


def test_a_resume_after_a_halt_on_skips_drops_the_halted_runs_skip_rows(tmp_path):
    """Skips right after a checkpoint are logged at its step; the resume from it drops them:
    ``fault/nonfinite_skips`` then reads as one run (0 throughout), not 0, 1, 2, 0."""
    overrides = ("train.steps=6", "checkpoint.every=3", "train.max_consecutive_skips=2")
    run = tiny_run(tmp_path / "run", *overrides)
    poison_gradient(run, bad_calls={3, 4})  # the two attempts after the checkpoint at step 3
    with pytest.raises(train_mod.TrainingHalted, match="halted at step 4"):
        fit(run)
    run.logger.close()
    run = tiny_run(tmp_path / "run", *overrides, "train.resume=true")
    fit(run)
    run.logger.close()
    rows = metric_rows(tmp_path / "run")
    counts = [(r["step"], r["fault/nonfinite_skips"]) for r in rows if "fault/nonfinite_skips" in r]
    assert counts == [(step, 0.0) for step in range(1, 7)]


@pytest.mark.parametrize("failure", ["enospc", "no_errno"])
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, failure):
    run_dir = tmp_path / "run"
    run = tiny_run(run_dir, "train.steps=6", "checkpoint.every=3")
    root, first = run_dir / "checkpoints", run_dir / "checkpoints" / "step_000003"
    real_save, digest = torch.save, {}

    def save_until_full(obj, f, *args, **kwargs):
        if not ck.is_complete(first):
            return real_save(obj, f, *args, **kwargs)
        digest["during"] = tree_digest(first)
        Path(f).write_bytes(b"\0" * 4096)  # a partial file, as a real full disk leaves behind
        if failure == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        # torch.save's own report of a failed write names no cause: the free space decides
        monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 1024, 1024))
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(CheckpointError, match=r"disk full while saving checkpoint step 6 .* needs about [\d.]+ MiB"):
        fit(run)
    monkeypatch.undo()

    assert tree_digest(first) == digest["during"]  # untouched
    assert ck.latest_checkpoint(root) == first
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003"]  # no temporary leftovers
    resumed = tiny_run(run_dir, "train.steps=6", "checkpoint.every=3", "train.resume=true")
    assert (resumed.resumed_from, resumed.state.step) == (first, 3)


def _slow_steps() -> None:
    """In the child: 0.3 s per step, so that a signal surely arrives mid-run."""
    real = train_mod.train_step

    def slow(run, group, *args, **kwargs):
        time.sleep(0.3)
        return real(run, group, *args, **kwargs)

    train_mod.train_step = slow


def test_sigterm_checkpoints_at_the_next_step_boundary_and_exits_cleanly(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "log.txt"
    overrides = [*FAST, "train.steps=30", "checkpoint.every=0", "logging.progress=plain"]
    proc = start_forked(train_argv(run_dir, overrides), log, prepare=_slow_steps)
    wait_for(lambda: any(r.get("step", 0) >= 2 for r in metric_rows(run_dir)), 120, "step 2", proc)
    os.kill(proc.pid, signal.SIGTERM)
    proc.join(60)
    assert proc.exitcode == 0, log.read_text()[-3000:]

    last = max(r["step"] for r in metric_rows(run_dir) if "loss" in r)
    assert 2 <= last < 30
    assert f"signal SIGTERM: checkpoint saved at step {last}, exiting" in log.read_text()
    saved = ck.latest_checkpoint(run_dir / "checkpoints")
    assert saved is not None and saved.name == ck.step_dir_name(last)

    run = tiny_run(run_dir, *overrides[len(FAST) :], "train.resume=true")
    assert run.state.step == last
    run.recipe.train.steps = last + 1  # one more update proves the state is usable
    fit(run)
    assert ck.latest_checkpoint(run_dir / "checkpoints").name == ck.step_dir_name(last + 1)


@pytest.mark.parametrize("signals", [1, 2])
def test_sigint_stops_cleanly_and_a_second_one_interrupts(tmp_path, monkeypatch, signals):
    run = tiny_run(tmp_path / "run", "train.steps=5", "checkpoint.every=0")
    real = train_mod.train_step

    def interrupted(run, group, *args, **kwargs):
        result = real(run, group, *args, **kwargs)
        if run.state.step == 1:  # during the second update
            for _ in range(signals):
                os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(train_mod, "train_step", interrupted)
    if signals == 1:
        fit(run)
        assert run.state.step == 2
        assert ck.latest_checkpoint(tmp_path / "run" / "checkpoints").name == "step_000002"
    else:
        with pytest.raises(KeyboardInterrupt):
            fit(run)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def _block_inside_step_2_save(marker: str) -> None:
    """In the child: the save of step 2 writes every file, then hangs before COMPLETE."""
    real = ck.write_checkpoint

    def blocking(root, step, write_files, estimate_bytes=0):
        def write_then_hang(tmp):
            write_files(tmp)
            Path(marker).touch()
            time.sleep(600)

        return real(root, step, write_then_hang if step == 2 else write_files, estimate_bytes)

    ck.write_checkpoint = blocking


def test_sigkill_in_the_middle_of_a_save_resumes_from_the_previous_checkpoint(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "blocked"
    overrides = [*FAST, "train.steps=4", "checkpoint.every=1", "checkpoint.keep_last=0"]
    proc = start_forked(
        train_argv(run_dir, overrides), tmp_path / "log.txt", prepare=partial(_block_inside_step_2_save, str(marker))
    )
    wait_for(marker.exists, 120, "the save of step 2", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL

    root = run_dir / "checkpoints"
    unfinished = root / ".tmp_step_000002"
    assert (unfinished / "model.safetensors").is_file() and not (unfinished / ck.COMPLETE).exists()
    assert ck.latest_checkpoint(root) == root / "step_000001"

    run = tiny_run(run_dir, *overrides[len(FAST) :], "train.resume=true")
    assert (run.resumed_from, run.state.step) == (root / "step_000001", 1)
    fit(run)
    assert ck.latest_checkpoint(root) == root / "step_000004"
    assert not unfinished.exists() and ck.is_complete(root / "step_000002")
