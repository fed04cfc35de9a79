"""Several datasets of one robot trained as one: a robomimic directory (a LIBERO suite, one file
per task) and ``data.mix`` (named sources, optionally weighted)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import QUICKSTART
from train_helpers import tiny_run

from robot_data import MixtureReader, SyntheticReader, build_reader, check_dataset, split_episodes
from robot_data.hdf5_writer import write_robomimic
from robot_data.lerobot_writer import write_lerobot
from robot_data.reader import DatasetFormatError
from vla_ft.cli import main as cli
from vla_ft.config import RecipeError, load_recipe
from vla_ft.data import build_data
from vla_ft.feature_cache import data_files
from vla_ft.run_setup import _default_tokenizer, setup, teardown
from vla_ft.samplers import EpochSampler, ValidationSampler, sample_sources, validation_samples
from vla_ft.tokenizer import load_tokenizer

LENGTH = 10
TASKS = {"pick_bowl": "pick up the black bowl", "open_drawer": "open the top drawer"}


def _task_file(path: Path, instruction: str, seed: int, episodes: int = 4) -> Path:
    """A LIBERO-style robomimic file: demos without a task attribute, the instruction in
    ``data.attrs["problem_info"]``, a ``mask/valid`` filter key naming demo_1."""
    write_robomimic(SyntheticReader(episodes=episodes, episode_length=LENGTH, image_size=32, seed=seed), path)
    with h5py.File(path, "a") as f:
        for demo in f["data"].values():
            del demo.attrs["task"]
        f["data"].attrs["problem_info"] = json.dumps({"language_instruction": instruction})
        f["mask/valid"] = np.array([b"demo_1"])
    return path


def _suite(root: Path) -> Path:
    root.mkdir()
    for seed, (name, instruction) in enumerate(TASKS.items()):
        _task_file(root / f"{name}_demo.hdf5", instruction, seed)
    return root


def _tokenizer(recipe):
    return load_tokenizer(_default_tokenizer(recipe))


def _demo(path: Path, demo: int, key: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[f"data/demo_{demo}/{key}"][()]


def test_a_robomimic_directory_reads_as_its_files_numbered_one_after_another(tmp_path):
    suite = _suite(tmp_path / "libero_spatial")
    reader = build_reader("hdf5", path=str(suite), state_key="state")
    assert isinstance(reader, MixtureReader) and list(reader.sources) == ["open_drawer_demo", "pick_bowl_demo"]
    assert reader.offsets == {"open_drawer_demo": 0, "pick_bowl_demo": 4}
    assert [(e.index, e.task) for e in reader.episodes()] == [
        *[(i, TASKS["open_drawer"]) for i in range(4)],
        *[(4 + i, TASKS["pick_bowl"]) for i in range(4)],
    ]
    second = suite / "pick_bowl_demo.hdf5"
    arrays = reader.numeric(5)  # pick_bowl's demo_1, read against h5py
    np.testing.assert_array_equal(arrays.action, _demo(second, 1, "actions"))
    np.testing.assert_array_equal(arrays.state, _demo(second, 1, "obs/state"))
    np.testing.assert_array_equal(reader.frames(5, "top_image", [3, 0]), _demo(second, 1, "obs/top_image")[[3, 0]])
    assert reader.location(5) == f"pick_bowl_demo: {second}:data/demo_1"
    assert reader.episode_filters() == {"valid": [1, 5]}
    assert reader.fps == 10.0 and reader.cameras == ["top_image"] and reader.gripper_dims == [2]
    with pytest.raises(IndexError, match="no episode 8"):
        reader.numeric(8)


def test_the_checks_number_episodes_as_the_reader_and_training_skips_them(tmp_path, tiny_overrides, capsys):
    suite = _suite(tmp_path / "suite")
    with h5py.File(suite / "pick_bowl_demo.hdf5", "a") as f:
        f["data/demo_2/actions"][3, 1] = np.nan
    problems = check_dataset(suite, "hdf5", state_key="state")
    assert [(p.kind, p.episode, p.file) for p in problems] == [
        ("non_finite", 6, f"{suite / 'pick_bowl_demo.hdf5'}:data/demo_2")
    ]
    disk = ["data.format=hdf5", f"data.path={suite}", "data.state_key=state", "data.text_key=narration"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, "train.steps=1"]) == 2
    err = capsys.readouterr().err
    assert "data.path: " in err and "(episode 6): action has 1 NaN/inf value(s), first at frame 3 dim 1" in err
    recipe = load_recipe(QUICKSTART, [*tiny_overrides, *disk, "data.skip_bad_episodes=true"])
    data = build_data(recipe, _tokenizer(recipe))
    assert 6 not in data.train_episodes + data.val_episodes
    assert sorted(data.train_episodes + data.val_episodes) == [0, 1, 2, 3, 4, 5, 7]


def _mix(a: Path, b: Path, *weights: float) -> list[str]:
    out = ["data.format=hdf5", "data.state_key=state", "data.text_key=narration", "data.val_ratio=0.25"]
    for name, path, weight in zip(("a", "b"), (a, b), weights or (None, None), strict=True):
        out += [f"data.mix.{name}.path={path}"] + ([f"data.mix.{name}.weight={weight}"] if weight else [])
    return out


def test_a_mixture_normalises_over_both_sources_and_validates_on_each(tmp_path, tiny_overrides, capsys):
    a = _task_file(tmp_path / "a.hdf5", "task a", seed=1, episodes=8)
    b = _task_file(tmp_path / "b.hdf5", "task b", seed=2, episodes=4)
    recipe = load_recipe(QUICKSTART, [*tiny_overrides, *_mix(a, b), "data.normalize=mean_std"])
    data = build_data(recipe, _tokenizer(recipe))
    assert data.train_weights is None  # no weights: every frame as likely, as for one dataset
    out = capsys.readouterr().out
    assert "data: a: episodes 0..7 (8 episodes, 80 frames)" in out and "data: b: episodes 8..11 (4 episodes" in out
    # every source validates: each is split on its own (a's 8 episodes, then b's 4 as ids 8..11)
    val_a, val_b = (split_episodes(range(n), 0.25, (), recipe.train.seed)[1] for n in (8, 4))
    assert data.val_episodes == val_a + [8 + e for e in val_b] and len(val_a) == 2 and len(val_b) == 1
    # the statistics are those of the training frames of both files (read with h5py)
    files = [(a, e) if e < 8 else (b, e - 8) for e in data.train_episodes]
    state = np.concatenate([_demo(f, e, "obs/state") for f, e in files])
    stats = data.normalizer.stats["state"]
    np.testing.assert_allclose(stats["mean"], state.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["std"], state.std(0), rtol=1e-4, atol=1e-6)
    sample = data.train_set[len(data.train_set) - 1]  # b's last training frame, through the pipeline
    last = files[-1]
    want = (_demo(*last, "obs/state")[-1] - stats["mean"]) / stats["std"]
    np.testing.assert_allclose(sample["state"][-1].numpy(), want, rtol=1e-4, atol=1e-5)


def test_val_batches_keep_a_sample_of_every_source(tmp_path, tiny_overrides):
    """Three sources, the middle one small: 4 samples spread over all validation frames stepped over
    b's 10, and val/mix/b/... was never logged. Each source gets its share, at least one sample."""
    a, b, c = (
        _task_file(tmp_path / f"{n}.hdf5", f"task {n}", seed=i, episodes=k)
        for i, (n, k) in enumerate((("a", 32), ("b", 4), ("c", 36)))
    )
    mix = ["data.format=hdf5", "data.state_key=state", "data.text_key=narration", "data.val_ratio=0.25"]
    mix += [f"data.mix.{n}.path={p}" for n, p in zip("abc", (a, b, c), strict=True)]
    recipe = load_recipe(QUICKSTART, [*tiny_overrides, *mix, "train.batch_size=4", "train.val_batches=1"])
    data = build_data(recipe, _tokenizer(recipe))

    def sources_of(sampler: ValidationSampler) -> list[str]:
        return [data.val_set.reader.source_name(data.val_set.locate(i)[0].index) for i in sampler.indices]

    whole = ValidationSampler(len(data.val_set), validation_samples(recipe))  # the spread over the whole set
    assert "b" not in sources_of(whole)
    sampler = ValidationSampler(len(data.val_set), validation_samples(recipe), sample_sources(data.val_set))
    assert sorted(set(sources_of(sampler))) == ["a", "b", "c"] and len(sampler) in (4, 5)
    assert sampler.indices == sorted(set(sampler.indices))  # in order, none twice
    run = setup(recipe)  # what training validates on
    try:
        assert run.val_loader.sampler.indices == sampler.indices
    finally:
        teardown(run)


