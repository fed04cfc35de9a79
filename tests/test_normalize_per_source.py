"""``data.normalize_per_source``: each mixture source normalised with its own training statistics
(OpenVLA's per-dataset statistics), rows de-normalised with their own, a policy told its robot."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import QUICKSTART
from train_helpers import FAST

from robot_data import (
    Normalizer,
    PerSourceNormalizer,
    SyntheticPickEnv,
    SyntheticReader,
    collate,
    load_normalizer,
)
from robot_data.hdf5_writer import write_robomimic
from vla_ft import VLAPolicy
from vla_ft.cli import main as cli
from vla_ft.config import RecipeError, load_recipe
from vla_ft.data import build_data
from vla_ft.metrics import real_actions
from vla_ft.run_setup import _default_tokenizer
from vla_ft.serve import policy_info
from vla_ft.tokenizer import load_tokenizer

SCALE_B, SHIFT_B = 25.0, -3.0  # robot b: the same task in other units (every dim but the gripper)


def _robot(path: Path, seed: int, scale: float = 1.0, shift: float = 0.0) -> Path:
    """A robomimic file of the synthetic task; state and the non-gripper action dims as ``x * scale + shift``."""
    write_robomimic(SyntheticReader(episodes=6, episode_length=10, image_size=32, seed=seed), path)
    with h5py.File(path, "a") as f:
        for demo in f["data"].values():
            demo["obs/state"][...] = demo["obs/state"][()] * scale + shift
            actions = demo["actions"][()]
            actions[:, :2] = actions[:, :2] * scale + shift  # dim 2, the gripper, stays 0/1
            demo["actions"][...] = actions
    return path


def _read(path: Path, demo: int, key: str) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f[f"data/demo_{demo}/{key}"][()]


def _mix(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    a, b = _robot(tmp_path / "a.hdf5", 1), _robot(tmp_path / "b.hdf5", 2, SCALE_B, SHIFT_B)
    overrides = ["data.format=hdf5", "data.state_key=state", "data.text_key=narration", "data.val_ratio=0.34"]
    return a, b, [*overrides, f"data.mix.a.path={a}", f"data.mix.b.path={b}", "data.normalize_per_source=true"]


def _stats(x: np.ndarray) -> dict[str, np.ndarray]:
    return {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0)}


def test_rows_are_normalised_with_their_sources_statistics():
    rng = np.random.default_rng(0)
    norms = {
        name: Normalizer({k: _stats(rng.normal(size=(50, 3)) * s + s) for k in ("state", "action")}, "mean_std", [2])
        for name, s in (("a", 1.0), ("b", 30.0))
    }
    both = PerSourceNormalizer(norms)
    x, source = rng.normal(size=(4, 5, 3)).astype(np.float32), np.array([1, 0, 1, 1])
    want = np.stack([norms["ab"[s]].normalize("action", row) for row, s in zip(x, source, strict=True)])
    np.testing.assert_allclose(both.normalize("action", x, source), want, rtol=1e-6)
    got = both.unnormalize("action", torch.from_numpy(want), torch.from_numpy(source))  # torch: same rows
    np.testing.assert_allclose(got.numpy(), x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(both.normalize("state", x[0], 1), norms["b"].normalize("state", x[0]), rtol=1e-6)
    np.testing.assert_array_equal(both.stat("action", "max", source)[0], norms["b"].stats["action"]["max"])
    assert both.for_source("b") is norms["b"] and both.sources == ["a", "b"]
    again = load_normalizer(json.loads(json.dumps(both.to_dict())))  # as norm_stats.json holds it
    np.testing.assert_array_equal(again.normalize("action", x, source), both.normalize("action", x, source))
    with pytest.raises(ValueError, match=r"statistics per source \(a, b\); say which source"):
        both.normalize("action", x)
    with pytest.raises(ValueError, match=r"source: unknown source 'c'; .*per source .*: a, b"):
        both.for_source("c")
    with pytest.raises(ValueError, match="differs from 'a' in mode"):
        PerSourceNormalizer({"a": norms["a"], "c": Normalizer(norms["a"].stats, "min_max", [2])})


def test_each_source_is_normalised_with_its_own_training_frames(tmp_path, tiny_overrides):
    a, b, mix = _mix(tmp_path)
    recipe = load_recipe(QUICKSTART, [*tiny_overrides, *mix])
    data = build_data(recipe, load_tokenizer(_default_tokenizer(recipe)))
    assert isinstance(data.normalizer, PerSourceNormalizer) and data.normalizer.sources == ["a", "b"]
    for name, path, offset in (("a", a, 0), ("b", b, 6)):  # the stats: those of the source's training frames
        ids = [e - offset for e in data.train_episodes if offset <= e < offset + 6]
        state = np.concatenate([_read(path, e, "obs/state") for e in ids])
        action = np.concatenate([_read(path, e, "actions") for e in ids])
        stats = data.normalizer.for_source(name).stats
        np.testing.assert_allclose(stats["state"]["mean"], state.mean(0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["action"]["std"], action.std(0), rtol=1e-4, atol=1e-6)
    sample = data.train_set[len(data.train_set) - 1]  # b's last training frame, through the pipeline
    last = max(data.train_episodes) - 6
    stats = data.normalizer.for_source("b").stats
    want = (_read(b, last, "obs/state")[-1] - stats["state"]["mean"]) / stats["state"]["std"]
    np.testing.assert_allclose(sample["state"][-1].numpy(), want, rtol=1e-4, atol=1e-5)
    assert int(sample["source"]) == 1 and int(data.train_set[0]["source"]) == 0
    # normalised, both robots' arm actions look alike; one set of statistics would leave a's near a constant
    spread = {int(s["source"]): s["actions"][:, 0].abs().mean() for s in (data.train_set[0], sample)}
    assert 0.1 < spread[0] / spread[1] < 10


def test_a_policy_drives_the_robot_it_is_told(tmp_path):
    a, b, mix = _mix(tmp_path)
    run_dir = tmp_path / "run"
    argv = ["train", str(QUICKSTART), *FAST, f"output_dir={run_dir}", *mix, "train.steps=2", "train.val_every=2"]
    assert cli(argv) == 0
    saved = json.loads((run_dir / "checkpoints" / "step_000002" / "norm_stats.json").read_text())
    assert list(saved["per_source"]) == ["a", "b"]
    assert cli(["eval", str(run_dir), "--episodes", "all"]) == 0  # rows of both sources, each de-normalised by its own
    assert cli(["export", str(run_dir), str(tmp_path / "export")]) == 0
    recipe = load_recipe(run_dir / "checkpoints" / "step_000002" / "config.yaml", [])
    data = build_data(recipe, load_tokenizer(_default_tokenizer(recipe)), saved)
    sample = data.train_set[len(data.train_set) - 1]  # a frame of b
    state = _read(b, max(data.train_episodes) - 6, "obs/state")[-1]
    frame = sample["images"][0].permute(1, 2, 0).numpy()
    task = data.train_set.episodes[-1].task
    for where in (run_dir, tmp_path / "export"):
        policy = VLAPolicy.from_pretrained(where, source="b")
        outputs = policy.model(collate([sample]))
        want, as_a = (real_actions(outputs, load_normalizer(saved).for_source(s), [2], True)[0].numpy() for s in "ba")
        got = policy.predict_action(frame, task, state)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        info = policy_info(policy)  # what `vla-ft serve --source b` tells its clients: b's gripper values
        b_max = saved["per_source"]["b"]["stats"]["action"]["max"]
        assert info["source"] == "b" and info["gripper"]["high"] == [b_max[2]]
        assert np.abs(got - as_a)[:, :2].min() > 1  # b's units, far from a's
    alone = load_recipe(QUICKSTART, [*FAST, *mix[:4], f"data.path={b}"])  # b's file in place of the mixture
    with pytest.raises(RecipeError, match=r"statistics are per source \(a, b\); none for .*b\.hdf5, one dataset"):
        build_data(alone, load_tokenizer(_default_tokenizer(alone)), saved)
    with pytest.raises(ValueError, match=r"source: no source given; .*: a, b"):
        VLAPolicy.from_pretrained(run_dir)
    with pytest.raises(ValueError, match="source: unknown source 'c'"):
        VLAPolicy.from_pretrained(run_dir, source="c")


def test_recipe_errors_of_per_source_statistics(tmp_path, tiny_overrides):
    a, b, mix = _mix(tmp_path)
    with pytest.raises(RecipeError, match=r"data\.normalize_per_source: statistics per source need a mixture"):
        load_recipe(QUICKSTART, [*tiny_overrides, "data.normalize_per_source=true"])
    with pytest.raises(RecipeError, match=r"rollout\.source: only with data\.normalize_per_source"):
        load_recipe(QUICKSTART, [*tiny_overrides, "rollout.source=a"])
    with pytest.raises(RecipeError, match=r"rollout\.source: required .*: one of a, b"):
        load_recipe(QUICKSTART, [*tiny_overrides, *mix, "rollout.episodes=2", "rollout.env=gymnasium:make"])
    with pytest.raises(RecipeError, match=r"rollout\.source: unknown source 'bb' \(did you mean 'b'\?\)"):
        load_recipe(QUICKSTART, [*tiny_overrides, *mix, "rollout.source=bb"])
    one_file = load_recipe(QUICKSTART, [*tiny_overrides, *mix[:4], f"data.path={a}", "data.normalize_per_source=true"])
    with pytest.raises(RecipeError, match=rf"data\.normalize_per_source: {a} is one dataset"):
        build_data(one_file, load_tokenizer(_default_tokenizer(one_file)))
    no_train = load_recipe(QUICKSTART, [*tiny_overrides, *mix, "data.val_episodes=[6,7,8,9,10,11]"])
    with pytest.raises(RecipeError, match=r"data\.mix\.b has no training episode to compute its statistics"):
        build_data(no_train, load_tokenizer(_default_tokenizer(no_train)))


def test_cached_features_keep_each_rows_source(tmp_path):
    """A head-only run validates on cached readouts: the labels the cache keeps carry each row's source,
    so its val/action_l1 is the one `vla-ft eval` measures on the data itself."""
    _, _, mix = _mix(tmp_path)
    run_dir = tmp_path / "run"
    head_only = Path(QUICKSTART).parent / "head_only.yaml"
    extra = ["train.steps=2", "train.val_every=2", "checkpoint.every=2", "logging.tensorboard=false"]
    assert cli(["train", str(head_only), *FAST, *extra, f"output_dir={run_dir}", *mix]) == 0
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = next(row for row in logged if "val/action_l1" in row)
    assert cli(["eval", str(run_dir)]) == 0  # the validation episodes, read and run through the whole model
    report = json.loads((run_dir / "checkpoints" / "step_000002" / "eval" / "metrics.json").read_text())
    for key in ("action_l1", "baseline_l1", "mix/b/action_l1"):
        assert report["metrics"][key] == pytest.approx(val[f"val/{key}"], rel=1e-4), key


class TopImageEnv(SyntheticPickEnv):
    """The synthetic task's env with the camera named as the robomimic files name it."""

    def _named(self, obs: dict) -> dict:
        return {**obs, "pixels": {"top_image": obs["pixels"]["top"]}}

    def reset(self, *args, **kwargs):
        obs, info = super().reset(*args, **kwargs)
        return self._named(obs), info

    def step(self, action):
        obs, *rest = super().step(action)
        return self._named(obs), *rest


