"""`vla-ft data synth/check` and the trainer's refusal of a failing dataset."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import QUICKSTART
from test_data_check import _edit_column

from robot_data import SyntheticReader, write_lerobot
from robot_data.hdf5_writer import write_aloha, write_robomimic
from robot_data.reader import EpisodeArrays
from vla_ft.cli import main as cli
from vla_ft.config import load_recipe
from vla_ft.data import checked_skip_list


def _synth(tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    assert cli(["data", "synth", str(out), "--episodes", "6", "--length", "10", "--image-size", "32"]) == 0
    return out


def _robomimic(tmp_path: Path) -> Path:
    return write_robomimic(SyntheticReader(episodes=6, episode_length=10, image_size=32), tmp_path / "rm.hdf5")


def test_synth_then_check_then_train_from_disk(tmp_path, tiny_overrides, capsys):
    ds = _synth(tmp_path)
    info = json.loads((ds / "meta" / "info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == 6
    assert cli(["data", "check", str(ds)]) == 0
    assert "passed every check" in capsys.readouterr().out
    disk = ["data.format=lerobot", f"data.path={ds}", "data.text_key=narration"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, "train.steps=2"]) == 0


def test_failing_dataset_is_refused_unless_skipped(tmp_path, tiny_overrides, capsys, monkeypatch):
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

    # Under torchrun every rank reads the data: only rank 0 says what it skips.
    recipe = load_recipe(QUICKSTART, [*disk, "data.skip_bad_episodes=true"])
    for rank, says in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert checked_skip_list(recipe) == {1}
        assert ("skipping 1 episode(s)" in capsys.readouterr().out) is says


def test_skipped_episode_is_left_out_of_shipped_stats_checks(tmp_path, tiny_overrides, capsys):
    """A v2.1 dataset ships its stats; with one episode's data file gone and skipping on, the
    run trains on the rest (the stats comparison must not read the skipped episode)."""
    source = SyntheticReader(episodes=4, episode_length=10, image_size=32)
    ds = write_lerobot(source, tmp_path / "v21", video=False, version="v2.1")
    (ds / "data/chunk-000/episode_000002.parquet").unlink()
    disk = ["data.format=lerobot", f"data.path={ds}", "data.text_key=narration", "train.steps=2"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, "data.skip_bad_episodes=true"]) == 0
    assert "skipping 1 episode(s): [2]" in capsys.readouterr().out


class ValidationOutlier(SyntheticReader):
    """Episode 4 moves action dim 0 by +5, about 100x its spread elsewhere."""

    def numeric(self, episode_index: int) -> EpisodeArrays:
        arrays = super().numeric(episode_index)
        if episode_index == 4:
            arrays.action[:, 0] += 5.0
        return arrays


def test_checkpoint_stats_come_from_the_training_episodes_of_a_dataset_with_a_stats_file(tmp_path, tiny_overrides):
    """LeRobot datasets ship stats over every episode; the run's norm_stats.json (what resume, eval
    and the policy normalise with) holds the training episodes' alone, validation episode 4 left out."""
    source = ValidationOutlier(episodes=6, episode_length=10, image_size=32)
    ds = write_lerobot(source, tmp_path / "ds", video=False)
    disk = ["data.format=lerobot", f"data.path={ds}", "data.text_key=narration", "data.normalize=q01_q99"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, "data.val_episodes=[4]", "train.steps=2"]) == 0
    saved = json.loads(next((tmp_path / "run").rglob("norm_stats.json")).read_text())["stats"]["action"]
    x = np.concatenate([source.numeric(e).action for e in (0, 1, 2, 3, 5)]).astype(np.float64)
    np.testing.assert_allclose(saved["q99"], np.quantile(x, 0.99, axis=0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(saved["q01"], np.quantile(x, 0.01, axis=0), rtol=1e-5, atol=1e-6)
    assert saved["q99"][0] < 1.0  # with episode 4's actions it would be about 5


def test_a_dataset_naming_another_gripper_dim_is_refused_in_one_line(tmp_path, tiny_overrides, capsys):
    """info.json names action dim 0 the gripper, the recipe's gripper head trains dim 2: refused,
    naming loss.gripper.dims, the dataset's dims and the override; the override then trains."""
    ds = write_lerobot(SyntheticReader(episodes=6, episode_length=10, image_size=32), tmp_path / "ds", video=False)
    info = json.loads((ds / "meta/info.json").read_text())
    info["features"]["action"]["names"] = ["gripper.pos", "shoulder.pos", "elbow.pos"]
    (ds / "meta/info.json").write_text(json.dumps(info))
    disk = ["data.format=lerobot", f"data.path={ds}", "data.text_key=narration", "train.steps=2"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk]) == 2
    err = capsys.readouterr().err
    message = f"loss.gripper.dims: [2], but {ds} has its gripper at action dim(s) [0]; set loss.gripper.dims=[0]"
    assert message in err and "model.gripper_head=false" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, "loss.gripper.dims=[0]"]) == 0


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


