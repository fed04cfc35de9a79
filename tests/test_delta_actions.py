"""Delta actions (``data.delta_action_dims``): targets are offsets from the state at the sample's
frame, normalised with the offsets' own statistics, and the policy adds the state back."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_recipe

from robot_data import Normalizer, RobotDataset, SyntheticReader, collate, compute_stats
from robot_data.delta_actions import DeltaActions
from vla_ft import VLAPolicy
from vla_ft.config import RecipeError, load_recipe
from vla_ft.train import main as train

# synthetic task: state (ee_x, ee_y, gripper), action (move_x, move_y, gripper command).
# The crossed mapping makes a swapped index visible.
DELTA = ["data.delta_action_dims=[0,1]", "data.delta_state_dims=[1,0]"]
CHUNK = 3


def _offsets_by_loop(reader, episodes, chunk: int) -> np.ndarray:
    """Reference: every (frame t, chunk step k) inside an episode, written out as loops."""
    rows = []
    for ep in episodes:
        arrays = reader.numeric(ep)
        a, s = arrays.action.astype(np.float64), arrays.state.astype(np.float64)
        for t in range(len(a)):
            for k in range(chunk):
                if t + k < len(a):
                    rows.append([a[t + k, 0] - s[t, 1], a[t + k, 1] - s[t, 0]])
    return np.array(rows)


def test_offsets_round_trip_on_numpy_and_torch():
    delta = DeltaActions.build([0, 2], [1, 0])
    actions = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # (B, C, A)
    state = np.array([[10.0, 20.0, 30.0], [1.0, 2.0, 3.0]], np.float32)  # (B, S)
    want = actions.copy()
    want[:, :, 0] -= state[:, None, 1]
    want[:, :, 2] -= state[:, None, 0]
    got = delta.to_delta(actions, state)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(actions, np.arange(24, dtype=np.float32).reshape(2, 3, 4))  # input untouched
    back = delta.to_absolute(torch.from_numpy(got), torch.from_numpy(state))
    assert torch.equal(back, torch.from_numpy(actions))
    assert DeltaActions.build([]) is None and DeltaActions.build([3]).state_dims == (3,)


def test_stats_of_delta_dims_are_those_of_every_sample_offset():
    reader = SyntheticReader(episodes=4, episode_length=9, image_size=16)
    episodes = [0, 2, 3]
    delta = DeltaActions.build([0, 1], [1, 0])
    plain = compute_stats(reader, episodes)
    stats = compute_stats(reader, episodes, delta, CHUNK)
    ref = _offsets_by_loop(reader, episodes, CHUNK)
    a = stats["action"]
    np.testing.assert_allclose(a["mean"][:2], ref.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a["std"][:2], ref.std(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a["min"][:2], ref.min(0), rtol=1e-6)
    np.testing.assert_allclose(a["max"][:2], ref.max(0), rtol=1e-6)
    np.testing.assert_allclose(a["q01"][:2], np.quantile(ref, 0.01, axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(a["q99"][:2], np.quantile(ref, 0.99, axis=0), rtol=1e-5, atol=1e-7)
    assert a["count"][:2].tolist() == [len(ref)] * 2 and len(ref) == 3 * (9 + 8 + 7)
    for stat in plain["action"]:  # the gripper dim and the state keep the frames' statistics
        assert a[stat][2] == plain["action"][stat][2]
        np.testing.assert_array_equal(stats["state"][stat], plain["state"][stat])


class _StateDropout(SyntheticReader):
    """The synthetic task with the state's dim 1 missing (NaN) at frame 4 of every episode."""

    def numeric(self, episode_index):
        arrays = super().numeric(episode_index)
        state = arrays.state.copy()
        state[4, 1] = np.nan
        return dataclasses.replace(arrays, state=state)


