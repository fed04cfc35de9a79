"""``vla-ft eval CHECKPOINT [data overrides]``: offline metrics on held-out episodes, in real units.

CHECKPOINT is anything :func:`vla_ft.policy.resolve_directory` takes: a checkpoint, the ``best``
or ``latest`` pointer of a run's ``checkpoints/``, a run directory, or an export. The model comes
back from that directory alone (:func:`vla_ft.model_files.load_model`: no hub or pretrained file
is read); the data from its ``config.yaml`` plus overrides of where the data is and which episodes
(:data:`OVERRIDABLE`), normalised with its ``norm_stats.json`` and tokenised with its
``tokenizer/``, exactly as in training. Metrics are those of validation
(:class:`vla_ft.metrics.ActionMetrics`): per-dimension L1 and MSE, the mean-action baseline,
gripper accuracy, F1 and accuracy at transitions (a NaN prediction counted in ``gripper_nan``, not
scored), L1 by chunk horizon, and token accuracy and perplexity when the LM has a language target. Output::

    <out>/                       default: CHECKPOINT/eval
      metrics.json               checkpoint, step, episodes, samples, overrides, metrics (NaN -> null,
                                 +-inf -> "Infinity"/"-Infinity", as metrics.jsonl; see read_report)
      trajectories.png           predicted vs true chunk-step-0 action over a few episodes

Which episodes: ``--episodes val`` (default: the checkpoint recipe's held-out split, or the split
of the overridden dataset), ``all``, or ids ``3,7,9``. The data must run at the control rate the
checkpoint trained at (``fps`` in its model_meta.json), else an error naming ``data.fps``:
``--allow-fps-mismatch`` evaluates anyway (:func:`check_rate`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from vla_ft.config import DATA_SOURCE, DATA_SPLIT, LOADER_KEYS, Recipe, RecipeError, apply_overrides, recipe_from_dict
from vla_ft.config.checks import suggest
from vla_ft.config.loader import recipe_keys

# Keys an evaluation may change: where the data is and which of its episodes (the same dataset
# elsewhere, or another dataset of the same robot), and how to run. The rest is fixed by the
# checkpoint, the way samples are built included: another one would change what is measured.
OVERRIDABLE = (
    *DATA_SOURCE,
    *DATA_SPLIT,
    *LOADER_KEYS,
    "data.fps",  # the evaluated dataset's control rate (RLDS records none); unread formats still refuse it
    "data.text_key",
    "data.synthetic.",
    "data.frame_cache",
    "data.video_tolerance_s",
    "train.batch_size",
    "train.device",
    "train.precision",
    "train.threads",
)
# Why a data key is refused all the same (first matching prefix); any other known key: the checkpoint fixes it.
FIXED = {
    "data.normalize": "the checkpoint's norm_stats.json sets the normalisation",
    "data.raw_dims": "the checkpoint's norm_stats.json sets the normalisation",
    "data.delta_": "the checkpoint's norm_stats.json sets which action dims are offsets from the state",
    "data.prompt_template": "the model was trained on the checkpoint's prompt; another one changes the metric",
    "data.language_target": "token accuracy is measured on the target the model was trained on",
    "data.chunk": "the model predicts the chunk it was trained with",
    "data.history": "the model reads the state history it was trained with",
    "data.augment": "evaluation never augments images",
}
CHECKPOINT_HELP = (
    "checkpoint directory (RUN/checkpoints/step_N), RUN/checkpoints/best (best validation metric), "
    "RUN/checkpoints/latest, or a run directory RUN (its newest checkpoint)"
)


def refused_override(override: str) -> str | None:
    """``key: why`` for an override ``vla-ft eval`` refuses, else None."""
    key = override.split("=", 1)[0].strip()
    if key.startswith(OVERRIDABLE):
        return None
    keys = recipe_keys()
    why = next((why for prefix, why in FIXED.items() if key.startswith(prefix)), None)
    if why is None and _is_recipe_key(key, keys):
        why = "the checkpoint fixes it"
    elif why is None:  # a typo, most likely of a key eval takes
        why = "not a recipe key" + suggest(key, keys)
    return f"{key}: {why}"


def _is_recipe_key(key: str, keys: list[str]) -> bool:
    """A schema key, or an entry of a dict-valued one (``model.vision.kwargs.depth``)."""
    sections = {k.rsplit(".", 1)[0] for k in keys if "." in k}
    parts = key.split(".")
    return key in keys or any(".".join(parts[:i]) in set(keys) - sections for i in range(1, len(parts)))


def eval_recipe(checkpoint: Path, overrides: Sequence[str]) -> Recipe:
    """The checkpoint's recipe plus the data-location and how-to-run overrides of :data:`OVERRIDABLE`."""
    from vla_ft.run_state import read_saved_recipe

    refused = [why for why in map(refused_override, overrides) if why]
    if refused:
        raise RecipeError(
            "eval overrides may change where the data is, which episodes and how to run "
            f"({', '.join(OVERRIDABLE)}) only; refused {'; '.join(refused)}",
            "command line",
        )
    raw = read_saved_recipe(checkpoint)
    # eval selects no checkpoint: the best metric, maybe of a source the overrides leave out, is not checked
    train = {k: v for k, v in raw.get("train", {}).items() if k not in ("best_metric", "best_mode")}
    raw["train"] = {**train, "resume": False, "cache_features": False, "feature_cache_dir": None}
    raw["data"].setdefault("augment", {})["enabled"] = False
    raw["rollout"] = {**(raw.get("rollout") or {}), "episodes": 0}  # eval rolls nothing out: no env to check
    keys = [o.split("=", 1)[0].strip() for o in overrides]
    if "data.path" in keys:  # one dataset in place of the mixture trained on, or the other way round
        raw["data"]["mix"] = {}
    elif any(k.startswith("data.mix.") for k in keys) and not raw["data"].get("mix"):
        raw["data"]["path"] = None
    trained_format = raw["data"].get("format")
    raw = apply_overrides(raw, overrides)
    drop_unread_format_keys(raw["data"], trained_format, keys)
    # training=False: rules about how the run trained (its step schedules, ...) judge no key an evaluation
    # reads, and one added after the checkpoint trained would refuse it; the overrides are judged in full
    return recipe_from_dict(raw, str(checkpoint / "config.yaml"), training=False)