def test_weights_set_each_sources_share_of_the_samples(tmp_path, tiny_overrides):
    a = _task_file(tmp_path / "a.hdf5", "task a", seed=1, episodes=8)
    b = _task_file(tmp_path / "b.hdf5", "task b", seed=2, episodes=4)
    recipe = load_recipe(QUICKSTART, [*tiny_overrides, *_mix(a, b, 1.0, 3.0)])
    data = build_data(recipe, _tokenizer(recipe))
    weights = data.train_weights
    owner = np.repeat([e >= 8 for e in data.train_episodes], LENGTH)  # True: a frame of b
    assert weights is not None and len(weights) == len(data.train_set) == len(owner)
    assert float(weights[owner].sum() / weights.sum()) == pytest.approx(0.75)  # b: 3 / (1 + 3)
    assert torch.unique(weights[owner]).numel() == 1 and torch.unique(weights[~owner]).numel() == 1
    drawn = []
    sampler = EpochSampler(len(weights), seed=0, shuffle=True, weights=weights)
    for epoch in range(20):
        sampler.set_epoch(epoch)
        drawn += [i for _, i, _ in sampler]
    assert len(drawn) == 20 * len(weights)
    assert abs(owner[drawn].mean() - 0.75) < 0.03  # b holds 4 of 12 episodes, a third of the frames
    assert abs(owner[drawn].mean() - owner.mean()) > 0.3