def test_a_sample_holds_offsets_from_the_state_at_its_frame():
    reader = _StateDropout(episodes=2, episode_length=6, image_size=16)
    delta = DeltaActions.build([0, 1], [1, 0])
    stats = compute_stats(reader, [0, 1], delta, CHUNK)
    norm = Normalizer(stats, "mean_std", raw_action_dims=[2], delta=delta)
    ds = RobotDataset(reader, [1], CHUNK, 1, norm, 16, None)
    raw = reader.numeric(1)
    mean, std = stats["action"]["mean"], stats["action"]["std"]
    for t in (0, 3):  # t=3: steps 3, 4, 5 inside the episode; the state of frame 3 is the reference
        sample = ds[t]
        offsets = np.stack(
            [raw.action[t : t + CHUNK, 0] - raw.state[t, 1], raw.action[t : t + CHUNK, 1] - raw.state[t, 0]]
        )
        np.testing.assert_allclose(sample["actions"][:, :2].numpy(), ((offsets.T - mean[:2]) / std[:2]), atol=1e-5)
        np.testing.assert_array_equal(sample["actions"][:, 2].numpy(), raw.action[t : t + CHUNK, 2])  # gripper raw
        assert sample["action_mask"].all()
    edge = ds[5]  # the last frame: one real step, two padded
    assert edge["action_mask"].tolist() == [True, False, False]
    dropped = ds[4]  # no state to take the offsets from: every step of the chunk is missing
    assert not dropped["action_mask"].any() and torch.isfinite(dropped["actions"]).all()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.delta_action_dims=[0,2]"], "data.delta_action_dims: gripper dim(s) [2] must stay absolute"),
        (["data.delta_action_dims=[0,1]", "data.delta_state_dims=[0]"], "data.delta_state_dims: 1 dims [0] for 2"),
        (["data.delta_action_dims=[1,1]"], "data.delta_action_dims: [1, 1] repeats a dim"),
        (["data.delta_state_dims=[0]"], "data.delta_state_dims: [0] given without delta_action_dims"),
    ],
)
def test_delta_keys_that_cannot_work_are_refused_on_load(tmp_path, overrides, message):
    with pytest.raises(RecipeError, match=re.escape(message)):
        tiny_recipe(tmp_path, *overrides)


def test_a_count_mismatch_is_one_problem_naming_its_key(tmp_path):
    with pytest.raises(RecipeError) as err:
        tiny_recipe(tmp_path, "data.delta_action_dims=[0,1]", "data.delta_state_dims=[0]")
    assert err.value.problems == [
        "data.delta_state_dims: 1 dims [0] for 2 delta_action_dims [0, 1]; give one state dim per action dim"
    ]


