"""``vla-ft rollout``: run a policy closed loop in an environment and score its success rate.

Held-out action L1 says how closely a policy imitates the demonstrations; only a rollout, where
its own actions decide what it sees next, says whether it finishes the task. The loop speaks
gymnasium's API (``reset(seed=)`` -> ``(obs, info)``, ``step`` -> ``(obs, reward, terminated,
truncated, info)``) and LeRobot's gym observations (``obs["pixels"]``: ``{camera: (H, W, 3)}`` or
one array, ``obs["agent_pos"]``: the state; success from ``info["is_success"]``), so gymnasium
environments (``--env gymnasium:make --env-kwargs '{"id": ...}'``) and any factory returning such an
environment (``--env my_pkg.envs:make_env``) run as they are. A policy trained on the embedded
synthetic task rolls out in :class:`robot_data.synthetic_env.SyntheticPickEnv` by default, on
scenes past the training episodes. Actions come from :class:`vla_ft.ChunkRunner` (receding
horizon or temporal ensembling).

Writes ``rollouts.json`` (per episode: seed, success, steps, return; the success rate; ``fps``, the
control rate the checkpoint trained at, null where it records none) and MP4s of the first episodes
(what the policy's first camera saw) to ``CHECKPOINT/rollout`` or ``--out``. The env protocol declares
no control rate (gymnasium's ``metadata["render_fps"]`` is a rendering rate, used for the videos only),
so the rate is reported, not checked: an env must step at ``fps`` for the policy's actions to mean
what they meant in training.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vla_ft.config import RecipeError, RolloutConfig, to_dict
from vla_ft.env_process import EnvProcess
from vla_ft.execution import ChunkRunner


@dataclass
class EpisodeResult:
    seed: int
    success: bool
    steps: int  # env steps taken
    reward: float  # sum of the env's rewards
    instruction: str
    frames: list[np.ndarray] = field(default_factory=list, repr=False)  # first camera, when recorded


def policy_inputs(obs: Mapping[str, Any], cameras: Sequence[str], state_key: str) -> tuple[dict[str, Any], Any]:
    """A gym observation -> (``{policy camera: frame}``, state). An env camera matches a policy
    camera by its name or the name's last dotted part (``observation.images.top`` <-> ``top``)."""
    if "pixels" not in obs or state_key not in obs:
        raise ValueError(f"observation: expected keys 'pixels' and '{state_key}', got {sorted(obs)}")
    pixels = obs["pixels"]
    if not isinstance(pixels, Mapping):
        if len(cameras) != 1:
            raise ValueError(f"observation: one 'pixels' array, but the policy reads cameras {list(cameras)}")
        return {cameras[0]: pixels}, obs[state_key]
    images = {}
    for camera in cameras:
        key = camera if camera in pixels else camera.rsplit(".", 1)[-1]
        if key not in pixels:
            raise ValueError(f"observation: no camera '{camera}' (or '{key}') in pixels; it has {sorted(pixels)}")
        images[camera] = pixels[key]
    return images, obs[state_key]