def drop_unread_format_keys(data: dict[str, Any], trained_format: str | None, overridden: list[str]) -> None:
    """The trained format's own keys, when an override chose another format: ``data.layout`` where
    the new one never reads it (validation refuses unread keys), and always ``data.fps``: the rate
    of the dataset trained on says nothing of another one (HDF5 files record their own; it would
    override theirs). Keys the overrides set are kept (and judged). An RLDS dataset records no rate:
    without ``data.fps=HZ`` among the overrides, a RecipeError naming the key."""
    fmt = data.get("format", "synthetic")
    if fmt == trained_format:
        return
    for key in ("fps", "layout") if fmt != "hdf5" else ("fps",):
        if f"data.{key}" not in overridden:
            data.pop(key, None)
    if fmt == "rlds" and data.get("fps") is None:
        raise RecipeError(
            f"data.fps: required to evaluate on data.format=rlds (RLDS records no control rate; the checkpoint "
            f"trained on data.format={trained_format}); add data.fps=HZ, the evaluated dataset's rate",
            "command line",
        )


def select_episodes(spec: str, train: list[int], val: list[int]) -> list[int]:
    """``val`` | ``all`` | comma-separated episode ids -> sorted episode ids."""
    everything = sorted({*train, *val})
    if spec == "val":
        if not val:
            raise RecipeError(
                "--episodes val: the recipe holds out no episodes (data.val_ratio=0); pass 'all' or ids", "command line"
            )
        return list(val)
    if spec == "all":
        return everything
    try:
        wanted = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise RecipeError(
            f"--episodes: expected val, all or comma-separated ids, got '{spec}'", "command line"
        ) from None
    unknown = sorted(set(wanted) - set(everything))
    if unknown or not wanted:
        raise RecipeError(
            f"--episodes: unknown episode(s) {unknown or spec}; the dataset has {len(everything)}", "command line"
        )
    return wanted