def test_an_hdf5_key_naming_no_dataset_is_one_line_with_the_keys(tmp_path, tiny_overrides, capsys):
    rm = _robomimic(tmp_path)
    disk = ["data.format=hdf5", f"data.path={rm}", "data.state_key=state", "data.text_key=narration", "train.steps=2"]
    for override, message in (
        ("data.state_key=stat", f"data.state_key: 'stat' is not a key of {rm} (did you mean 'obs/state'?)"),
        ("data.action_key=actoins", f"data.action_key: 'actoins' is not a key of {rm} (did you mean 'actions'?)"),
        ("data.text_key=naration", f"data.text_key: 'naration' is not a key of {rm} (did you mean 'narration'?)"),
        ("data.cameras=[top_img]", "data.cameras: unknown camera(s) ['top_img'] (did you mean 'top_image'?)"),
    ):
        assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, override]) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert "keys: obs/state, obs/top_image, actions, dones, narration, rewards" in err or "valid: top_image" in err


def test_an_hdf5_path_of_another_layout_is_one_line_naming_it(tmp_path, tiny_overrides, capsys):
    """A file without robomimic's 'data' group, a directory without ALOHA episode files: the path is
    not a dataset of data.layout, one line naming it and what the layout expects, no traceback."""
    no_data = tmp_path / "no_data.hdf5"
    with h5py.File(no_data, "w") as f:
        f["actions"] = np.zeros((4, 7), np.float32)
    (empty := tmp_path / "empty").mkdir()
    for layout, path, expected in (
        ("robomimic", no_data, "no 'data' group"),
        ("aloha", empty, "no episode_<i>.hdf5 files"),
    ):
        disk = ["data.format=hdf5", f"data.path={path}", f"data.layout={layout}", "data.text_key=narration"]
        assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert err.startswith("vla-ft train: error: ") and f"data.path: {path}: " in err, err
        assert expected in err and f"the {layout} layout" in err, err