class _Episode:
    """One episode in progress on ``env``: its observation, state history and result."""

    def __init__(
        self,
        env: Any,
        seed: int,
        cameras: Sequence[str],
        history: int,
        instruction: str | None,
        max_steps: int | None,
        state_key: str,
        record: bool,
    ):
        self.obs, info = env.reset(seed=seed)
        task = instruction or info.get("task") or getattr(env, "task", None)
        if not task:
            raise ValueError("instruction: the env gives no task (info['task'] or env.task); pass --instruction")
        self.env, self.cameras, self.history, self.max_steps = env, cameras, history, max_steps
        self.state_key, self.record = state_key, record
        self.states: deque[np.ndarray] = deque(maxlen=history)
        self.result = EpisodeResult(seed, False, 0, 0.0, task)
        self._stepped: tuple | None = None  # the in-process env's answer to the action sent

    def inputs(self) -> tuple[dict[str, Any], str, np.ndarray]:
        """(images, instruction, state) for this step; state (S,), or (history, S) oldest first, whose
        first step repeats its state for the frames before it, as training samples do."""
        images, state = policy_inputs(self.obs, self.cameras, self.state_key)
        state = np.asarray(state, np.float32)
        while len(self.states) < self.history - 1:
            self.states.append(state)
        self.states.append(state)
        if self.record:
            self.result.frames.append(np.asarray(images[self.cameras[0]]))
        return images, self.result.instruction, np.stack(self.states) if self.history > 1 else state

    def send(self, action: np.ndarray) -> None:
        """Send ``action``; an env in its own process steps while the caller sends the others theirs."""
        if isinstance(self.env, EnvProcess):
            self.env.step_async(action)
            self._stepped = None
        else:
            self._stepped = self.env.step(action)

    def receive(self) -> bool:
        """The sent action's outcome: whether the episode is over (the env ended it, or ``max_steps``)."""
        stepped = self.env.step_wait() if self._stepped is None else self._stepped
        self.obs, reward, terminated, truncated, info = stepped
        r = self.result
        r.steps, r.reward = r.steps + 1, r.reward + float(reward)
        r.success = r.success or bool(info.get("is_success", False))
        over = terminated or truncated or (self.max_steps is not None and r.steps >= self.max_steps)
        if over and self.record:
            r.frames.append(np.asarray(policy_inputs(self.obs, self.cameras, self.state_key)[0][self.cameras[0]]))
        return bool(over)


def run_episode(
    env: Any,
    runner: Any,
    seed: int,
    cameras: Sequence[str],
    history: int = 1,
    instruction: str | None = None,
    max_steps: int | None = None,
    state_key: str = "agent_pos",
    record: bool = False,
) -> EpisodeResult:
    """One episode: reset ``env`` to ``seed``, then act with ``runner`` (a ChunkRunner, or any object
    with ``reset`` and ``act(images, instruction, state)``) until the env ends it or ``max_steps``."""
    return run_episodes([env], [runner], [seed], cameras, history, instruction, max_steps, state_key, int(record))[0]


def run_episodes(
    envs: Sequence[Any],
    runners: Sequence[Any],
    seeds: Sequence[int],
    cameras: Sequence[str],
    history: int = 1,
    instruction: str | None = None,
    max_steps: int | None = None,
    state_key: str = "agent_pos",
    record: int = 0,
) -> list[EpisodeResult]:
    """The episodes of ``seeds`` on ``len(envs)`` environments at once, one runner per env: at every
    control step the :class:`~vla_ft.execution.ChunkRunner`s (of one policy) that need a chunk get it
    from one batched prediction (any other runner acts on its own), and an env whose episode ends
    takes the next seed. The first ``record`` episodes keep their frames. Results in the order of ``seeds``;
    each equals :func:`run_episode`'s for its seed up to the batch's rounding.

    Why: a batch-1 forward leaves an accelerator nearly idle, and rollouts at every validation
    (``rollout.episodes``) ran one episode after another. Every env is sent its action before any
    is waited for, so envs in their own processes (:mod:`vla_ft.env_process`) step at once.
    """
    pending = deque(enumerate(seeds))
    results: dict[int, EpisodeResult] = {}

    def begin(env: Any, runner: Any) -> tuple[int, Any, _Episode]:
        index, seed = pending.popleft()
        episode = _Episode(env, seed, cameras, history, instruction, max_steps, state_key, index < record)
        runner.reset()  # after the env's reset, as in run_episode: a scripted runner may read the new scene
        return index, runner, episode

    live = [begin(env, runner) for env, runner in list(zip(envs, runners, strict=True))[: len(seeds)]]
    while live:
        inputs = [episode.inputs() for _, _, episode in live]
        need = [k for k, (_, runner, _) in enumerate(live) if isinstance(runner, ChunkRunner) and runner.needs_chunk()]
        rows = [inputs[k] for k in need]
        chunks = dict(zip(need, predict_batch(live[need[0]][1].policy, rows), strict=True)) if need else {}
        for k, (_, runner, episode) in enumerate(live):  # every env gets its action before any is waited for
            episode.send(runner.step(chunks.get(k)) if isinstance(runner, ChunkRunner) else runner.act(*inputs[k]))
        for k, (index, runner, episode) in enumerate(live):
            if episode.receive():
                results[index] = episode.result
                live[k] = begin(episode.env, runner) if pending else None
        live = [entry for entry in live if entry is not None]
    return [results[i] for i in range(len(seeds))]