def test_a_weighted_epoch_shards_and_resumes_like_a_permutation():
    weights = torch.rand(50, generator=torch.Generator().manual_seed(0)).double()
    one = EpochSampler(50, seed=3, shuffle=True, weights=weights)
    one.set_epoch(2)
    order = [i for _, i, _ in one]
    ranks = [EpochSampler(50, seed=3, shuffle=True, rank=r, world_size=2, weights=weights) for r in range(2)]
    for r in ranks:
        r.set_epoch(2)
    shards = [[i for _, i, _ in r] for r in ranks]
    assert [i for pair in zip(*shards, strict=True) for i in pair] == order  # global order kept on 2 ranks
    one.set_epoch(2, consumed=20)
    assert [i for _, i, _ in one] == order[20:] and len(one) == 30
    assert len(set(order)) < 50  # drawn with replacement
    with pytest.raises(ValueError, match="weights: 49 for 50 samples"):
        EpochSampler(50, seed=3, shuffle=True, weights=weights[:49])


def test_a_sample_drawn_again_in_a_weighted_epoch_is_augmented_anew():
    """An up-weighted small source repeats its frames within an epoch: each repeat gets its own crop
    and jitter (seeded by how many times the frame was drawn before), still the same on a resume."""
    from robot_data import Normalizer, RobotDataset, compute_stats
    from vla_ft.samplers import EpochDataset

    reader = SyntheticReader(episodes=4, episode_length=10, image_size=32)
    augment = {"crop_scale": (0.5, 1.0), "color_jitter": 0.3}
    norm = Normalizer(compute_stats(reader, range(4)), "mean_std", [2])
    dataset = EpochDataset(RobotDataset(reader, [0, 1, 2, 3], 2, 1, norm, 24, None, augment=augment, train=True))
    sampler = EpochSampler(40, seed=0, shuffle=True, weights=torch.tensor([0.9] * 10 + [1 / 30] * 30).double())
    keys = list(sampler)
    index = max(range(40), key=[i for _, i, _ in keys].count)
    repeats = [key for key in keys if key[1] == index]
    assert [draw for *_, draw in repeats] == list(range(len(repeats))) and len(repeats) > 3
    images = [dataset[key]["images"].numpy().tobytes() for key in repeats]
    assert len(set(images)) == len(repeats)
    assert dataset[repeats[1]]["images"].numpy().tobytes() == images[1]  # the same key: the same sample