def test_check_of_a_missing_path_is_one_line_naming_it(tmp_path, capsys):
    """Was "1 problem(s)" and exit 1, as if a dataset had been checked."""
    assert cli(["data", "check", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"vla-ft data check: error: dataset not found: {tmp_path / 'nope'}", err


def test_check_of_a_directory_of_another_format_is_one_line_naming_the_missing_file(tmp_path, capsys):
    """Was exit 1 with a list of one problem that did not say the directory is no dataset of --format."""
    for args, missing in (([], "no meta/info.json"), (["--format", "rlds", "--fps", "5"], "no dataset_info.json")):
        assert cli(["data", "check", str(tmp_path), *args]) == 2
        err = capsys.readouterr().err
        fmt = args[1] if args else "lerobot"
        assert f"vla-ft data check: error: {tmp_path}: not a {fmt} dataset ({missing}" in err, err
        assert len(err.strip().splitlines()) == 1


def test_check_of_a_file_that_is_not_hdf5_is_one_line_naming_it(tmp_path, capsys):
    """A text file checked with --format hdf5 (either layout) is no HDF5 dataset: one line naming the
    file, exit 2, as the other formats say so (was an 'unreadable' problem, exit 1). A damaged HDF5
    file (its signature there, its body cut short) is still a problem of the dataset: exit 1."""
    notes = tmp_path / "notes.hdf5"
    notes.write_text("not a dataset")
    for layout in ("robomimic", "aloha"):
        assert cli(["data", "check", str(notes), "--format", "hdf5", "--layout", layout]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"vla-ft data check: error: {notes}: not a hdf5 dataset ("), err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    cut = tmp_path / "cut.hdf5"
    cut.write_bytes(_robomimic(tmp_path).read_bytes()[:2048])
    assert cli(["data", "check", str(cut), "--format", "hdf5"]) == 1
    assert "[unreadable]" in capsys.readouterr().err


def test_check_reports_frames_without_text_given_the_text_key(tmp_path, capsys):
    """--text-key, as data.text_key for training's check: a frame without narration is a missing_text
    problem of its episode, in the same words for LeRobot and RLDS; without it the text is not read."""
    from conftest import lerobot_with_a_null_narration

    from robot_data.rlds_writer import write_rlds

    source = lerobot_with_a_null_narration(tmp_path / "lr")
    rlds = write_rlds(source, tmp_path / "rlds" / "1.0.0")
    message = "(episode 0): narration: 1 null text cell(s), first at frame 1 (no language target there)"
    for args in ([str(source.path)], [str(rlds), "--format", "rlds", "--fps", "10"]):
        assert cli(["data", "check", *args]) == 0
        capsys.readouterr()
        assert cli(["data", "check", *args, "--text-key", "narration"]) == 1
        err = capsys.readouterr().err
        assert "[missing_text] " in err and message in err and "1 problem(s) in 1 episode(s) [0]" in err, err


def test_check_with_a_mistyped_key_is_one_line_with_the_features(tmp_path, capsys):
    ds, rm = _synth(tmp_path), _robomimic(tmp_path)
    aloha = write_aloha(SyntheticReader(episodes=2, episode_length=4, image_size=16), tmp_path / "aloha")
    capsys.readouterr()
    features = "; features: observation.state, action, observation.images.top, narration"
    keys = "; keys: observations/images, observations/qpos, observations/qvel, action, narration"
    for args, message in (
        ([ds, "--state-key", "observation.stat"], f"'observation.stat' is not a feature of {ds} (did you mean"),
        ([ds, "--action-key", "actoin"], f"'actoin' is not a feature of {ds} (did you mean 'action'?){features}"),
        ([rm, "--format", "hdf5", "--state-key", "stat"], f"'stat' is not a key of {rm} (did you mean 'obs/state'?)"),
        (
            [aloha, "--format", "hdf5", "--layout", "aloha", "--action-key", "actoin"],
            f"'actoin' is not a key of {aloha} (did you mean 'action'?){keys}",
        ),
    ):
        assert cli(["data", "check", *map(str, args)]) == 2
        err = capsys.readouterr().err
        flag = next(a for a in args if str(a).endswith("-key"))
        assert f"vla-ft data check: error: command line: {flag}: {message}" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert cli(["data", "check", str(rm), "--format", "hdf5"]) == 2  # the layout's default key: no option blamed
    err = capsys.readouterr().err
    assert f"{rm}: the robomimic layout's default state_key: 'obs/robot0_eef_pos' is not a key" in err, err
    assert err.strip().endswith("name yours with --state-key") and "command line" not in err
    for path in (rm, aloha):  # HDF5 checked as LeRobot: no LeRobot dataset, and what to run instead
        assert cli(["data", "check", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"{path}: not a lerobot dataset (no meta/info.json); it holds HDF5 data: use --format hdf5" in err


def test_convert_and_check_name_what_is_wrong_in_one_line(tmp_path, capsys):
    """A path that is no dataset of --format, a mistyped key for convert, a rate that is no rate,
    --fps for LeRobot (it records its own): one line, exit 2, never a traceback."""
    ds, text, out = _synth(tmp_path), tmp_path / "notes.txt", str(tmp_path / "o")
    text.write_text("not a dataset")
    capsys.readouterr()
    for args, message in (
        (["check", str(tmp_path), "--format", "hdf5"], f"{tmp_path}: not a hdf5 dataset (a directory without .hdf5"),
        (["convert", str(text), out, "--format", "hdf5"], f"{text}: not a hdf5 dataset (unreadable"),
        (["convert", str(ds), out, "--format", "lerobot", "--state-key", "nope"], "--state-key: 'nope'"),
        (["convert", str(ds), out, "--format", "lerobot", "--fps", "3"], "--fps: a LeRobot dataset"),
        (["convert", str(ds), out, "--format", "hdf5", "--fps", "-5"], "--fps: must be a number > 0"),
    ):
        assert _exit_code(["data", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def _exit_code(args: list[str]) -> int:
    """What the command line exits with, argparse's own refusals (SystemExit) included."""
    try:
        return cli(args)
    except SystemExit as exit:
        return int(exit.code)


def test_robomimic_filter_keys_choose_the_split(tmp_path, tiny_overrides, capsys):
    """data.train_filter / data.val_filter take the split robomimic ships (mask/<key>)."""
    from vla_ft.data import build_reader, split_train_val

    rm = _robomimic(tmp_path)  # episodes 0..5
    with h5py.File(rm, "a") as f:
        f["mask/train"] = np.array([b"demo_3", b"demo_0", b"demo_1", b"demo_2"])
        f["mask/valid"] = np.array([b"demo_4", b"demo_5"])
        f["mask/half"] = np.array([b"demo_0", b"demo_2", b"demo_4"])
    disk = ["data.format=hdf5", f"data.path={rm}", "data.state_key=state", "data.text_key=narration"]

    def split(*overrides: str, episodes: tuple[int, ...] = (0, 1, 2, 3, 4, 5)) -> tuple[list[int], list[int]]:
        recipe = load_recipe(QUICKSTART, [*tiny_overrides, *disk, *overrides])
        return split_train_val(recipe, build_reader(recipe), list(episodes))

    assert split("data.train_filter=train", "data.val_filter=valid") == ([0, 1, 2, 3], [4, 5])
    assert split("data.val_filter=valid") == ([0, 1, 2, 3], [4, 5])
    assert split("data.val_filter=valid", episodes=(0, 1, 2, 4)) == ([0, 1, 2], [4])  # 3 and 5 failed checks
    train, val = split("data.train_filter=half", "data.val_ratio=0.34")
    assert sorted(train + val) == [0, 2, 4] and len(val) == 1
    for overrides, message in (
        (["data.val_filter=vaild"], "data.val_filter: no filter key 'vaild' (did you mean 'valid'?); the dataset has"),
        (["data.train_filter=half", "data.val_filter=valid"], "'half' and data.val_filter 'valid' share episodes [4]"),
        (["data.val_filter=valid", "data.val_episodes=[1]"], "data.val_filter and data.val_episodes both choose"),
    ):
        assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, *overrides, "train.steps=2"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, "data.val_filter=valid", "train.steps=2"]) == 0


def test_a_split_with_nothing_to_train_on_is_one_line(tmp_path, tiny_overrides, capsys):
    from vla_ft.config import RecipeError
    from vla_ft.data import build_reader, split_train_val

    assert cli(["train", str(QUICKSTART), *tiny_overrides, "data.val_episodes=[9999]", "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert "data.val_episodes: unknown episode(s) [9999]; the dataset has episodes 0.." in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    hdf5 = ["data.format=hdf5", f"data.path={_robomimic(tmp_path)}", "data.state_key=state", "data.text_key=narration"]
    recipe = load_recipe(QUICKSTART, [*tiny_overrides, *hdf5])
    with pytest.raises(RecipeError, match="no episode left to train on: every episode of .* failed its checks"):
        split_train_val(recipe, build_reader(recipe), [])  # every episode skipped by data.skip_bad_episodes


def test_a_mask_naming_a_missing_demo_is_one_line_naming_the_key_and_file(tmp_path, tiny_overrides, capsys):
    rm = _robomimic(tmp_path)
    with h5py.File(rm, "a") as f:
        f["mask/train"] = np.array([b"demo_0", b"demo_1", b"demo_2", b"demo_3"])
        f["mask/valid"] = np.array([b"demo_4", b"demo_99"])
    disk = ["data.format=hdf5", f"data.path={rm}", "data.state_key=state", "data.text_key=narration", "train.steps=2"]
    for key, name in (("val_filter", "valid"), ("train_filter", "train")):
        assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, f"data.{key}={name}"]) == 2
        err = capsys.readouterr().err
        assert f"data.{key}: {rm}: mask/valid names demos the file lacks: ['demo_99']" in err, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_validation_episode_skipped_as_bad_is_named_as_such(tmp_path, tiny_overrides, capsys):
    rm = _robomimic(tmp_path)
    with h5py.File(rm, "a") as f:
        del f["data/demo_3/obs/top_image"]
    disk = ["data.format=hdf5", f"data.path={rm}", "data.state_key=state", "data.text_key=narration", "train.steps=2"]
    skip = ["data.skip_bad_episodes=true", "data.val_episodes=[3,4]"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, *skip]) == 2
    err = capsys.readouterr().err
    message = (
        f"data.val_episodes: episode(s) [3] failed their checks and data.skip_bad_episodes leaves them out "
        f"(vla-ft data check {rm}); drop them from data.val_episodes"
    )
    assert message in err and "unknown" not in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("option", "value", "least"), [("--episodes", "0", 1), ("--length", "-2", 1), ("--image-size", "4", 8)]
)
def test_synth_refuses_a_size_out_of_range_naming_the_option(tmp_path, capsys, option, value, least):
    """``data synth --episodes 0`` ended in a ValueError traceback that named no option."""
    with pytest.raises(SystemExit) as info:
        cli(["data", "synth", str(tmp_path / "ds"), option, value])
    assert info.value.code == 2
    assert f"argument {option}: must be an integer >= {least}, got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("value", ["-1", str(2**32)])
def test_synth_refuses_a_seed_out_of_range_naming_the_option(tmp_path, capsys, value):
    """``data synth --seed -1`` ended in numpy's ValueError traceback."""
    assert _exit_code(["data", "synth", str(tmp_path / "ds"), "--seed", value]) == 2
    assert f"argument --seed: must be an integer in [0, 2**32), got '{value}'" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()