def predict_batch(policy: Any, rows: Sequence[tuple[dict[str, Any], str, np.ndarray]]) -> np.ndarray:
    """``policy.predict_action`` over rows of (images, instruction, state): (B, chunk, action_dim)."""
    images = {camera: np.stack([np.asarray(r[0][camera]) for r in rows]) for camera in rows[0][0]}
    return policy.predict_action(images, [r[1] for r in rows], np.stack([r[2] for r in rows]))


def summarize(results: Sequence[EpisodeResult]) -> dict[str, Any]:
    """Success rate and step counts over episodes, and the success rate per instruction: a
    multi-task suite (LIBERO's ten tasks) is reported task by task, where one mean hides a task
    the policy never solves."""
    wins = [r for r in results if r.success]
    tasks: dict[str, list[bool]] = {}
    for r in results:
        tasks.setdefault(r.instruction, []).append(r.success)
    return {
        "episodes": len(results),
        "success_rate": len(wins) / len(results) if results else float("nan"),
        "mean_steps_to_success": float(np.mean([r.steps for r in wins])) if wins else None,
        "mean_reward": float(np.mean([r.reward for r in results])) if results else float("nan"),
        "by_instruction": {
            task: {"episodes": len(ok), "success_rate": sum(ok) / len(ok)} for task, ok in sorted(tasks.items())
        },
    }