def trained_among(checkpoint: Path, ids: list[int], overrides: Sequence[str]) -> list[int]:
    """Which of ``ids`` trained the checkpoint, on the dataset it trained on: split overrides
    (``data.val_ratio``, ``data.val_episodes``, more synthetic episodes) re-draw the validation set,
    and a "held-out" score would include episodes the model learned. The split a checkpoint trained
    with is in its ``trainer_state.json`` (exports and older checkpoints: none known)."""
    from vla_ft.run_state import read_trainer_state

    other_data = any(o.split("=", 1)[0].strip().startswith(("data.path", "data.mix", "data.format")) for o in overrides)
    saved = read_trainer_state(checkpoint).get("episodes") if not other_data else None
    return sorted(set(ids) & set(saved["train"])) if saved else []


@dataclass
class Evaluation:
    """What an evaluation runs on, rebuilt from a checkpoint directory."""

    checkpoint: Path
    recipe: Recipe
    rt: Any  # vla_ft.runtime.Runtime
    model: Any  # vla_ft.model.VLA, eval mode
    data: Any  # vla_ft.data.DataBundle, normalised with the checkpoint's statistics
    tokenizer: Any


def load_evaluation(path: str | Path, overrides: Sequence[str] = (), allow_fps_mismatch: bool = False) -> Evaluation:
    """Checkpoint (or run directory) + data overrides -> model, data and runtime, as trained.
    ``allow_fps_mismatch``: evaluate data of another control rate than trained on (a warning)."""
    # Heavy imports live in the functions that run the model, so `vla-ft --help` stays fast.
    from vla_ft.data import build_data
    from vla_ft.metrics import trains_language
    from vla_ft.model_files import known_fps, load_model, load_saved_tokenizer, read_norm_stats, recorded_prompt_prefix
    from vla_ft.policy import resolve_directory
    from vla_ft.runtime import init_runtime

    ckpt = resolve_directory(path)
    recipe = eval_recipe(ckpt, overrides)
    rt = init_runtime(recipe)
    tokenizer = load_saved_tokenizer(ckpt)
    model, meta = load_model(ckpt, rt.device)
    data = build_data(recipe, tokenizer, read_norm_stats(ckpt), recorded_prompt_prefix(meta))
    check_compatible(meta, data.state_dim, data.action_dim, list(data.cameras), recipe.data.chunk, recipe.data.history)
    check_rate(meta, known_fps(data.reader), allow_fps_mismatch)
    model.wants_language = trains_language(recipe)  # token accuracy, as validation logged it
    return Evaluation(ckpt, recipe, rt, model, data, tokenizer)


def episode_loader(ev: Evaluation, episodes: list[int]):
    """A sequential DataLoader over ``episodes`` (any of the dataset's), built like validation's."""
    from robot_data import RobotDataset
    from vla_ft.data import make_loader
    from vla_ft.model import pad_token_id
    from vla_ft.samplers import EpochSampler

    r, d = ev.recipe, ev.data
    dataset = RobotDataset(
        d.reader,
        episodes,
        r.data.chunk,
        r.data.history,
        d.normalizer,
        r.model.vision.img_size,
        d.train_set.prompt_tokenizer,
        d.cameras,
        seed=r.train.seed,
    )
    sampler = EpochSampler(len(dataset), r.train.seed, False)
    return make_loader(dataset, r, sampler, pad_token_id(ev.tokenizer), ev.rt.device, train=False)