def test_weighted_draws_beyond_torch_multinomials_limit():
    """More than 2^24 frames (torch.multinomial's limit): two indices on either side of it hold all the
    weight, 3 : 1; the draws follow it and repeat with the seed."""
    from vla_ft.samplers import MULTINOMIAL_LIMIT, weighted_draws

    n = MULTINOMIAL_LIMIT + 3
    weights = torch.zeros(n, dtype=torch.float64)
    weights[5], weights[n - 1] = 3.0, 1.0
    draws = weighted_draws(weights, 4000, torch.Generator().manual_seed(0))
    assert set(draws) == {5, n - 1}
    assert draws.count(n - 1) / 4000 == pytest.approx(0.25, abs=0.03)
    assert weighted_draws(weights, 4000, torch.Generator().manual_seed(0)) == draws
    small = torch.rand(50, generator=torch.Generator().manual_seed(1)).double()  # below it: multinomial's stream
    g1, g2 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
    assert weighted_draws(small, 30, g1) == torch.multinomial(small, 30, replacement=True, generator=g2).tolist()


def test_sources_of_another_robot_are_refused_naming_the_source(tmp_path, tiny_overrides):
    a = _task_file(tmp_path / "a.hdf5", "task a", seed=1)
    b = _task_file(tmp_path / "b.hdf5", "task b", seed=2)
    with h5py.File(b, "a") as f:
        f["data"].attrs["fps"] = 20.0
    with pytest.raises(RecipeError, match=r"data\.mix\.b: 20 fps, but a has 10: one action chunk"):
        build_data(load_recipe(QUICKSTART, [*tiny_overrides, *_mix(a, b)]), None)
    c = _task_file(tmp_path / "c.hdf5", "task c", seed=3)
    with h5py.File(c, "a") as f:  # a robot with one more joint
        for demo in f["data"].values():
            state = demo["obs/state"][()]
            del demo["obs/state"]
            demo["obs/state"] = np.concatenate([state, state[:, :1]], axis=1)
    recipe = load_recipe(QUICKSTART, [*tiny_overrides, *_mix(a, c)])
    with pytest.raises(RecipeError, match=r"data\.mix\.b: state/action dims \(4, 3\), but data\.mix\.a has \(3, 3\)"):
        build_data(recipe, _tokenizer(recipe))
    with pytest.raises(DatasetFormatError, match="^second: gripper at action dim"):
        MixtureReader({"first": build_reader("hdf5", path=str(a), state_key="state"), "second": _Gripper()})


class _Gripper(SyntheticReader):
    def __init__(self):
        super().__init__(episodes=2, episode_length=4, image_size=16)
        self.fps, self.gripper_dims = 10.0, [1]