# ----------------------------------------------------------------------------- environments
def make_env(
    spec: str | None, kwargs: dict[str, Any], recipe: dict[str, Any], max_steps: int, key: str = "--env"
) -> tuple[Any, int]:
    """(env, the first seed to run). ``spec`` None: the synthetic task the checkpoint trained on,
    from its first unseen scene; else ``module:callable`` called with ``kwargs``. Errors name ``key``
    and say where it came from (:func:`key_source`)."""
    source = key_source(key)
    if spec is None and kwargs:
        raise RecipeError(
            f"{key}: keyword arguments {kwargs} given, but no env to call with them (module:callable)", source
        )
    if spec is None:
        data = recipe.get("data", {})
        if data.get("format", "synthetic") != "synthetic":
            raise RecipeError(
                f"{key}: the checkpoint trained on data.format={data['format']}; name its environment", source
            )
        from robot_data.synthetic_env import SyntheticPickEnv

        synth = data.get("synthetic", {})
        env = SyntheticPickEnv(synth.get("image_size", 64), synth.get("seed", 0), max_steps)
        return env, int(synth.get("episodes", 64))
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise RecipeError(f"{key}: expected module:callable (e.g. gymnasium:make), got '{spec}'", source)
    try:
        factory: Callable[..., Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise RecipeError(f"{key}: cannot load '{spec}': {err}", source) from None
    try:
        env = factory(**kwargs)
    except (TypeError, ValueError) as err:  # arguments the factory refuses
        raise RecipeError(f"{key}: {spec}(**{kwargs}) failed: {err}", source) from None
    check_env(env, spec, key)
    return env, 0


def key_source(key: str) -> str:
    """Where the env ``key`` came from, for a RecipeError's prefix: ``--env`` is the command line's,
    ``rollout.env`` the recipe's (a "recipe:" prefix on a flag sends the user to the wrong file)."""
    return "command line" if key.startswith("--") else "recipe"


def check_env(env: Any, spec: str, key: str) -> None:
    """Refuse what ``spec`` made when it is no environment (``os:getcwd`` returns a str): the
    rollout would fail at its first reset, far from the option that named it."""
    lacking = " and ".join(f"{name}()" for name in ("reset", "step") if not callable(getattr(env, name, None)))
    if lacking:
        raise RecipeError(
            f"{key}: {spec} returned a {type(env).__name__}, not an environment (it lacks {lacking}); "
            "name a callable that returns a gymnasium-style env",
            key_source(key),
        )


def make_envs(
    spec: str | None,
    kwargs: dict[str, Any],
    recipe: dict[str, Any],
    max_steps: int,
    count: int,
    key: str = "--env",
    processes: bool = False,
) -> tuple[list[Any], int]:
    """``count`` environments of :func:`make_env` (one per episode run at once) and the first seed;
    with ``processes`` each in its own process (:class:`~vla_ft.env_process.EnvProcess`). When one
    fails to start (or Ctrl-C comes meanwhile), those already made are closed before the error goes on:
    their processes would otherwise run until this one exits."""
    envs, first = [], 0
    try:
        for _ in range(count):
            if processes:
                envs.append(EnvProcess(spec, kwargs, recipe, max_steps, key))
                first = envs[0].first_seed  # (the same for every env of the spec)
            else:
                env, first = make_env(spec, kwargs, recipe, max_steps, key)
                envs.append(env)
    except BaseException:
        with contextlib.suppress(Exception):
            close_envs(envs)
        raise
    return envs, first


def close_envs(envs: Sequence[Any]) -> None:
    """Close the envs that can be closed (a simulator's renderer and processes), every one of them
    even when one fails to (left open, the others' processes outlive the run); the first failure is
    raised after."""
    failures = []
    for env in envs:
        if hasattr(env, "close"):
            try:
                env.close()
            except Exception as err:  # noqa: BLE001 - raised after the others are closed
                failures.append(err)
    if failures:
        raise failures[0]


def write_videos(results: Sequence[EpisodeResult], out: Path, fps: float) -> list[str]:
    """One MP4 per recorded episode, ``rollout_<seed>.mp4``."""
    from robot_data.video import encode_video

    names = []
    for r in results:
        if r.frames:
            names.append(f"rollout_{r.seed}.mp4")
            encode_video(r.frames, out / names[-1], fps)
    return names


def chunk_runner(policy: Any, execute: int | None, ensemble: float | None) -> Any:
    """:class:`~vla_ft.execution.ChunkRunner`; neither given: half a chunk sent per prediction."""
    if execute is None and ensemble is None:
        execute = max(1, policy.chunk // 2)
    return ChunkRunner(policy, execute=execute, ensemble=ensemble)


def rollout_metrics(run: Any) -> dict[str, float]:
    """``val/rollout/*`` of the run's weights as they are (validation swaps the average in first):
    ``rollout.episodes`` seeds, split evenly over the processes (the logged mean over ranks is then
    the mean over every episode)."""
    from vla_ft.model_files import model_meta
    from vla_ft.policy import VLAPolicy

    o, rt = run.recipe.rollout, run.rt
    if not o.episodes:
        return {}
    envs, first = run.rollout_env
    meta = model_meta(run.model, run.recipe, run.data)
    normalizer = run.data.normalizer.for_source(o.source)  # per-source statistics: those of the env's robot
    policy = VLAPolicy(run.model, meta, normalizer, run.tokenizer, rt.device)
    policy.dtype = rt.amp_dtype or policy.dtype  # the run's autocast, as held-out validation (fp32 weights too)
    runners = [chunk_runner(policy, o.execute, o.ensemble) for _ in envs]
    begin = first if o.start is None else o.start
    seeds = range(begin + rt.rank, begin + o.episodes, rt.world_size)
    results = run_episodes(envs, runners, seeds, policy.cameras, meta["history"], None, o.max_steps)
    summary = summarize(results)
    return {"val/rollout/success_rate": summary["success_rate"], "val/rollout/mean_reward": summary["mean_reward"]}


def training_envs(recipe: Any, world_size: int) -> tuple[list[Any], int] | None:
    """(envs, first seed) for ``rollout.episodes``, ``rollout.batch`` envs at most, built at setup: a
    wrong ``rollout.env`` fails before training, and a simulator starts once per run. Every process
    runs as many episodes, so the mean over ranks is the mean over episodes."""
    o = recipe.rollout
    if not o.episodes:
        return None
    if o.episodes % world_size:
        raise RecipeError(f"rollout.episodes: {o.episodes} episodes do not split evenly over {world_size} processes")
    count = min(o.batch, o.episodes // world_size)
    return make_envs(o.env, o.env_kwargs, to_dict(recipe), o.max_steps, count, "rollout.env", o.env_processes)


def rollout_checkpoint(
    path: str | Path,
    env_spec: str | None = None,
    env_kwargs: dict[str, Any] | None = None,
    episodes: int = 20,
    start: int | None = None,
    execute: int | None = None,
    ensemble: float | None = None,
    max_steps: int | None = None,
    instruction: str | None = None,
    videos: int = 2,
    out: str | Path | None = None,
    device: str = "cpu",
    batch: int | None = None,
    env_processes: bool | None = None,
    source: str | None = None,
) -> dict[str, Any]:
    """Roll a checkpoint's policy out for ``episodes`` seeds from ``start`` and write the report.
    Arguments left None come from the checkpoint recipe's ``rollout`` section (``source``: the
    mixture source whose statistics the env's robot uses, with ``data.normalize_per_source``)."""
    from vla_ft.policy import VLAPolicy, resolve_directory
    from vla_ft.run_state import read_saved_recipe

    directory = resolve_directory(path)
    recipe = read_saved_recipe(directory)
    saved = {**to_dict(RolloutConfig()), **(recipe.get("rollout") or {})}  # older checkpoints: the defaults
    # the env's errors name where it came from: the checkpoint's rollout.env when --env is not given
    key = "rollout.env" if env_spec is None and saved["env"] is not None else "--env"
    if env_spec is None:
        env_spec, env_kwargs = saved["env"], env_kwargs or saved["env_kwargs"]
    if execute is None and ensemble is None:
        execute, ensemble = saved["execute"], saved["ensemble"]
    start = saved["start"] if start is None else start
    max_steps = saved["max_steps"] if max_steps is None else max_steps
    batch = saved["batch"] if batch is None else batch
    env_processes = saved["env_processes"] if env_processes is None else env_processes
    source = saved["source"] if source is None else source
    out_dir = Path(out) if out else directory / "rollout"
    check_out_dir(out_dir)
    try:
        policy = VLAPolicy.from_pretrained(directory, device=device, source=source)
        runners = [chunk_runner(policy, execute, ensemble) for _ in range(min(batch, episodes))]
    except ValueError as err:  # a device, a source or a runner setting the policy refuses: "<argument>: ..."
        raise RecipeError(f"--{err}", "command line") from None
    envs, first = make_envs(env_spec, env_kwargs or {}, recipe, max_steps, len(runners), key, env_processes)
    try:  # env processes and simulators end whatever happens
        begin = first if start is None else start
        seeds = range(begin, begin + episodes)
        try:
            results = run_episodes(
                envs, runners, seeds, policy.cameras, policy.meta["history"], instruction, max_steps, record=videos
            )
        except ValueError as err:  # an env whose observations or actions do not fit the policy
            raise RecipeError(f"{key}: {err}", key_source(key)) from None
        out_dir.mkdir(parents=True, exist_ok=True)
        # videos play at the env's rendering rate, else the rate the policy was trained at
        fps = float(getattr(envs[0], "metadata", {}).get("render_fps") or policy.fps or 10.0)
        report = {
            "checkpoint": str(directory),
            "fps": policy.fps,  # the control rate trained at, which the env must step at: reported, not checked
            "env": env_spec or "synthetic",
            "env_kwargs": env_kwargs or {},
            "runner": {"execute": runners[0].execute, "ensemble": runners[0].ensemble},
            "batch": len(envs),
            "env_processes": env_processes,
            "max_steps": max_steps,
            **summarize(results),
            "videos": write_videos(results, out_dir, fps),
            "results": [{k: v for k, v in asdict(r).items() if k != "frames"} for r in results],
        }
        from vla_ft.checkpoint import write_atomically

        write_atomically(out_dir / "rollouts.json", json.dumps(report, indent=1))
        return {**report, "out": out_dir}
    finally:
        close_envs(envs)


def check_out_dir(out_dir: Path) -> None:
    """Refuse an output directory that is (or lies under) a file, or that cannot be written, before
    any env is made: found only when writing the report, it cost every episode's run."""
    from vla_ft.run_setup import check_output_dir

    try:
        check_output_dir(out_dir, "--out")
    except RecipeError as err:
        raise RecipeError(err.problems, "command line") from None
    existing = next(p for p in (out_dir, *out_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RecipeError(f"--out: {existing} is not writable; choose another --out", "command line")


def env_kwargs_option(text: str | None) -> dict[str, Any]:
    """``--env-kwargs``: a JSON object (the keyword arguments of the env factory)."""
    try:
        kwargs = json.loads(text) if text else {}
    except json.JSONDecodeError as err:
        raise RecipeError(f"--env-kwargs: not JSON ({err})", "command line") from None
    if not isinstance(kwargs, dict):
        what = type(kwargs).__name__
        raise RecipeError(f"--env-kwargs: must be a JSON object like '{{\"id\": ...}}', got a {what}", "command line")
    return kwargs


def cmd_rollout(args: argparse.Namespace) -> int:
    report = rollout_checkpoint(
        args.checkpoint,
        args.env,
        env_kwargs_option(args.env_kwargs),
        args.episodes,
        args.start,
        args.execute,
        args.ensemble,
        args.max_steps,
        args.instruction,
        args.videos,
        args.out,
        args.device,
        args.batch,
        args.env_processes,
        args.source,
    )
    rate, n, tasks = report["success_rate"], report["episodes"], report["by_instruction"]
    if len(tasks) > 1:
        for task, row in tasks.items():
            print(f"  {row['success_rate']:4.0%} of {row['episodes']:3d}  {task}")
    print(f"success {rate:.0%} over {n} episodes ({report['env']}); wrote {report['out'] / 'rollouts.json'}")
    trained = "an unrecorded rate" if report["fps"] is None else f"{report['fps']:g} Hz"
    print(f"the checkpoint trained at {trained}; the env's control rate is not checked (it declares none)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vla_ft.data_cli import at_least, non_negative
    from vla_ft.evaluate import CHECKPOINT_HELP

    text = "run a policy closed loop in an environment and report its success rate"
    p = sub.add_parser("rollout", help=text, description=text)
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument(
        "--env",
        default=None,
        help="module:callable returning a gymnasium-style env (default: the recipe's rollout.env, else synthetic)",
    )
    p.add_argument("--env-kwargs", default=None, help="JSON keyword arguments of the env factory")
    p.add_argument("--episodes", type=at_least(1), default=20)
    p.add_argument(
        "--start", type=at_least(0), default=None, help="first reset seed (synthetic: the first unseen scene)"
    )
    runner = p.add_mutually_exclusive_group()
    runner.add_argument(
        "--execute", type=at_least(1), default=None, help="actions sent per chunk, 1..chunk (default: half a chunk)"
    )
    runner.add_argument("--ensemble", type=non_negative, default=None, help="temporal ensembling with decay m >= 0")
    p.add_argument("--max-steps", type=at_least(1), default=None, help="(default: the recipe's rollout.max_steps)")
    p.add_argument("--instruction", default=None, help="the task in words (default: the env's)")
    p.add_argument("--videos", type=at_least(0), default=2, help="episodes written as MP4")
    p.add_argument("--out", default=None, help="output directory (default: CHECKPOINT/rollout)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--source", default=None, help="per-source statistics: the robot's source (default: rollout.source)")
    p.add_argument(
        "--batch", type=at_least(1), default=None, help="episodes run at once, one env each (default: rollout.batch)"
    )
    p.add_argument(
        "--env-processes",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each env in its own process, stepping in parallel (default: rollout.env_processes)",
    )
    p.set_defaults(func=cmd_rollout)