def evaluate_checkpoint(
    path: str | Path,
    overrides: Sequence[str] = (),
    episodes: str = "val",
    out: str | Path | None = None,
    plot_episodes: int = 3,
    allow_fps_mismatch: bool = False,
) -> dict[str, Any]:
    """Evaluate a checkpoint (or a run directory's newest) and write metrics.json + trajectories.png.
    ``allow_fps_mismatch``: evaluate data of another control rate than trained on (:func:`check_rate`).

    Returns the metrics.json content plus ``trajectories`` (the plotted arrays) and ``out``.
    """
    from vla_ft import plots
    from vla_ft.metrics import ActionMetrics, source_metrics
    from vla_ft.run_setup import check_output_dir

    if plot_episodes < 0:  # a negative slice would plot all but the last episodes
        raise ValueError(f"plot_episodes: a count of episodes, >= 0, got {plot_episodes}")
    if out:
        check_output_dir(Path(out), "--out")
    ev = load_evaluation(
        path, overrides, allow_fps_mismatch
    )  # refused overrides and damaged checkpoints are reported first
    if not out:
        keep_other_evaluation(ev.checkpoint / "eval", overrides, episodes)
    r, d = ev.recipe, ev.data
    ids = select_episodes(episodes, d.train_episodes, d.val_episodes)
    trained = trained_among(ev.checkpoint, ids, overrides)
    if trained and episodes == "val":
        print(f"warning: episode(s) {trained[:10]} of this validation set trained the checkpoint", file=sys.stderr)
    loader = episode_loader(ev, ids)
    gripper = r.loss.gripper.dims if r.model.gripper_head else []
    make = partial(
        ActionMetrics, d.normalizer, d.action_dim, r.data.chunk, gripper, r.loss.gripper, r.model.gripper_head
    )
    metrics, per_source = make(), source_metrics(d.reader, ids, make)
    trajectories = predict(ev.model, loader, metrics, ev.rt, set(ids[:plot_episodes]), per_source)
    report = {
        "checkpoint": str(ev.checkpoint),
        "step": trained_steps(ev.checkpoint),
        "episodes": ids,
        "selection": episodes,
        "trained_episodes": trained,  # among those evaluated: not held out
        "samples": len(loader.dataset),
        "overrides": list(overrides),
        "metrics": {**metrics.compute(prefix=""), **(per_source.compute(prefix="") if per_source else {})},
    }
    out_dir = Path(out) if out else ev.checkpoint / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    from vla_ft.checkpoint import write_atomically
    from vla_ft.tracking import json_safe

    write_atomically(out_dir / "metrics.json", json.dumps(json_safe(report), indent=1))  # read_report reads it
    if trajectories:
        plots.plot_trajectories(trajectories, out_dir / "trajectories.png")
    return {**report, "trajectories": trajectories, "out": out_dir}


def read_report(path: str | Path) -> dict[str, Any]:
    """An ``eval/metrics.json`` with its metrics back as numbers: null -> NaN, "Infinity"/"-Infinity"
    -> +-inf (:func:`vla_ft.tracking.json_numbers`; files written before the infinities were spelled
    out hold null for them: NaN). Only ``metrics`` is decoded: elsewhere null means unknown (the
    step of an export) and a string is a string (a checkpoint path)."""
    from vla_ft.tracking import json_numbers

    report = json.loads(Path(path).read_text())
    if isinstance(report, dict) and isinstance(report.get("metrics"), dict):
        report["metrics"] = json_numbers(report["metrics"])
    return report


def keep_other_evaluation(out_dir: Path, overrides: Sequence[str], episodes: str) -> None:
    """The default output directory may hold an evaluation of other data or episodes: refuse to
    overwrite it (the same evaluation run again is overwritten)."""
    path = out_dir / "metrics.json"
    if not path.is_file():
        return
    try:
        saved = read_report(path)
        before = (saved["overrides"], saved.get("selection", "val"))  # older files: the default selection
    except (ValueError, KeyError, TypeError):
        before = None  # not written by vla-ft eval, or damaged: keep it too
    if before != (list(overrides), episodes):
        what = (
            "a file vla-ft eval did not write" if before is None else f"overrides {before[0]}, --episodes {before[1]}"
        )
        raise RecipeError(
            f"--out: {out_dir} holds another evaluation ({what}); pass --out DIR to keep both, or delete it"
        )