def test_delta_dims_past_the_data_are_refused_naming_the_key(tmp_path):
    from vla_ft.data import build_data
    from vla_ft.tokenizer import load_tokenizer

    recipe = tiny_recipe(tmp_path, "data.delta_action_dims=[0,1]", "data.delta_state_dims=[0,5]")
    with pytest.raises(RecipeError, match=r"data.delta_state_dims: \[5\] out of range for the data's 3 state dims"):
        build_data(recipe, load_tokenizer("builtin:tiny"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("delta")
    torch.set_num_threads(1)
    train(tiny_recipe(tmp, *DELTA, "train.steps=2", "checkpoint.every=2", "train.val_every=2"))
    return tmp / "run"


def test_the_checkpoint_records_the_delta_dims_and_their_stats(trained):
    from vla_ft.data import build_data
    from vla_ft.tokenizer import load_tokenizer

    saved = json.loads((trained / "checkpoints" / "step_000002" / "norm_stats.json").read_text())
    assert saved["delta_actions"] == {"action_dims": [0, 1], "state_dims": [1, 0]}
    recipe = load_recipe(trained / "config.yaml")
    data = build_data(recipe, load_tokenizer("builtin:tiny"), saved)  # the run's split
    ref = _offsets_by_loop(data.reader, data.train_episodes, recipe.data.chunk)
    np.testing.assert_allclose(saved["stats"]["action"]["mean"][:2], ref.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(saved["stats"]["action"]["std"][:2], ref.std(0), rtol=1e-5, atol=1e-7)


def test_the_policy_adds_the_state_back(trained):
    """Outputs -> dataset units by the saved stats -> plus the state of the current frame, by hand."""
    policy = VLAPolicy.from_pretrained(trained)
    bias = torch.tensor([0.5, -1.5, 0.0])
    with torch.no_grad():
        policy.model.action_head[-1].weight.zero_()
        policy.model.action_head[-1].bias.copy_(bias)
        policy.model.gripper_head[-1].weight.zero_()
        policy.model.gripper_head[-1].bias.fill_(3.0)
    stats = json.loads((trained / "checkpoints" / "step_000002" / "norm_stats.json").read_text())["stats"]["action"]
    state = np.array([0.25, 0.75, 1.0], np.float32)
    frame = np.zeros((64, 64, 3), np.uint8)
    got = policy.predict_action(frame, "pick up the red block", state)
    want = [
        0.5 * stats["std"][0] + stats["mean"][0] + state[1],
        -1.5 * stats["std"][1] + stats["mean"][1] + state[0],
        stats["max"][2],
    ]
    np.testing.assert_allclose(got, np.tile(want, (CHUNK, 1)), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"state: NaN or inf in state dim\(s\) \[1, 0\] of the current frame"):
        policy.predict_action(frame, "pick up the red block", np.array([np.nan, 0.0, 0.0], np.float32))


def test_the_policy_matches_the_training_pipeline_in_absolute_units(trained):
    """The sample through the model, decoded by hand with the frame's raw state == the policy on raw inputs."""
    from vla_ft.data import build_data
    from vla_ft.metrics import real_actions

    policy = VLAPolicy.from_pretrained(trained)
    ckpt = trained / "checkpoints" / "step_000002"
    recipe = load_recipe(ckpt / "config.yaml")
    data = build_data(recipe, policy.prompts.tokenizer, json.loads((ckpt / "norm_stats.json").read_text()))
    for index in (0, 4):
        episode, t = data.val_set.locate(index)
        frame = data.reader.frames(episode.index, "observation.images.top", [t])[0]
        state = data.reader.numeric(episode.index).state[t]
        got = policy.predict_action({"observation.images.top": frame}, episode.task, state)
        with torch.no_grad():
            model_units = real_actions(policy.model(collate([data.val_set[index]])), data.normalizer, [2], True)[0]
        want = model_units.numpy().copy()
        want[:, 0] += state[1]
        want[:, 1] += state[0]
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_norm_stats_written_before_delta_actions_load_as_absolute(trained):
    saved = json.loads((trained / "checkpoints" / "step_000002" / "norm_stats.json").read_text())
    del saved["delta_actions"]
    norm = Normalizer.from_dict(saved)
    assert norm.delta is None
    x = np.ones((1, CHUNK, 3), np.float32)
    np.testing.assert_array_equal(norm.absolute_actions(x, np.full((1, 3), 5.0, np.float32)), x)


def test_eval_draws_absolute_trajectories(trained, tmp_path):
    """trajectories.png shows what a robot is sent: the true actions as stored, not their offsets."""
    from vla_ft.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(trained, [], "val", tmp_path / "eval", plot_episodes=2)
    reader = SyntheticReader(episodes=6, episode_length=10, image_size=64)
    assert result["trajectories"] and (tmp_path / "eval" / "trajectories.png").is_file()
    policy = VLAPolicy.from_pretrained(trained)
    for episode, rows in result["trajectories"].items():
        stored = reader.numeric(episode)
        np.testing.assert_allclose(rows["true"], stored.action[rows["frames"]], atol=1e-5)
        t = int(rows["frames"][2])
        frame = reader.frames(episode, "observation.images.top", [t])[0]
        sent = policy.predict_action(frame, reader.episodes()[episode].task, stored.state[t])
        np.testing.assert_allclose(rows["pred"][2], sent[0], atol=1e-5)  # the policy's first step
