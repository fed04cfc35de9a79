"""End to end on CPU: the quickstart at reduced size writes the documented run directory,
then a second invocation with train.resume=true continues from the newest checkpoint."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from conftest import QUICKSTART
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vla_ft.cli import main as cli


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_quickstart_run_directory_and_resume(tiny_overrides, capsys):
    run_dir = Path(tiny_overrides[-1].split("=", 1)[1])
    assert cli(["train", str(QUICKSTART), *tiny_overrides]) == 0
    out = capsys.readouterr().out
    assert "held-out action L1" in out and "mean-action baseline" in out and "gripper accuracy" in out

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["steps"] == 6 and saved["output_dir"] == str(run_dir)
    assert "vision_encoder" in (run_dir / "parameters.txt").read_text()

    rows = _rows(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for r in train_rows:
        assert {
            "loss/language",
            "loss/action",
            "loss/gripper",
            "grad_norm",
            "lr/action_head",
            "perf/samples_per_s",
            "perf/data_wait_frac",
            "fault/nonfinite_skips",
        } <= r.keys()
    val_rows = [r for r in rows if "val/action_l1" in r]
    assert [r["step"] for r in val_rows] == [3, 6]
    assert {"val/loss/action", "val/gripper_acc", "val/baseline_l1"} <= val_rows[0].keys()

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"loss", "loss/action", "loss/gripper", "loss/language", "val/action_l1"} <= set(tags)
    assert [e.step for e in events.Scalars("loss/action")] == [1, 2, 3, 4, 5, 6]

    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_000006"
    for name in (
        "model.safetensors",
        "optimizer.pt",
        "trainer_state.json",
        "norm_stats.json",
        "config.yaml",
        "rng.pt",
        "COMPLETE",
        "tokenizer/tokenizer.json",
    ):
        assert (ckpts / "step_000006" / name).is_file(), name

    # A run killed after step 6 but before its checkpoint: the newest checkpoint is step 3. The
    # same command + train.resume=true continues at step 4 and both logs read as one run.
    shutil.rmtree(ckpts / "step_000006")
    with pytest.warns(UserWarning, match="changed keys: train.steps"):  # harmless: a warning, not an error
        assert cli(["train", str(QUICKSTART), *tiny_overrides, "train.resume=true", "train.steps=9"]) == 0
    rows = _rows(run_dir)
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 10))
    state = json.loads((ckpts / "step_000009" / "trainer_state.json").read_text())
    assert state["state"]["step"] == 9
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/action")] == list(range(1, 10))  # stale 4-6 purged


def test_a_resume_after_skips_at_the_checkpoint_step_hides_them_in_tensorboard_too(tmp_path: Path):
    """Skips are logged at the step of the last update: checkpoint at step 3, two skips (rows at
    step 3), a halt, a resume. metrics.jsonl drops the two skip rows; TensorBoard, which can only
    hide whole steps, must show step 3 as the file does (not 0, 1, 2 skips at step 3)."""
    from vla_ft.tracking import MetricsLogger

    first = MetricsLogger(tmp_path, tensorboard=True)
    first.start_fresh()
    for step, skips in ((1, 0.0), (2, 0.0), (3, 0.0), (3, 1.0), (3, 2.0)):
        first.log(step, {"fault/nonfinite_skips": skips, **({"loss": float(step)} if skips == 0 else {})})
    first.close()
    resumed = MetricsLogger(tmp_path, tensorboard=True)
    resumed.truncate_after(3, skipped=0)
    resumed.log(4, {"fault/nonfinite_skips": 0.0, "loss": 4.0})
    resumed.close()
    assert [(r["step"], r["fault/nonfinite_skips"]) for r in _rows(tmp_path)] == [(s, 0.0) for s in (1, 2, 3, 4)]
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("fault/nonfinite_skips")] == [(s, 0.0) for s in (1, 2, 3, 4)]
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(s, float(s)) for s in (1, 2, 3, 4)]


def test_a_writer_reopened_within_the_same_second_is_read_after_the_first(tmp_path: Path, monkeypatch):
    """TensorBoard reads a directory's event files in name order: the opening second, host, pid and a
    per-process counter compared as text, so writer 10 opened in the second of writer 9 was read first
    and the resumed run's purge hid nothing (steps 4-6 of the crashed run came back)."""
    from tensorboard.summary.writer import event_file_writer

    from vla_ft.tracking import MetricsLogger

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    time.sleep(1 - time.time() % 1)  # both writers open early in one second
    first = MetricsLogger(tmp_path, tensorboard=True)
    first.start_fresh()
    for step in range(1, 7):
        first.log(step, {"loss": float(step)})
    first.close()
    resumed = MetricsLogger(tmp_path, tensorboard=True)
    resumed.truncate_after(3)
    resumed.log(4, {"loss": 40.0})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


@pytest.mark.parametrize("video", [True, False])
def test_loader_workers_start_from_the_fork_server_for_video(tmp_path, video):
    """``data.worker_start=auto``: a LeRobot dataset of MP4 cameras gets forkserver workers (a worker
    forked after its parent decoded hung in its first decode on a GPU host), one of parquet images
    fork's; either way, 2 workers train the numbers of the loading process itself, and an explicit
    setting is kept."""
    from conftest import TINY

    from robot_data import SyntheticReader
    from robot_data.lerobot_writer import write_lerobot
    from vla_ft.config import load_recipe
    from vla_ft.run_setup import setup, teardown

    data = write_lerobot(SyntheticReader(episodes=6, episode_length=10, image_size=32), tmp_path / "data", video=video)
    base = [*TINY, "data.format=lerobot", f"data.path={data}", "data.text_key=narration", "train.steps=2"]
    base += ["logging.tensorboard=false", "train.val_every=0"]
    wanted = "forkserver" if video else "fork"
    losses = {}
    for workers in (0, 2):
        run_dir = tmp_path / f"run{workers}"
        assert cli(["train", str(QUICKSTART), *base, f"data.num_workers={workers}", f"output_dir={run_dir}"]) == 0
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[workers] = [r["loss"] for r in rows if "loss" in r]
    assert losses[2] == losses[0] and len(losses[0]) == 2
    for setting, method in (("auto", wanted), ("spawn", "spawn")):
        overrides = [*base, "data.num_workers=2", f"data.worker_start={setting}", f"output_dir={tmp_path / 'r'}"]
        run = setup(load_recipe(QUICKSTART, overrides))
        try:
            assert run.train_loader.multiprocessing_context.get_start_method() == method
        finally:
            teardown(run)