def trained_steps(directory: Path) -> int | None:
    """The step a checkpoint was saved at; None for an export (it has no trainer_state.json)."""
    from vla_ft.checkpoint import load_json, reading

    path = directory / "trainer_state.json"
    if not path.is_file():
        return None
    with reading(path, directory):
        return int(load_json(path, directory)["state"]["step"])


def check_compatible(
    meta: dict[str, Any], state_dim: int, action_dim: int, cameras: list[str], chunk: int, history: int
) -> None:
    """The (possibly overridden) data must have the shapes the checkpoint was trained on.

    Each camera position has its own encoder input: cameras that share names with the
    checkpoint's must come in its order; wholly other names (another dataset) map by position.
    """
    have = {"state_dim": state_dim, "action_dim": action_dim, "cameras": len(cameras)}
    want = {"state_dim": meta["state_dim"], "action_dim": meta["action_dim"], "cameras": len(meta["cameras"])}
    wrong = [f"{k} {have[k]} (checkpoint: {want[k]})" for k in have if have[k] != want[k]]
    if wrong:
        raise RecipeError(f"data: the evaluated data does not fit the checkpoint: {', '.join(wrong)}")
    if set(cameras) & set(meta["cameras"]) and cameras != list(meta["cameras"]):
        raise RecipeError(f"data.cameras: {cameras}, the checkpoint was trained on {meta['cameras']} in this order")
    for key, value, trained in (("data.chunk", chunk, meta["chunk"]), ("data.history", history, meta["history"])):
        if value != trained:
            raise RecipeError(f"{key}: {value}, the checkpoint was trained with {trained}")


def check_rate(meta: dict[str, Any], fps: float | None, allowed: bool = False) -> None:
    """The evaluated data's control rate ``fps`` must be the one the checkpoint trained at: a chunk
    of actions spans ``chunk / fps`` seconds, so at another rate every predicted step is matched
    with a frame at another time. A RecipeError naming ``data.fps`` and both rates, or with
    ``allowed`` (``--allow-fps-mismatch``) a warning. Checkpoints written before the rate was
    recorded (no ``fps`` in model_meta.json), and data of no known rate, are not checked."""
    trained = meta.get("fps")
    if trained is None or fps is None or math.isclose(fps, trained, rel_tol=1e-6):
        return
    chunk = meta["chunk"]
    why = (
        f"data.fps: the evaluated data runs at {fps:g} Hz, the checkpoint trained at {trained:g} Hz "
        f"(a chunk of {chunk} actions spans {chunk / trained:.3g} s; here it is scored over {chunk / fps:.3g} s)"
    )
    if allowed:
        warnings.warn(f"{why}; evaluating anyway (--allow-fps-mismatch)", stacklevel=2)
        return
    raise RecipeError(
        f"{why}; evaluate data recorded at {trained:g} Hz, set data.fps=HZ if the dataset's recorded rate is "
        "wrong, or pass --allow-fps-mismatch to evaluate anyway",
        "command line",
    )


