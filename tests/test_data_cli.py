"""`vla-ft data synth/check` and the trainer's refusal of a failing dataset."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import QUICKSTART
from test_data_check import _edit_column

from robot_data import SyntheticReader, write_lerobot
from vla_ft.cli import main as cli


def _synth(tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    assert cli(["data", "synth", str(out), "--episodes", "6", "--length", "10", "--image-size", "32"]) == 0
    return out


def test_synth_then_check_then_train_from_disk(tmp_path, tiny_overrides, capsys):
    ds = _synth(tmp_path)
    info = json.loads((ds / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 6
    assert cli(["data", "check", str(ds)]) == 0
    assert "passed every check" in capsys.readouterr().out
    disk = ["data.format=lerobot", f"data.path={ds}", "data.text_key=narration"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, "train.steps=2"]) == 0


def test_failing_dataset_is_refused_unless_skipped(tmp_path, tiny_overrides, capsys):
    ds = _synth(tmp_path)
    data_file = next((ds / "data").rglob("*.parquet"))
    _edit_column(data_file, "action", lambda a: np.where(np.arange(len(a))[:, None] == 12, np.nan, a))  # episode 1
    assert cli(["data", "check", str(ds)]) == 1
    err = capsys.readouterr().err
    assert "episode 1" in err and data_file.name in err

    disk = ["data.format=lerobot", f"data.path={ds}", "data.text_key=narration", "train.steps=2"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk]) == 2
    err = capsys.readouterr().err
    assert "failed its checks" in err and "skip_bad_episodes" in err and "Traceback" not in err

    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, "data.skip_bad_episodes=true"]) == 0
    assert "skipping 1 episode(s): [1]" in capsys.readouterr().out


def test_skipped_episode_is_left_out_of_shipped_stats_checks(tmp_path, tiny_overrides, capsys):
    """A v2.1 dataset ships its stats; with one episode's data file gone and skipping on, the
    run trains on the rest (the stats comparison must not read the skipped episode)."""
    source = SyntheticReader(episodes=4, episode_length=10, image_size=32)
    ds = write_lerobot(source, tmp_path / "v21", video=False, version="v2.1")
    (ds / "data/chunk-000/episode_000002.parquet").unlink()
    disk = ["data.format=lerobot", f"data.path={ds}", "data.text_key=narration", "train.steps=2"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, "data.skip_bad_episodes=true"]) == 0
    assert "skipping 1 episode(s): [2]" in capsys.readouterr().out


def test_synth_refuses_a_non_empty_directory_and_leaves_it_as_it_was(tmp_path, capsys):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli(["data", "synth", str(out), "--episodes", "2", "--length", "4", "--image-size", "32"]) == 2
    err = capsys.readouterr().err
    assert f"vla-ft data synth: error: {out}: exists and is not empty" in err and "Traceback" not in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"


def test_a_key_naming_no_feature_is_one_line_with_the_features(tmp_path, tiny_overrides, capsys):
    ds = _synth(tmp_path)
    disk = ["data.format=lerobot", f"data.path={ds}", "data.text_key=narration", "train.steps=2"]
    for key, typo, close in (
        ("state_key", "observation.stat", "observation.state"),
        ("text_key", "narraton", "narration"),
    ):
        assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, f"data.{key}={typo}"]) == 2
        err = capsys.readouterr().err
        assert f"data.{key}: '{typo}' is not a feature of {ds} (did you mean '{close}'?)" in err
        assert "features: observation.state, action, observation.images.top, narration" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    (tmp_path / "empty").mkdir()  # a directory without metadata: the file is named, no traceback
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, f"data.path={tmp_path / 'empty'}"]) == 2
    assert "data.path: " in (err := capsys.readouterr().err) and "meta/info.json: missing" in err