def test_recipe_errors_of_a_mixture(tmp_path, tiny_overrides):
    cases = {
        ("data.format=hdf5", "data.path=x.hdf5", "data.mix.a.path=y"): "data.mix: replaces data.path",
        ("data.format=hdf5", "data.mix.a.path=y", "data.mix.b.weight=2"): "data.mix.b.path: required",
        ("data.format=hdf5", "data.mix.a.path=y", "data.mix.b.path=z", "data.mix.b.weight=2"): (
            "data.mix.a.weight: set a weight on every source or on none"
        ),
        ("data.format=hdf5", "data.mix.a.path=y", "data.mix.a.weight=0"): "data.mix.a.weight: must be finite and > 0",
        ("data.mix.a.path=y",): "data.mix: a is not read with data.format=synthetic",
        ("data.format=hdf5", "data.mix.a.paht=y"): "unknown key 'data.mix.a.paht' (did you mean 'data.mix.a.path'?)",
        ("data.format=hdf5", "data.mix.ab.path=y", "train.best_metric=val/mix/a/action_l1"): (
            "'val/mix/a/action_l1' is not a validation metric of this recipe (did you mean 'val/mix/ab/action_l1'?)"
        ),
    }
    for overrides, message in cases.items():
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe(QUICKSTART, [*tiny_overrides, "data.text_key=narration", *overrides])
    recipe = load_recipe(QUICKSTART, [*tiny_overrides, *_mix(tmp_path / "none.hdf5", tmp_path / "b.hdf5")])
    with pytest.raises(RecipeError, match=r"data\.mix\.a\.path: HDF5 dataset not found: .*none\.hdf5"):
        build_data(recipe, None)