def test_a_rollout_drives_its_robot_with_its_sources_statistics(tmp_path, monkeypatch, capsys):
    import vla_ft.rollout as rollout_module

    seen, original = [], rollout_module.chunk_runner
    monkeypatch.setattr(rollout_module, "chunk_runner", lambda policy, *a: seen.append(policy) or original(policy, *a))
    _, _, mix = _mix(tmp_path)
    run_dir = tmp_path / "run"
    env = ["rollout.env=test_normalize_per_source:TopImageEnv", "rollout.env_kwargs={image_size: 32}"]
    args = [*mix, *env, "rollout.episodes=1", "rollout.source=b", "rollout.max_steps=2", "train.steps=2"]
    assert cli(["train", str(QUICKSTART), *FAST, f"output_dir={run_dir}", *args, "train.val_every=2"]) == 0
    saved = json.loads((run_dir / "checkpoints" / "step_000002" / "norm_stats.json").read_text())
    assert seen and all(p.normalizer.to_dict() == saved["per_source"]["b"] for p in seen)
    seen.clear()  # `vla-ft rollout`: the recipe's rollout.source, or --source
    assert cli(["rollout", str(run_dir), "--episodes", "1", "--max-steps", "2", "--videos", "0"]) == 0
    assert cli(["rollout", str(run_dir), "--episodes", "1", "--max-steps", "2", "--videos", "0", "--source", "a"]) == 0
    assert [p.normalizer.to_dict() for p in seen] == [saved["per_source"][s] for s in "ba"]
    assert cli(["rollout", str(run_dir), "--episodes", "1", "--source", "c"]) == 2
    assert "--source: unknown source 'c'" in capsys.readouterr().err