def predict(model, loader, metrics, rt, keep: set[int], per_source=None) -> dict[int, dict[str, Any]]:
    """Run ``model`` over ``loader`` feeding ``metrics`` (and a mixture's ``per_source`` metrics); return
    chunk-step-0 predicted and true actions in real units for the episodes in ``keep``:
    {episode: {frames (T,), pred (T, A), true (T, A)}}."""
    import numpy as np
    import torch

    from vla_ft.data import to_device

    rows: dict[int, list[tuple[int, Any, Any]]] = {e: [] for e in keep}
    model.eval()
    with torch.inference_mode():
        for batch in loader:
            batch = to_device(batch, rt.device)
            with rt.autocast():
                outputs = model(batch)
            metrics.update(outputs, batch)
            if per_source is not None:
                per_source.update(outputs, batch)
            if not keep:
                continue
            # chunk step 0, absolute also for delta actions (a state entry missing in the data reads as its mean)
            source = batch["source"]
            state = metrics.real("state", batch["state"][:, -1], source)
            pred = metrics.norm.absolute_actions(metrics.predicted_real(outputs, source)[:, :1], state)[:, 0].numpy()
            true = metrics.norm.absolute_actions(metrics.real("action", batch["actions"][:, :1], source), state)
            true = true[:, 0].numpy()
            for i, (e, f) in enumerate(
                zip(batch["episode_index"].tolist(), batch["frame_index"].tolist(), strict=True)
            ):
                if e in keep:
                    rows[e].append((f, pred[i], true[i]))
    out = {}
    for e, items in sorted(rows.items()):
        items.sort(key=lambda item: item[0])
        out[e] = {
            "frames": np.array([f for f, _, _ in items]),
            "pred": np.stack([p for _, p, _ in items]),
            "true": np.stack([t for _, _, t in items]),
        }
    return out


def format_report(report: dict[str, Any]) -> str:
    """Headline metrics, then per-dimension L1/MSE and L1 by horizon, as aligned text tables."""
    m = report["metrics"]
    # an export keeps no trainer state, so its step is unknown (null in metrics.json), not "None"
    step = "an export: trained step not recorded" if report["step"] is None else f"step {report['step']}"
    lines = [
        f"checkpoint {report['checkpoint']} ({step}): {len(report['episodes'])} episodes, {report['samples']} samples"
    ]
    headline = (
        "action_l1",
        "action_mse",
        "baseline_l1",
        "gripper_acc",
        "gripper_f1",
        "gripper_transition_acc",
        "gripper_nan",
        "token_acc",
        "perplexity",
    )
    lines += [f"  {k:<24} {m[k]:.6g}" for k in headline if k in m]
    dims = sorted(int(k.rsplit("dim", 1)[1]) for k in m if k.startswith("action_l1/dim"))
    lines += ["", "  dim        L1          MSE"]
    lines += [f"  {d:<6} {m[f'action_l1/dim{d}']:<11.6g} {m[f'action_mse/dim{d}']:.6g}" for d in dims]
    horizons = sorted(int(k.rsplit("/h", 1)[1]) for k in m if k.startswith("action_l1/h"))
    lines += ["", "  horizon    L1"]
    lines += [f"  {h:<10} {m[f'action_l1/h{h}']:.6g}" for h in horizons]
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    result = evaluate_checkpoint(
        args.checkpoint, args.overrides, args.episodes, args.out, args.plot_episodes, args.allow_fps_mismatch
    )
    print(format_report(result))
    names = ["metrics.json"] + (["trajectories.png"] if result["trajectories"] else [])
    print("wrote " + ", ".join(str(result["out"] / name) for name in names))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    from vla_ft.data_cli import at_least

    text = "metrics of a checkpoint or export on held-out episodes in real units: a table, JSON and a trajectory plot"
    p = sub.add_parser("eval", help=text, description=text)
    p.add_argument("checkpoint", help=CHECKPOINT_HELP + "; or an export directory (vla-ft export)")
    p.add_argument(
        "overrides",
        nargs="*",
        help="where the data is, which episodes, how to run: e.g. data.path=... data.val_episodes=[3,4] "
        "train.device=cuda (model, normalisation and prompt stay the checkpoint's)",
    )
    p.add_argument("--episodes", default="val", help="val (held-out split, default), all, or ids like 3,7,9")
    p.add_argument("--out", default=None, help="output directory (default CHECKPOINT/eval)")
    p.add_argument("--plot-episodes", type=at_least(0), default=3, help="episodes drawn in trajectories.png")
    p.add_argument(
        "--allow-fps-mismatch",
        action="store_true",
        help="evaluate data of another control rate (data.fps) than the checkpoint trained at, with a warning "
        "(refused otherwise: an action chunk then spans another time)",
    )
    p.set_defaults(func=cmd_eval)