def test_a_mixture_trains_resumes_and_refuses_another_mixture(tmp_path):
    a = _task_file(tmp_path / "a.hdf5", "task a", seed=1)
    b = _task_file(tmp_path / "b.hdf5", "task b", seed=2)
    run_dir = tmp_path / "run"
    mix = [*_mix(a, b, 1.0, 2.0), "train.best_metric=val/mix/b/action_l1"]
    assert cli(["train", str(QUICKSTART), *_fast(run_dir), *mix, "train.steps=2", "train.val_every=2"]) == 0
    assert cli(["eval", str(run_dir), "--episodes", "all"]) == 0  # the mixture, as trained
    report = json.loads((run_dir / "checkpoints" / "step_000002" / "eval" / "metrics.json").read_text())
    assert report["episodes"] == list(range(8))
    for name, ids in (("a", "0,1,2,3"), ("b", "4,5,6,7")):  # each source's metrics: those of its episodes alone
        alone = tmp_path / f"eval_only_{name}"
        assert cli(["eval", str(run_dir), "--episodes", ids, "--out", str(alone)]) == 0
        metrics = json.loads((alone / "metrics.json").read_text())["metrics"]
        for key in ("action_l1", "action_mse", "baseline_l1", "gripper_acc", "gripper_f1"):
            assert report["metrics"][f"mix/{name}/{key}"] == pytest.approx(metrics[key], rel=1e-9), key
    assert report["metrics"]["mix/a/action_l1"] != pytest.approx(report["metrics"]["mix/b/action_l1"])
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("val/mix/b/gripper_acc" in row for row in logged)  # validation logs them too
    out = tmp_path / "eval_b"  # one dataset in place of the mixture: its own episode ids
    assert cli(["eval", str(run_dir), f"data.path={b}", "--episodes", "all", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["episodes"] == list(range(4))
    run = tiny_run(run_dir, *mix, "train.steps=4", "train.resume=true")
    assert run.sampler.weights is not None and run.state.step == 2
    with pytest.raises(RecipeError, match=r"data\.mix\.b\.weight: 2\.0 -> 3\.0"):
        tiny_run(run_dir, *_mix(a, b, 1.0, 3.0), "train.steps=4", "train.resume=true")
    same = _mix(a, b, 1.0, 2.0)  # the same sources, b first: b's episodes would become 0..3
    with pytest.raises(RecipeError, match=re.escape("data.mix: sources in order ['a', 'b'] -> ['b', 'a']")):
        tiny_run(run_dir, *same[:4], *same[6:], *same[4:6], *mix[8:], "train.steps=4", "train.resume=true")


def _fast(run_dir: Path) -> list[str]:
    from train_helpers import FAST

    return [*FAST, f"output_dir={run_dir}"]


def test_the_feature_cache_fingerprint_covers_every_source(tmp_path, tiny_overrides):
    a = _task_file(tmp_path / "a.hdf5", "task a", seed=1)
    b = _task_file(tmp_path / "b.hdf5", "task b", seed=2)
    recipe = load_recipe(QUICKSTART, [*tiny_overrides, *_mix(a, b)])
    before = data_files(recipe)
    assert [name for name, _, _ in before] == ["data.mix.a.path:a.hdf5", "data.mix.b.path:b.hdf5"]
    with h5py.File(b, "a") as f:
        f["data/demo_0/actions"][0, 0] += 1.0
    assert data_files(recipe) != before


def test_a_mixture_of_lerobot_datasets(tmp_path, tiny_overrides):
    """Two recording sessions as two LeRobot datasets (one as H.264 video, with a frame cache)."""
    sessions = [SyntheticReader(episodes=3, episode_length=LENGTH, image_size=32, seed=s) for s in (0, 1)]
    write_lerobot(sessions[0], tmp_path / "monday", video=False)
    write_lerobot(sessions[1], tmp_path / "tuesday", video=True)
    disk = ["data.format=lerobot", "data.text_key=narration", f"data.frame_cache={tmp_path / 'cache'}"]
    disk += [f"data.mix.{day}.path={tmp_path / day}" for day in ("monday", "tuesday")]
    recipe = load_recipe(QUICKSTART, [*tiny_overrides, *disk])
    data = build_data(recipe, _tokenizer(recipe))
    reader = data.reader
    assert reader.offsets == {"monday": 0, "tuesday": 3} and len(data.train_set) + len(data.val_set) == 60
    np.testing.assert_array_equal(reader.numeric(4).action, sessions[1].numeric(1).action)
    camera = reader.cameras[0]
    np.testing.assert_array_equal(reader.frames(1, camera, [2]), sessions[0].frames(1, sessions[0].cameras[0], [2]))
    decoded = reader.frames(4, camera, [2]).astype(int)  # lossy video: close to the rendered frame
    assert np.abs(decoded - sessions[1].frames(1, sessions[1].cameras[0], [2])).mean() < 8.0


def test_a_source_name_with_a_dot_or_a_slash_is_refused(tmp_path, tiny_overrides):
    """'x.a' and 'x.b' would both read as source 'x' (the second replacing the first); 'a/1' would
    make val/mix/a/1/action_l1 ambiguous."""
    from vla_ft.config import apply_overrides, read_yaml, recipe_from_dict

    for names in (("x.a", "x.b"), ("a/1", "b")):
        raw = apply_overrides(read_yaml(QUICKSTART), [*tiny_overrides, "data.format=hdf5"])
        raw["data"]["mix"] = {name: {"path": str(tmp_path / f"{i}.hdf5")} for i, name in enumerate(names)}
        with pytest.raises(RecipeError, match=re.escape(f"data.mix.{names[0]}: a source name may not hold")):
            recipe_from_dict(raw)


def test_a_best_metric_of_a_source_without_validation_episodes_is_refused_before_training(tmp_path, tiny_overrides):
    a = _task_file(tmp_path / "a.hdf5", "task a", seed=1)
    b = _task_file(tmp_path / "b.hdf5", "task b", seed=2)
    mix = [*tiny_overrides, *_mix(a, b), "data.val_episodes=[0]"]  # validation: a's demo_0 only
    recipe = load_recipe(QUICKSTART, [*mix, "train.best_metric=val/mix/b/action_l1"])
    with pytest.raises(RecipeError, match=r"train\.best_metric: 'val/mix/b/action_l1' is never logged: data\.mix\.b"):
        build_data(recipe, _tokenizer(recipe))
    recipe = load_recipe(QUICKSTART, [*mix, "train.best_metric=val/mix/a/action_l1"])
    assert build_data(recipe, _tokenizer(recipe)).val_episodes == [0]


def test_cameras_a_source_lacks_are_named(tmp_path, tiny_overrides):
    a = _task_file(tmp_path / "a.hdf5", "task a", seed=1)
    b = _task_file(tmp_path / "b.hdf5", "task b", seed=2)
    with h5py.File(b, "a") as f:  # b's camera under another name: the sources share none
        for demo in f["data"].values():
            demo.move("obs/top_image", "obs/wrist_image")
    with pytest.raises(RecipeError) as err:
        build_data(load_recipe(QUICKSTART, [*tiny_overrides, *_mix(a, b)]), None)
    assert err.value.problems == [
        "data.cameras: data.mix.a has no camera ['wrist_image']; a mixture reads the cameras every source has: "
        "none in common",
        "data.cameras: data.mix.b has no camera ['top_image']; a mixture reads the cameras every source has: "
        "none in common",
    ]
    with pytest.raises(RecipeError, match=r"data\.cameras: data\.mix\.b has no camera \['top_image'\];"):
        build_data(load_recipe(QUICKSTART, [*tiny_overrides, *_mix(a, b), "data.cameras=[top_image]"]), None)


def test_a_weighted_source_without_training_episodes_names_the_train_filter(tmp_path, tiny_overrides):
    a = _task_file(tmp_path / "a.hdf5", "task a", seed=1)
    b = _task_file(tmp_path / "b.hdf5", "task b", seed=2)
    with h5py.File(b, "a") as f:  # b has no filter key 'valid': data.train_filter=valid keeps none of it
        del f["mask"]
    recipe = load_recipe(QUICKSTART, [*tiny_overrides, *_mix(a, b, 1.0, 2.0), "data.train_filter=valid"])
    with pytest.raises(RecipeError, match=r"data\.mix\.b: weighted, but no training episode left \(data\.train_filter"):
        build_data(recipe, _tokenizer(recipe))


def test_a_libero_task_is_a_best_metric_and_a_source_left_out_is_reported(tmp_path, tiny_overrides, capsys):
    suite = _suite(tmp_path / "suite")
    disk = ["data.format=hdf5", f"data.path={suite}", "data.state_key=state", "data.text_key=narration"]
    best = "train.best_metric=val/mix/pick_bowl_demo/action_l1"
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *disk, best, "train.steps=2", "train.val_every=2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/mix/pick_bowl_demo/action_l1" in row for row in rows)
    with pytest.raises(RecipeError, match="did you mean 'val/mix/pick_bowl_demo/action_l1'"):
        load_recipe(QUICKSTART, [*tiny_overrides, *disk, "train.best_metric=val/mix/pick_bowl/action_l1"])
    a = _task_file(tmp_path / "a.hdf5", "task a", seed=1)
    b = _task_file(tmp_path / "b.hdf5", "task b", seed=2)
    with h5py.File(b, "a") as f:
        del f["mask"]
        f["mask/other"] = np.array([b"demo_0"])
    capsys.readouterr()
    recipe = load_recipe(QUICKSTART, [*tiny_overrides, *_mix(a, b), "data.train_filter=valid", "data.val_ratio=0"])
    build_data(recipe, _tokenizer(recipe))
    assert "data: warning: data.mix.b gives no training episode" in capsys.readouterr().out


def test_ablate_sees_a_mixture_in_another_order_as_another_recipe(tmp_path, tiny_overrides):
    """ablate's rerun check (recipe_changes) refuses what resume refuses: sources in another order."""
    from vla_ft.config import to_dict
    from vla_ft.run_state import recipe_changes

    a, b = tmp_path / "a.hdf5", tmp_path / "b.hdf5"
    first = load_recipe(QUICKSTART, [*tiny_overrides, *_mix(a, b)])
    order = ["data.format=hdf5", "data.state_key=state", "data.text_key=narration", "data.val_ratio=0.25"]
    swapped = load_recipe(QUICKSTART, [*tiny_overrides, *order, f"data.mix.b.path={b}", f"data.mix.a.path={a}"])
    assert recipe_changes(to_dict(first), first) == []
    assert recipe_changes(to_dict(first), swapped) == [
        "data.mix: sources in order ['a', 'b'] -> ['b', 'a'] (episodes are numbered source after source)"
    ]
