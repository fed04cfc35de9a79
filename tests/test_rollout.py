"""Closed-loop rollouts: the synthetic task as an environment, and `vla-ft rollout`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from conftest import QUICKSTART, ROOT

from robot_data import SyntheticReader
from robot_data.synthetic import BIN, expert_step, make_scene
from robot_data.synthetic_env import SyntheticPickEnv
from vla_ft import ChunkRunner, VLAPolicy
from vla_ft.cli import main as cli
from vla_ft.rollout import EpisodeResult, policy_inputs, run_episode, run_episodes, summarize

CAMERA = "observation.images.top"
SCENES: list = []


class Expert:
    """The scripted expert of the synthetic data as a runner, reading the scene from the env."""

    def __init__(self, env: SyntheticPickEnv):
        self.env = env
        self.seen: list[np.ndarray] = []
        self.scenes = SCENES  # every episode's scene, in order

    def reset(self) -> None:
        self.phase, self.seen = "reach", []
        self.scenes.append(self.env.scene)

    def act(self, images, instruction, state) -> np.ndarray:
        assert instruction == self.env.scene.instruction and set(images) == {CAMERA}
        self.seen.append(np.asarray(state))
        move, command, _ = expert_step(self.env.scene, self.env.ee, self.phase)
        if self.phase != "done" and command != self.env.grip:
            self.phase = "carry" if self.phase == "reach" else "done"
        return np.array([move[0], move[1], command])


@pytest.mark.parametrize(("seed", "size", "length"), [(3, 48, 24), (0, 64, 32)])
def test_the_env_replays_the_synthetic_dataset_frame_for_frame(seed, size, length):
    """Frames too: the dataset draws from float32 positions, so the env must (seed 0 at 64 pixels
    puts a held block at 0.49999998, one pixel from where float64's 0.5 draws it)."""
    data = SyntheticReader(episodes=6, episode_length=length, image_size=size, seed=seed)
    env = SyntheticPickEnv(image_size=size, seed=seed, max_steps=200)
    expert = Expert(env)
    for episode in range(6):
        obs, info = env.reset(seed=episode)
        expert.reset()
        arrays, frames = data.numeric(episode), data.frames(episode, CAMERA, range(length))
        assert info["task"] == data.episodes()[episode].task
        for t in range(length):
            np.testing.assert_array_equal(obs["agent_pos"], arrays.state[t])
            np.testing.assert_array_equal(obs["pixels"]["top"], frames[t])
            obs, _, terminated, _, _ = env.step(expert.act({CAMERA: None}, env.task, obs["agent_pos"]))
            if terminated:
                break
        env.reset(seed=episode)
        for action, state, frame in zip(arrays.action, arrays.state, frames, strict=True):  # recorded actions
            np.testing.assert_allclose(env.state, state, atol=1e-6)
            np.testing.assert_array_equal(env.render(), frame)
            if env.step(action)[2]:
                break


def test_success_is_the_instructed_block_released_in_the_bin():
    env = SyntheticPickEnv(image_size=32, seed=0, max_steps=200)
    expert = Expert(env)
    for episode in range(10):
        result = run_episode(env, expert, episode, [CAMERA])
        released = [t for t, text in enumerate(_expert_text(episode)) if text.startswith("release")][0]
        assert result.success and result.steps == released + 1 and result.reward == 1.0
    env.reset(seed=0)
    scene = env.scene
    other = next(i for i in range(3) if i != scene.target)
    assert not _carry(env, scene.blocks[other], BIN)[-1]["is_success"]  # the wrong block in the bin
    env.reset(seed=0)
    last = _carry(env, scene.blocks[scene.target], BIN + np.array([0.0, 0.3]))[-1]  # the right one, off the bin
    assert not last["is_success"] and env.held is None and env.t < env.max_steps
    env.reset(seed=0)
    env.step([0.0, 0.0, 1.0])  # closing far from every block grasps nothing
    assert env.held is None or np.abs(scene.blocks[env.held] - scene.ee_start).max() <= 1 / 16
    short = SyntheticPickEnv(image_size=32, seed=0, max_steps=3)
    short.reset(seed=0)
    assert [short.step([0.0, 0.0, 0.0])[3] for _ in range(3)] == [False, False, True]  # truncated at max_steps
    with pytest.raises(ValueError, match="expected 3 finite values"):
        short.step([0.0, np.nan, 0.0])


def _expert_text(episode: int) -> list[str]:
    from robot_data.synthetic import rollout

    return rollout(make_scene(0, episode), 200).text


def _carry(env: SyntheticPickEnv, block: np.ndarray, goal: np.ndarray) -> list[dict]:
    """Move onto ``block``, close, move to ``goal``, open; the infos of every step."""
    infos = []
    for target, command in ((block, 0.0), (block, 1.0), (goal, 1.0), (goal, 0.0)):
        while True:
            delta = target - env.ee
            infos.append(env.step([*np.clip(delta, -0.035, 0.035), command])[4])
            if np.abs(delta).max() <= 0.035 and env.grip == command:
                break
    return infos


def test_the_episode_loop_feeds_a_state_history_and_matches_cameras_by_name():
    env = SyntheticPickEnv(image_size=32, seed=0, max_steps=4)
    expert = Expert(env)
    result = run_episode(env, expert, 2, [CAMERA], history=3, record=True)
    first = make_scene(0, 2).ee_start.astype(np.float32)
    np.testing.assert_array_equal(expert.seen[0], np.stack([[*first, 0.0]] * 3))  # the first state, repeated
    np.testing.assert_array_equal(expert.seen[1][:2], expert.seen[0][1:])  # then a sliding window
    assert result.steps == 4 and len(result.frames) == 5 and not result.success  # frames: every obs
    images, state = policy_inputs({"pixels": {"top": 1, "wrist": 2}, "agent_pos": 3}, [CAMERA], "agent_pos")
    assert images == {CAMERA: 1} and state == 3
    with pytest.raises(ValueError, match=r"no camera 'observation.images.wrist' \(or 'wrist'\)"):
        policy_inputs({"pixels": {"top": 1}, "agent_pos": 3}, ["observation.images.wrist"], "agent_pos")
    assert policy_inputs({"pixels": 7, "agent_pos": 3}, [CAMERA], "agent_pos")[0] == {CAMERA: 7}
    assert summarize([result])["success_rate"] == 0.0
    won = EpisodeResult(3, True, 5, 1.0, "pick up the red block")
    lost = EpisodeResult(4, False, 9, 0.0, "pick up the red block")
    tasks = summarize([won, lost, result])["by_instruction"]  # one task solved half the time, the other never
    assert result.instruction != won.instruction and tasks == {
        "pick up the red block": {"episodes": 2, "success_rate": 0.5},
        result.instruction: {"episodes": 1, "success_rate": 0.0},
    }


class OraclePolicy:
    """A policy whose chunk is the scripted expert's move and gripper command, repeated: it finds
    each row's env by its exact state (every scene starts elsewhere), so a row's prediction is the
    same alone or in any batch. Records the batch size of every call."""

    chunk, cameras = 4, [CAMERA]
    meta = {"gripper": {"dims": [2]}, "history": 1}

    def gripper_range(self):
        return [2], np.zeros(1), np.ones(1)  # dim 2: open at 0, closed at 1

    def __init__(self, envs: list[SyntheticPickEnv]):
        self.envs, self.calls = envs, []

    def predict_action(self, images, instruction, state) -> np.ndarray:
        states = np.asarray(state).reshape(-1, 3)
        frames = np.asarray(images[CAMERA]).reshape(-1, *images[CAMERA].shape[-3:])
        texts = [instruction] * len(states) if isinstance(instruction, str) else list(instruction)
        self.calls.append(len(states))
        chunks = []
        for row, frame, text in zip(states, frames, texts, strict=True):
            env = next(e for e in self.envs if np.array_equal(e.state, row))
            assert text == env.task and np.array_equal(frame, env.render())
            move, command, _ = expert_step(env.scene, env.ee, "reach" if env.held is None else "carry")
            chunks.append(np.tile([move[0], move[1], command], (self.chunk, 1)))
        return np.stack(chunks) if np.asarray(state).ndim == 2 else chunks[0]


@pytest.mark.parametrize("runner", [{"execute": 2}, {"execute": 1}, {"ensemble": 0.5}])
def test_batched_episodes_equal_one_after_another(runner):
    """4 envs for 9 seeds: episodes end at different steps (the expert's own length, or max_steps)
    and each env takes the next seed; every result equals the serial one, the first 2 keep frames."""
    envs = [SyntheticPickEnv(image_size=32, seed=0, max_steps=30) for _ in range(4)]
    policy = OraclePolicy(envs)
    seeds = list(range(10, 19))
    serial = [
        run_episode(envs[0], ChunkRunner(policy, **runner), s, [CAMERA], record=i < 2) for i, s in enumerate(seeds)
    ]
    policy.calls.clear()
    batched = run_episodes(envs, [ChunkRunner(policy, **runner) for _ in envs], seeds, [CAMERA], record=2)
    assert [(r.seed, r.success, r.steps, r.reward) for r in batched] == [
        (r.seed, r.success, r.steps, r.reward) for r in serial
    ]
    assert len({r.steps for r in serial}) >= 2 and any(r.success for r in serial)
    for a, b in zip(batched, serial, strict=True):
        assert len(a.frames) == len(b.frames) and all(map(np.array_equal, a.frames, b.frames))
    assert [len(r.frames) > 0 for r in batched] == [True, True] + [False] * 7
    assert max(policy.calls) == 4 and sum(policy.calls) == sum(  # one row per prediction a runner needs
        -(-r.steps // runner["execute"]) if "execute" in runner else r.steps for r in serial
    )


class ToyPolicy(OraclePolicy):
    """Moves towards a point read from the frame and closes the gripper past half the steps: a
    function of each row's observation only, so it needs no access to the envs."""

    def predict_action(self, images, instruction, state) -> np.ndarray:
        states = np.asarray(state).reshape(-1, 3)
        frames = np.asarray(images[CAMERA]).reshape(-1, *images[CAMERA].shape[-3:]).astype(np.float64)
        goal = np.stack([frames[:, :, :, 0].mean((1, 2)), frames[:, :, :, 1].mean((1, 2))], 1) / 255.0
        move = np.clip(goal - states[:, :2], -0.03, 0.03)
        grip = (states[:, :2].sum(1, keepdims=True) > 0.8).astype(np.float64)
        chunks = np.repeat(np.concatenate([move, grip], 1)[:, None], self.chunk, axis=1)
        return chunks if np.asarray(state).ndim == 2 else chunks[0]


def test_envs_in_their_own_processes_roll_out_as_in_this_one():
    """rollout.env_processes: each env built from the same spec in a spawned process, stepped in
    parallel; the episodes equal those of the same envs in this process. Errors come back typed."""
    from vla_ft.config import RecipeError
    from vla_ft.rollout import close_envs, make_envs

    recipe = {"data": {"format": "synthetic", "synthetic": {"image_size": 32, "episodes": 6}}}
    results = []
    for processes in (False, True):
        envs, first = make_envs(None, {}, recipe, 12, 2, "rollout.env", processes)
        runners = [ChunkRunner(ToyPolicy([]), execute=2) for _ in envs]
        results.append(run_episodes(envs, runners, range(first, first + 3), [CAMERA], record=1))
        if processes:
            with pytest.raises(ValueError, match="action: expected 3 finite values"):
                envs[0].step(np.zeros(2))
            assert envs[0].reset(seed=first)[1]["task"] == results[0][0].instruction  # still serving
            os.kill(envs[1]._process.pid, signal.SIGKILL)  # a simulator that crashes its process
            with pytest.raises(RuntimeError, match=r"env process ended unexpectedly \(exit code -9\)"):
                envs[1].reset(seed=first)
        close_envs(envs)
    assert first == 6 and [r.seed for r in results[1]] == [6, 7, 8]
    for a, b in zip(*results, strict=True):
        assert (a.steps, a.reward, a.success, a.instruction) == (b.steps, b.reward, b.success, b.instruction)
        assert len(a.frames) == len(b.frames) and all(map(np.array_equal, a.frames, b.frames))
    with pytest.raises(RecipeError, match="rollout.env: cannot load 'no_such_module:make'"):
        make_envs("no_such_module:make", {}, recipe, 12, 1, "rollout.env", processes=True)


@pytest.mark.parametrize("processes", [False, True])
def test_env_errors_say_where_the_env_came_from(processes):
    """``--env`` is a command-line flag: its errors say "command line:", not "recipe:" (which sends the
    user to a recipe that never named it); ``rollout.env`` stays the recipe's. In-process or not."""
    from vla_ft.config import RecipeError
    from vla_ft.rollout import make_envs

    recipe = {"data": {"format": "lerobot"}}
    for key, source in (("--env", "command line"), ("rollout.env", "recipe")):
        for spec in ("no_such_module:make", "os:getcwd", "nocolon"):
            with pytest.raises(RecipeError) as info:
                make_envs(spec, {}, recipe, 12, 1, key, processes)
            assert str(info.value).startswith(f"{source}: {key}: "), str(info.value)
            assert info.value.source == source
    with pytest.raises(RecipeError, match=r"^command line: --env: the checkpoint trained on data.format=lerobot"):
        make_envs(None, {}, recipe, 12, 1, "--env", processes)


def test_a_chunk_runner_step_takes_a_chunk_exactly_when_it_needs_one():
    runner = ChunkRunner(OraclePolicy([]), execute=2)
    with pytest.raises(ValueError, match="needs a chunk"):
        runner.step(None)
    runner.step(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="needs no chunk"):
        runner.step(np.zeros((4, 3)))
    assert runner.step(None).shape == (3,) and runner.needs_chunk()


def test_rollout_a_trained_policy(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    assert cli(["train", str(QUICKSTART), *tiny_overrides, "train.steps=2", "logging.tensorboard=false"]) == 0
    assert cli(["rollout", str(run), "--episodes", "2", "--max-steps", "5", "--videos", "1", "--execute", "2"]) == 0
    out = capsys.readouterr().out
    assert "success 0% over 2 episodes (synthetic)" in out
    report = json.loads((run / "checkpoints" / "step_000002" / "rollout" / "rollouts.json").read_text())
    # the rate trained at is reported (the env protocol declares none to check it against)
    trained = json.loads((run / "checkpoints" / "step_000002" / "model_meta.json").read_text())["fps"]
    assert report["fps"] == trained == SyntheticReader(episodes=1).fps
    assert f"the checkpoint trained at {trained:g} Hz" in out
    assert [r["seed"] for r in report["results"]] == [6, 7]  # the first scenes past the 6 training episodes
    # the same episodes, stepped here with the policy and the runner
    policy = VLAPolicy.from_pretrained(run)
    runner, env = ChunkRunner(policy, execute=2), SyntheticPickEnv(image_size=64, seed=0, max_steps=5)
    seen = {}
    for seed, row in zip((6, 7), report["results"], strict=True):
        obs, info = env.reset(seed=seed)
        runner.reset()
        seen[seed] = [obs["pixels"]["top"]]
        for _ in range(5):
            obs, *_ = env.step(runner.act(obs["pixels"]["top"], info["task"], obs["agent_pos"]))
            seen[seed].append(obs["pixels"]["top"])
        assert row["steps"] == 5 and row["success"] is False and row["instruction"] == info["task"]
    assert np.abs(seen[6][-1].astype(int) - seen[6][0]).sum() > 0  # the policy moved the arm
    with av.open(str(run / "checkpoints" / "step_000002" / "rollout" / report["videos"][0])) as video:
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert report["videos"] == ["rollout_6.mp4"] and len(frames) == 6
    for decoded, frame in zip(frames, seen[6], strict=True):  # what the policy saw, through H.264
        assert np.abs(decoded.astype(int) - frame).mean() < 6.0
    for args, message in (
        (["--env", "no_such_module:make"], "--env: cannot load 'no_such_module:make'"),
        (["--env", "robot_data.synthetic_env"], "--env: expected module:callable"),
        (["--env-kwargs", "{oops"], "--env-kwargs: not JSON"),
        (["--env-kwargs", '{"image_size": 32}'], "--env: keyword arguments {'image_size': 32} given, but no env"),
        (["--env", "robot_data.synthetic_env:SyntheticPickEnv", "--env-kwargs", '{"image_size": 7}'], "image_size"),
        (["--env-kwargs", '"abc"'], "--env-kwargs: must be a JSON object"),  # was blamed on --env
        (["--env", "os:getcwd"], "--env: os:getcwd returned a str, not an environment (it lacks reset() and step())"),
        (["--execute", "99"], "--execute: 99 actions per prediction, the policy predicts chunks of 3"),
        (["--device", "cpuu"], "--device: 'cpuu' is not a torch device"),
        (["--device", "meta"], "--device: meta holds no values"),
    ):
        assert cli(["rollout", str(run), *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def unrendered_env(**kwargs) -> SyntheticPickEnv:
    """The synthetic env without gymnasium's ``render_fps`` (many simulators declare none)."""
    env = SyntheticPickEnv(**kwargs)
    env.metadata = {}
    return env


def test_videos_of_an_env_without_a_render_rate_play_at_the_checkpoints_control_rate(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    assert cli(["train", str(QUICKSTART), *tiny_overrides, "train.steps=1", "train.val_every=0"]) == 0
    meta_path = run / "checkpoints" / "step_000001" / "model_meta.json"
    meta = json.loads(meta_path.read_text())
    meta["fps"] = 4.0  # not the synthetic env's 10 Hz, nor the fallback's
    meta_path.write_text(json.dumps(meta))
    env = ["--env", f"{__name__}:unrendered_env", "--env-kwargs", '{"image_size": 64}']
    assert cli(["rollout", str(run), *env, "--episodes", "1", "--max-steps", "3", "--videos", "1"]) == 0
    with av.open(
        str(run / "checkpoints" / "step_000001" / "rollout" / "rollout_0.mp4")
    ) as video:  # a user env starts at seed 0
        assert float(video.streams.video[0].average_rate) == 4.0


def test_a_bad_rollout_out_is_refused_before_any_episode_runs(tmp_path, tiny_overrides, capsys, monkeypatch):
    """Found when writing the report, a bad --out cost every episode's run; now before any env is made."""
    import vla_ft.rollout as rollout_module

    run = tmp_path / "run"
    assert cli(["train", str(QUICKSTART), *tiny_overrides, "train.steps=2", "train.val_every=0"]) == 0
    made = []
    monkeypatch.setattr(rollout_module, "make_envs", lambda *a, **k: made.append(a) or (_ for _ in ()).throw(OSError))
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for out, message in ((notes, f"--out: {notes} is a file"), (notes / "r", f"--out: {notes} is a file")):
        assert cli(["rollout", str(run), "--episodes", "1", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    monkeypatch.setattr(rollout_module.os, "access", lambda path, mode: path != tmp_path)  # as for a non-root user
    assert cli(["rollout", str(run), "--episodes", "1", "--out", str(tmp_path / "r")]) == 2
    assert f"--out: {tmp_path} is not writable" in capsys.readouterr().err
    assert made == [] and notes.read_text() == "keep me"


def test_validation_rolls_out_and_a_best_checkpoint_is_chosen_by_success(tmp_path, tiny_overrides, monkeypatch):
    """The loop's plumbing, with the scripted expert standing in for the tiny policy (which never
    succeeds): every validation logs the success rate of rollout.episodes episodes."""
    import vla_ft.rollout as rollout_module

    envs, runners, make_env = [], [], rollout_module.make_env
    monkeypatch.setattr(rollout_module, "make_env", lambda *a: envs.append(make_env(*a)) or envs[-1])
    # runner k of each validation drives env k (an expert, which is no ChunkRunner: it acts on its own)
    expert = lambda *a: runners.append(Expert(envs[len(runners) % len(envs)][0])) or runners[-1]  # noqa: E731
    monkeypatch.setattr(rollout_module, "chunk_runner", expert)
    rollout = ["rollout.episodes=3", "rollout.max_steps=60", "train.best_metric=val/rollout/success_rate"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *rollout, "train.best_mode=max"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    logged = [(row["step"], row["val/rollout/success_rate"]) for row in rows if "val/rollout/success_rate" in row]
    assert logged == [(3, 1.0), (6, 1.0)] and len(envs) == 3  # one env per episode at once, for the whole run
    want = [make_scene(0, seed).blocks for seed in (6, 7, 8)] * 2  # the scenes past the 6 training episodes
    assert len(SCENES) >= 6 and all(np.array_equal(a.blocks, b) for a, b in zip(SCENES[-6:], want, strict=True))
    assert all(row["val/rollout/mean_reward"] == 1.0 for row in rows if "val/rollout/mean_reward" in row)
    assert (tmp_path / "run" / "checkpoints" / "best").read_text().strip().endswith("step_000003")


def test_the_tiny_policy_rolls_out_in_validation_and_the_cli_takes_the_recipes_settings(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    rollout = ["rollout.episodes=2", "rollout.max_steps=3", "rollout.execute=2", "train.steps=3"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *rollout, "logging.tensorboard=false"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["val/rollout/success_rate"] for row in rows if "val/rollout/success_rate" in row] == [0.0]
    assert (
        cli(["rollout", str(run), "--episodes", "3", "--batch", "2", "--videos", "0", "--out", str(tmp_path / "r")])
        == 0
    )
    report = json.loads((tmp_path / "r" / "rollouts.json").read_text())
    assert report["runner"] == {"execute": 2, "ensemble": None} and report["max_steps"] == 3
    assert report["batch"] == 2 and [r["seed"] for r in report["results"]] == [6, 7, 8]
    assert report["env_processes"] is False
    args = ["rollout", str(run), "--episodes", "2", "--env-processes", "--videos", "0", "--out", str(tmp_path / "p")]
    assert cli(args) == 0
    in_processes = json.loads((tmp_path / "p" / "rollouts.json").read_text())
    assert in_processes["env_processes"] is True and in_processes["results"] == report["results"][:2]
    assert report["results"][0]["steps"] == 3 and report["videos"] == []


def test_a_wrong_rollout_env_fails_before_training(tmp_path, tiny_overrides, capsys):
    args = ["rollout.episodes=2", "rollout.env=no_such_module:make"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *args]) == 2
    assert "rollout.env: cannot load 'no_such_module:make'" in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_rollout_settings_are_checked(tiny_overrides):
    from vla_ft.config import RecipeError, load_recipe
    from vla_ft.rollout import training_envs

    cases = {
        ("rollout.execute=2", "rollout.ensemble=0.1"): "rollout.execute and rollout.ensemble: set one",
        ("rollout.execute=4",): "rollout.execute: 4 actions per chunk, but the policy predicts 3 (data.chunk)",
        ("rollout.episodes=2", "data.format=hdf5", "data.path=x.hdf5"): "rollout.env: required",
        ("rollout.episodes=2", "distributed.strategy=fsdp"): "use distributed.strategy=ddp",
        ("train.best_metric=val/rollout/success_rate", "rollout.episodes=2"): "train.best_mode: min, but higher",
        ("train.best_metric=val/rollout/success_rate",): "is logged only with rollout.episodes > 0",
        ("rollout.start=-5",): "rollout.start: the first reset seed must be >= 0, got -5",
    }
    for overrides, message in cases.items():
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe(QUICKSTART, [*tiny_overrides, "data.text_key=narration", *overrides])
    recipe = load_recipe(QUICKSTART, [*tiny_overrides, "rollout.episodes=3"])
    envs, first = training_envs(recipe, 3)  # one episode per process
    assert len(envs) == 1 and isinstance(envs[0], SyntheticPickEnv) and first == 6 and envs[0].max_steps == 80
    assert len(training_envs(load_recipe(QUICKSTART, [*tiny_overrides, "rollout.episodes=30"]), 1)[0]) == 8
    with pytest.raises(RecipeError, match="3 episodes do not split evenly over 2 processes"):
        training_envs(recipe, 2)
    with pytest.raises(RecipeError, match="rollout.batch: episodes run at once must be >= 1, got 0"):
        load_recipe(QUICKSTART, [*tiny_overrides, "rollout.batch=0"])


def test_rollouts_alone_validate_a_run_without_a_validation_set(tmp_path, tiny_overrides):
    """data.val_ratio=0: validation only rolls out, so the best metric must be a rollout's (a held-out
    metric stopped the run at its first validation), and early stopping counts those validations."""
    from vla_ft.config import RecipeError, load_recipe

    rollout = ["data.val_ratio=0", "rollout.episodes=1", "rollout.max_steps=2", "logging.tensorboard=false"]
    with pytest.raises(RecipeError, match=re.escape("train.best_metric: 'val/action_l1' needs a validation set")):
        load_recipe(QUICKSTART, [*tiny_overrides, *rollout])
    best = ["train.best_metric=val/rollout/success_rate", "train.best_mode=max", "train.early_stopping.patience=1"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *rollout, *best]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(row["step"], row["val/rollout/success_rate"]) for row in rows if "val/rollout/success_rate" in row] == [
        (3, 0.0),
        (6, 0.0),
    ]
    assert (tmp_path / "run" / "checkpoints" / "best").read_text().strip().endswith("step_000003")


def test_resuming_with_other_rollouts_is_refused_when_they_choose_the_best_checkpoint(tmp_path, tiny_overrides):
    """Rollouts leave training as it is (their settings may change on resume), but with a
    val/rollout/* best metric they are what the saved best value measured."""
    import warnings

    from vla_ft.config import RecipeError, load_recipe, to_dict
    from vla_ft.run_state import check_resume_compatible

    def recipe(*overrides):
        return load_recipe(QUICKSTART, [*tiny_overrides, "rollout.episodes=2", *overrides])

    best = ["train.best_metric=val/rollout/success_rate", "train.best_mode=max"]
    with pytest.raises(RecipeError, match=re.escape("rollout.max_steps: 80 -> 200 (train.best_metric is a rollout's)")):
        check_resume_compatible(to_dict(recipe(*best)), recipe(*best, "rollout.max_steps=200"), tmp_path)
    with warnings.catch_warnings(record=True) as caught:  # how many run at once is not what they measure
        warnings.simplefilter("always")
        check_resume_compatible(
            to_dict(recipe(*best)), recipe(*best, "rollout.batch=1", "rollout.env_processes=true"), tmp_path
        )
    assert "changed keys: rollout.batch, rollout.env_processes" in str(caught[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_resume_compatible(to_dict(recipe()), recipe("rollout.max_steps=200", "rollout.episodes=4"), tmp_path)
    assert "changed keys: rollout.episodes, rollout.max_steps" in str(caught[0].message)


def test_eval_on_another_dataset_does_not_ask_for_a_rollout_env(tmp_path, tiny_overrides):
    """vla-ft eval rolls nothing out: a checkpoint trained with rollout.episodes on the synthetic task
    is evaluated on recorded data without an env (it was refused: 'rollout.env: required')."""
    from vla_ft.evaluate import eval_recipe

    assert (
        cli(["train", str(QUICKSTART), *tiny_overrides, "rollout.episodes=1", "rollout.max_steps=2", "train.steps=3"])
        == 0
    )
    step = tmp_path / "run" / "checkpoints" / "step_000003"
    recipe = eval_recipe(step, ["data.format=lerobot", f"data.path={tmp_path}", "data.text_key=task"])
    assert recipe.data.format == "lerobot" and recipe.rollout.episodes == 0


def test_rollout_counts_are_checked(tmp_path, capsys):
    """Usage errors naming the option (--execute 0, --ensemble -1 and nan were tracebacks from
    ChunkRunner; --start -5 was blamed on --env)."""
    for option, value, message in (
        ("--episodes", "0", "must be an integer >= 1"),
        ("--max-steps", "-1", "must be an integer >= 1"),
        ("--videos", "-1", "must be an integer >= 0"),
        ("--execute", "0", "must be an integer >= 1"),
        ("--start", "-5", "must be an integer >= 0"),
        ("--ensemble", "-1", "must be a finite number >= 0"),
        ("--ensemble", "nan", "must be a finite number >= 0"),
    ):
        with pytest.raises(SystemExit) as info:
            cli(["rollout", str(tmp_path), option, value])
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"argument {option}: {message}, got '{value}'" in err, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_validation_rollouts_on_cuda_act_as_the_saved_policy(tmp_path, tiny_overrides, monkeypatch):
    """bf16 weights (fp32 masters) on CUDA: the actions validation's rollouts sent are those the
    checkpoint's policy, loaded in bf16 on the GPU, sends in the same episodes."""
    import vla_ft.rollout as rollout_module

    sent, real = [], rollout_module.chunk_runner

    def recording(policy, execute, ensemble):
        runner = real(policy, execute, ensemble)
        step = runner.step
        runner.step = lambda chunk: sent.append(step(chunk).copy()) or sent[-1]
        return runner

    monkeypatch.setattr(rollout_module, "chunk_runner", recording)
    run = tmp_path / "run"
    cuda = ["train.device=cuda", "train.steps=3", "train.val_every=3", "rollout.episodes=2", "rollout.max_steps=4"]
    cuda += ["rollout.batch=1"]  # batch 1 as the replay below: the first action from the very same inputs
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *cuda, "logging.tensorboard=false"]) == 0
    policy = VLAPolicy.from_pretrained(run, device="cuda", dtype=torch.bfloat16)
    runner, env = ChunkRunner(policy, execute=1), SyntheticPickEnv(image_size=64, seed=0, max_steps=4)
    replayed = []
    for seed in (6, 7):
        obs, info = env.reset(seed=seed)
        runner.reset()
        for _ in range(4):
            replayed.append(runner.act(obs["pixels"]["top"], info["task"], obs["agent_pos"]))
            obs, *_ = env.step(replayed[-1])
    assert len(sent) == 8  # bf16 matmuls: equal to bf16 precision (actions are ~1e-2), not bitwise
    np.testing.assert_allclose(np.stack(sent), np.stack(replayed), atol=5e-4)
    np.testing.assert_allclose(sent[0], replayed[0], atol=1e-6)  # the first observation: the same inputs


CLOSED: list = []


class ClosingEnv(SyntheticPickEnv):
    """A user's environment (``rollout.env=test_rollout:ClosingEnv``) that records its close()."""

    def close(self) -> None:
        CLOSED.append(self)


class FailingEnv(ClosingEnv):
    """Refuses every action, as a simulator would one of the wrong size."""

    def step(self, action):
        raise ValueError("action: this env takes 7 values")


class CrashingOnCloseEnv(SyntheticPickEnv):
    """Ends its process while closing, as a simulator whose renderer segfaults."""

    def close(self) -> None:
        os._exit(3)


class RefusingToCloseEnv(SyntheticPickEnv):
    def close(self) -> None:
        raise RuntimeError("the renderer is gone")


class SteppedEnv(SyntheticPickEnv):
    """Touches ``marker`` at its first step: the rollout is under way (to interrupt it then)."""

    def __init__(self, marker: str):
        super().__init__()
        self.marker = Path(marker)

    def step(self, action):
        self.marker.touch()
        return super().step(action)


def test_closing_envs_closes_every_one_and_survives_a_dead_process():
    """close_envs runs in ``finally``: an env that fails to close must neither leave the others open
    nor, for a process already gone, raise over the error that got there."""
    from vla_ft.env_process import EnvProcess
    from vla_ft.rollout import close_envs

    crashed = EnvProcess("test_rollout:CrashingOnCloseEnv", {}, {}, 5)
    close_envs([crashed])  # its process ended while closing: reaped, nothing raised
    assert crashed._process.exitcode == 3
    CLOSED.clear()
    later = ClosingEnv()
    with pytest.raises(RuntimeError, match="the renderer is gone"):  # raised once the others are closed
        close_envs([RefusingToCloseEnv(), later])
    assert len(CLOSED) == 1 and CLOSED[0] is later


class SecondFailsEnv(ClosingEnv):
    """The first one builds, the second fails: a simulator out of GPU memory for another copy."""

    def __init__(self):
        if CLOSED_OR_MADE.count("made"):
            raise RuntimeError("no memory for a second simulator")
        CLOSED_OR_MADE.append("made")
        super().__init__()


CLOSED_OR_MADE: list = []


def test_envs_already_made_are_closed_when_a_later_one_fails():
    """make_envs built the batch's envs outside the rollout's try/finally: a failure at the second
    left the first open (its process, with --env-processes, ran until the parent exited)."""
    from vla_ft.rollout import make_envs

    CLOSED.clear(), CLOSED_OR_MADE.clear()
    with pytest.raises(RuntimeError, match="no memory for a second simulator"):
        make_envs("test_rollout:SecondFailsEnv", {}, {}, 5, 3)
    assert len(CLOSED) == 1 and isinstance(CLOSED[0], SecondFailsEnv)


def test_ctrl_c_ends_a_rollout_in_env_processes_with_130_and_no_traceback(tmp_path, tiny_overrides):
    """A terminal's Ctrl-C signals the whole process group: the env processes printed a
    KeyboardInterrupt traceback each and the parent a RuntimeError closing them (exit 1)."""
    run, marker = tmp_path / "run", tmp_path / "stepped"
    assert cli(["train", str(QUICKSTART), *tiny_overrides, "train.steps=2", "train.val_every=0"]) == 0
    args = ["rollout", str(run), "--env-processes", "--batch", "2", "--episodes", "1000", "--videos", "0"]
    args += ["--env", "test_rollout:SteppedEnv", "--env-kwargs", json.dumps({"marker": str(marker)})]
    path = [str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]  # keep the caller's (a GPU host's av)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vla_ft", *args], stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 180
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.stderr.read() if proc.poll() is not None else "no step in 180 s"
        os.killpg(proc.pid, signal.SIGINT)  # the group, as a terminal does
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err


def test_a_user_env_rolls_out_in_training_and_is_closed_at_the_end(tmp_path, tiny_overrides, capsys):
    CLOSED.clear()
    user = ["rollout.episodes=2", "rollout.env=test_rollout:ClosingEnv", "rollout.max_steps=2", "train.steps=3"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *user, "logging.tensorboard=false"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["val/rollout/success_rate"] for row in rows if "val/rollout/success_rate" in row] == [0.0]
    assert len(CLOSED) == 2  # both episodes at once, one env each, every env closed
    scenes = [make_scene(0, seed).blocks for seed in (0, 1)]
    assert all(np.array_equal(env.scene.blocks, blocks) for env, blocks in zip(CLOSED, scenes, strict=True))
    CLOSED.clear()  # `vla-ft rollout` closes its envs when one fails too
    capsys.readouterr()
    assert cli(["rollout", str(tmp_path / "run"), "--env", "test_rollout:FailingEnv", "--episodes", "1"]) == 2
    assert len(CLOSED) == 1
    assert "command line: --env: action: this env takes 7 values" in capsys.readouterr().err
    # without --env the checkpoint's own rollout.env runs: its errors name that key, not the flag
    checkpoint = tmp_path / "run" / "checkpoints" / "step_000003"
    config = checkpoint / "config.yaml"
    config.write_text(config.read_text().replace("test_rollout:ClosingEnv", "test_rollout:FailingEnv"))
    assert cli(["rollout", str(checkpoint), "--episodes", "1"]) == 2
    assert "recipe: rollout.env: action: this env takes 7 values" in capsys.readouterr().err


def test_validation_rolls_out_in_env_processes_and_ends_them(tmp_path, tiny_overrides):
    import multiprocessing

    procs = ["rollout.episodes=2", "rollout.env_processes=true", "rollout.max_steps=3", "train.steps=3"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *procs, "logging.tensorboard=false"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["val/rollout/success_rate"] for row in rows if "val/rollout/success_rate" in row] == [0.0]
    assert not multiprocessing.active_children()  # both env processes closed with the run


def test_rollouts_in_validation_run_under_the_runs_autocast(tmp_path, tiny_overrides, monkeypatch):
    """fp32 weights with train.precision=bf16: the rollouts run under bf16 autocast as validation does."""
    import vla_ft.rollout as rollout_module

    dtypes, real = [], rollout_module.chunk_runner
    monkeypatch.setattr(rollout_module, "chunk_runner", lambda p, e, m: dtypes.append(p.dtype) or real(p, e, m))
    bf16 = ["train.precision=bf16", "train.param_dtype=fp32", "train.steps=3", "rollout.episodes=1"]
    assert cli(["train", str(QUICKSTART), *tiny_overrides, *bf16, "rollout.max_steps=2"]) == 0
    assert dtypes == [torch.bfloat16]
