"""Training state in and out of checkpoints, and the recipe-equivalence check on resume.

The directory layout is drawn in :mod:`vla_ft.checkpoint`.
"""

from __future__ import annotations

import dataclasses
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file, save_model

from vla_ft import checkpoint as ck
from vla_ft.config import DATA_SOURCE, DATA_SPLIT, Recipe, RecipeError, save_recipe, to_dict
from vla_ft.config.loader import load_yaml
from vla_ft.ema import EMA_FILE
from vla_ft.master_weights import full_precision
from vla_ft.model_files import load_weights, write_model_files
from vla_ft.tracking import mean_window

if TYPE_CHECKING:
    from vla_ft.run_setup import Run


@dataclass
class TrainState:
    step: int = 0  # optimizer updates applied (a skipped step does not count)
    epoch: int = 0
    consumed: int = 0  # samples of the current epoch already used, all ranks together
    skipped: int = 0
    consecutive_skips: int = 0
    scaler_skips: int = 0
    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0


# Keys whose change makes a resumed run a different experiment (refused), by prefix: the
# model's shape, what the data is and how it is normalised and split, the inputs and labels
# the model learns from (prompt, language targets, gripper labels), the loss's learned state,
# the optimizer's state layout (groups come from freeze/unfreeze), the batch stream, and what
# the saved best value measures (a new metric would be compared with the old one's best).
BREAKING = (
    "model.",
    *DATA_SOURCE,
    *DATA_SPLIT,
    "data.chunk",
    "data.history",
    "data.normalize",
    "data.raw_dims",
    "data.delta_",
    "data.language_target",
    "data.synthetic.",
    "data.prompt_template",
    "data.text_key",
    "loss.strategy",
    "loss.gripper.dims",
    "loss.gripper.threshold",
    "loss.gripper.closed_is_high",
    "optim.name",
    "freeze.",
    "unfreeze",
    "train.seed",
    "train.ema_",
    "train.best_metric",
    "train.best_mode",
)  # train.batch_size and optim.accumulation may change when the global batch stays (_global_batch_change)
# Exceptions inside BREAKING: how the model computes, not what it is.
HARMLESS = (
    "model.language.attn_implementation",
    "model.language.gradient_checkpointing",
    "model.vision.gradient_checkpointing",
    "model.lora.fused",
)
IGNORED = ("train.resume", "output_dir")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _flatten_saved(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved recipe, flattened; a key it lacks (added to the schema after it was written, such
    as ``train.ema_decay``) reads as the schema's default, which is how that run trained: else
    every run saved before a new key existed would read as changed, and refused where it breaks."""
    old = _flatten(saved)
    missing = {k: v for k, v in _flatten(to_dict(Recipe())).items() if k not in old}
    # a dict-valued key the saved recipe fills ({} by default, e.g. unfreeze) is not missing
    return {**{k: v for k, v in missing.items() if not any(o.startswith(k + ".") for o in old)}, **old}


def check_resume_compatible(saved: dict[str, Any], current: Recipe, where: Path, world_size: int = 1) -> None:
    """Error for changes that break equivalence with the saved run; warning for the rest.

    The global batch (``train.batch_size x optim.accumulation x processes``) must stay: a run
    resumes on another number of processes with ``train.batch_size`` adjusted.
    """
    old, new = _flatten_saved(saved), _flatten(to_dict(current))
    changed = changed_keys(old, new)
    breaking = [k for k in changed if k.startswith(BREAKING) and not k.startswith(HARMLESS)]
    problems = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in breaking]
    problems += _global_batch_change(old, current, where, world_size)
    problems += _learned_terms_change(old, new)
    problems += _mix_order_change(saved, current)
    problems += _rollout_change(old, new, changed, current)
    problems += _validation_change(old, new, changed, current)
    if problems:
        detail = "; ".join(problems)
        raise RecipeError(f"cannot resume from {where}: the recipe changed in ways that break equivalence: {detail}")
    if changed:
        warnings.warn(f"resuming from {where} with changed keys: {', '.join(changed)}", stacklevel=2)


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose value differs between two flattened recipes, except where a run is and
    whether it resumes (``IGNORED``)."""
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k) and not k.startswith(IGNORED))


def recipe_changes(saved: dict[str, Any], current: Recipe, allowed: tuple[str, ...] = ()) -> list[str]:
    """``key: old -> new`` for every key (but ``IGNORED`` and the ``allowed`` prefixes) where
    ``current`` differs from a saved recipe dict."""
    old, new = _flatten_saved(saved), _flatten(to_dict(current))
    changes = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed_keys(old, new) if not k.startswith(allowed)]
    return changes + _mix_order_change(saved, current)


def _mix_order_change(saved: dict[str, Any], current: Recipe) -> list[str]:
    """``data.mix`` numbers episodes source after source: its sources in another order (the same
    flattened keys) renumber them, so ``data.val_episodes`` and the sample order would mean others."""
    before, after = list((saved.get("data") or {}).get("mix") or {}), list(current.data.mix)
    if before == after or sorted(before) != sorted(after):  # another set of sources is a changed key
        return []
    return [f"data.mix: sources in order {before} -> {after} (episodes are numbered source after source)"]


def _rollout_change(old: dict[str, Any], new: dict[str, Any], changed: list[str], current: Recipe) -> list[str]:
    """With a ``val/rollout/*`` best metric the rollout settings are what the saved best value measures
    (other episodes, env or runner: a success rate not comparable with it); else they may change, as
    may ``rollout.batch`` and ``rollout.env_processes`` always (how the episodes run, not which)."""
    if not current.train.best_metric.startswith("val/rollout/"):
        return []
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r} (train.best_metric is a rollout's)"
        for k in changed
        if k.startswith("rollout.") and k not in ("rollout.batch", "rollout.env_processes")
    ]


# What a val/loss/<term> value is: its formula. (train.val_batches is what it is measured on.)
VAL_LOSS_KEYS = ("loss.action.", "loss.gripper.pos_weight", "loss.language.")


def _validation_change(old: dict[str, Any], new: dict[str, Any], changed: list[str], current: Recipe) -> list[str]:
    """Unless ``train.best_metric`` is a rollout's, the saved best value was measured on the
    validation samples ``train.val_batches`` chose (and a ``val/loss/*`` one with the loss's
    formula): other samples, or another formula, give values not comparable with it."""
    metric = current.train.best_metric
    if metric.startswith("val/rollout/"):
        return []
    keys = ("train.val_batches",) + (VAL_LOSS_KEYS if metric.startswith("val/loss/") else ())
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r} (the saved best {metric} was measured with {old.get(k)!r})"
        for k in changed
        if k.startswith(keys)
    ]


def read_trainer_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``trainer_state.json`` ({} when it has none)."""
    meta = path / "trainer_state.json"
    return ck.load_json(meta) if meta.is_file() else {}


def check_same_split(
    path: Path | None, state: dict[str, Any], train: list[int], val: list[int], recipe: Recipe
) -> None:
    """The run's training and validation episodes must be those of the checkpoint ``path`` resumed
    from (``state``: its trainer state): a dataset that gained or lost episodes (or one more skipped
    as bad) re-draws the split, so the resumed run would validate on episodes it trained on and the
    saved best value would measure other episodes. Checkpoints older than the saved split are not checked."""
    saved = state.get("episodes")
    if saved is None or (saved["train"], saved["val"]) == (train, val):
        return
    from vla_ft.data import data_sources

    key = next(iter(data_sources(recipe)), "data.synthetic")
    moved = sorted(set(saved["train"]) & set(val)) or sorted(set(saved["val"]) & set(train))
    raise RecipeError(
        f"cannot resume from {path}: the split of {key} changed ({len(saved['train'])} training / "
        f"{len(saved['val'])} validation episodes then, {len(train)} / {len(val)} now"
        + (f"; episode(s) {moved[:5]} changed sides" if moved else "")
        + "): the dataset changed since the checkpoint; restore it, or start a new run"
    )


def saved_validation_samples(saved: dict[str, Any], state: dict[str, Any], current: Recipe) -> int | None:
    """The validation sample count of the run a checkpoint (``saved`` recipe, ``state`` trainer state)
    belongs to (:func:`vla_ft.samplers.validation_samples`), or None where ``current`` sets another
    ``train.val_batches`` (allowed with a rollout's best metric). Checkpoints older than the count in
    the trainer state give their recipe's."""
    old = _flatten_saved(saved)
    if old["train.val_batches"] != current.train.val_batches:
        return None
    return int(state.get("val_samples", int(old["train.val_batches"]) * int(old["train.batch_size"])))


def _learned_terms_change(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """uncertainty and DWA keep one learned entry per term with a non-zero weight: that set must stay."""
    strategy = new.get("loss.strategy")
    if strategy not in ("uncertainty", "dwa"):
        return []
    before, after = (sorted(k[13:] for k, v in d.items() if k.startswith("loss.weights.") and v) for d in (old, new))
    if before == after:
        return []
    return [f"loss.weights: terms with a non-zero weight {before} -> {after} ({strategy} learns a state per term)"]


def _global_batch_change(old: dict[str, Any], current: Recipe, where: Path, world_size: int) -> list[str]:
    saved_world = read_trainer_state(where).get("world_size", 1)
    b, a = old.get("train.batch_size", 1), old.get("optim.accumulation", 1)
    before, after = b * a * saved_world, current.train.batch_size * current.optim.accumulation * world_size
    if before == after:
        return []
    per_device = current.optim.accumulation * world_size
    hint = f" (train.batch_size={before // per_device} keeps it)" if before % per_device == 0 else ""
    return [
        f"global batch (train.batch_size x optim.accumulation x processes): {b} x {a} x {saved_world} = {before} "
        f"-> {current.train.batch_size} x {current.optim.accumulation} x {world_size} = {after}{hint}"
    ]


def save_training_checkpoint(run: Run) -> Path | None:
    """Write ``checkpoints/step_<N>`` (rank 0), rotate, and return its path (None on other ranks).

    Under FSDP every rank first writes its shards (the ``stage_model_state`` hook); rank 0 moves
    them into the temporary directory, so the checkpoint still appears atomically.
    """
    path = None
    # collective: each rank's own log window and dropout stream
    windows, rngs = map(list, zip(*run.rt.gather_objects((run.window.state_dict(), ck.rng_state())), strict=True))
    stage = run.hooks.stage_model_state
    staged = stage(run) if stage is not None else None  # collective: every rank takes part
    if run.rt.is_main:
        root = run.run_dir / "checkpoints"
        model = run.model
        estimate = checkpoint_bytes(run)

        def write(tmp: Path) -> None:
            with full_precision(model):  # bf16 weights: their fp32 masters are what is saved
                write_files(tmp)

        def write_files(tmp: Path) -> None:
            if staged is not None:
                from vla_ft.distributed import DCP_DIR

                os.replace(staged, tmp / DCP_DIR)  # sharded weights and optimizer state
            else:
                save_model(model, str(tmp / "model.safetensors"))
                if run.recipe.checkpoint.save_optimizer:
                    torch.save(run.optimizer.state_dict(), tmp / "optimizer.pt")
            write_model_files(run, tmp)  # model_meta.json, language_model/, PEFT adapters
            if run.ema is not None:
                run.ema.save(tmp / EMA_FILE)
            loss_state = {k: v.detach().cpu().contiguous() for k, v in run.loss_fn.state_dict().items()}
            if loss_state:
                save_file(loss_state, str(tmp / "loss_state.safetensors"))
            torch.save(ck.rng_file(rngs), tmp / "rng.pt")
            ck.save_json(tmp / "trainer_state.json", trainer_json(run, windows))
            ck.save_json(tmp / "norm_stats.json", run.data.normalizer.to_dict())
            save_recipe(run.recipe, tmp / "config.yaml")
            run.tokenizer.save_pretrained(str(tmp / "tokenizer"))

        path = ck.write_checkpoint(root, run.state.step, write, estimate_bytes=estimate)
        best = root / ck.step_dir_name(run.state.best_step) if run.state.best_step is not None else None
        if run.state.best_step == run.state.step:
            ck.write_pointer(root, "best", path.name)
        ck.rotate(root, run.recipe.checkpoint.keep_last, {p for p in (best, run.resumed_from) if p is not None})
    run.rt.barrier()
    return path


def restore_best_pointer(run: Run) -> None:
    """On resume, point ``checkpoints/best`` at the best checkpoint of the restored state. After a
    hand rollback (newer checkpoints deleted) it may name a checkpoint that is gone, or a step the
    resumed run saves again without it being the best. If the best checkpoint itself is gone the
    pointer is removed (with a warning) until a validation beats the restored best value."""
    root, st = run.run_dir / "checkpoints", run.state
    best = root / ck.step_dir_name(st.best_step) if st.best_step is not None else None
    if best is not None and ck.is_complete(best):
        ck.write_pointer(root, "best", best.name)
        return
    (root / "best").unlink(missing_ok=True)
    if best is not None:
        warnings.warn(
            f"{best} is gone: it held the best {run.recipe.train.best_metric} ({st.best_value:.4g}) of the state "
            f"resumed from; {root / 'best'} is removed until a validation beats that value",
            stacklevel=2,
        )


def checkpoint_bytes(run: Run) -> int:
    """About what a checkpoint takes on disk: weights, two Adam moments per trainable weight, and
    the fp32 weight average (``train.ema_decay``)."""
    weights = sum(t.numel() * t.element_size() for t in run.model.state_dict().values())
    moments = 2 * sum(p.numel() * p.element_size() for p in run.trainable_params())
    average = sum(4 * a.numel() for a in run.ema.averages) if run.ema is not None else 0
    return weights + average + (moments if run.recipe.checkpoint.save_optimizer else 0)


def trainer_json(run: Run, windows: list[dict[str, Any]]) -> dict[str, Any]:
    """``windows``: every rank's train-log window (:meth:`vla_ft.tracking.TrainWindow.state_dict`)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "state": dataclasses.asdict(run.state),
        "world_size": run.rt.world_size,
        "val_samples": run.val_samples,
        "episodes": {"train": run.data.train_episodes, "val": run.data.val_episodes},
        "scaler": run.scaler.state_dict() if run.scaler else None,
        "scheduler": {"step": run.state.step, "kind": run.recipe.optim.scheduler},
        "loss_step": run.loss_fn.step_state(),
        "numpy_rng": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        "frozen": sorted(run.model.frozen),
        "windows": windows,
    }


def load_training_checkpoint(run: Run, path: Path) -> None:
    """Restore weights, optimizer, loss strategy, scaler, RNG, data position and log window from ``path``."""
    load_weights_and_optimizer(run, path)
    if run.ema is not None:
        run.ema.load(path / EMA_FILE)
    if (path / "loss_state.safetensors").is_file():
        with ck.reading(path / "loss_state.safetensors"):
            run.loss_fn.load_state_dict(load_file(str(path / "loss_state.safetensors")))
    meta = ck.load_json(path / "trainer_state.json")
    with ck.reading(path / "trainer_state.json"):
        run.state = TrainState(**meta["state"])
        if "loss_step" in meta:  # older checkpoints lack it
            run.loss_fn.load_step_state(meta["loss_step"])
    if meta.get("world_size", run.rt.world_size) != run.rt.world_size:
        warnings.warn(
            f"{path} was saved by {meta['world_size']} processes, resuming with {run.rt.world_size}: "
            "the data position and the global batch carry over",
            stacklevel=2,
        )
    if meta.get("windows"):  # older checkpoints lack it: the first row after the resume is then short
        with ck.reading(path / "trainer_state.json"):
            run.window.load_state_dict(rank_window(meta["windows"], run.rt.rank, run.rt.world_size), run.rt.device)
    if run.scaler and meta.get("scaler"):
        run.scaler.load_state_dict(meta["scaler"])
    with ck.reading(path / "rng.pt"):
        ck.set_rng_state(ck.rank_rng_state(ck.torch_load(path / "rng.pt"), run.rt.rank, run.rt.world_size))
    with ck.reading(path / "trainer_state.json"):
        kind, keys, pos, *rest = meta["numpy_rng"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, *rest))
        version, internal, gauss = meta["python_rng"]
        random.setstate((version, tuple(internal), gauss))


def rank_window(windows: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's saved log window; on another number of processes, the mean of the saved ones."""
    return windows[rank] if len(windows) == world_size else mean_window(windows)


def load_weights_and_optimizer(run: Run, path: Path) -> None:
    """``model.safetensors`` + ``optimizer.pt``, or the FSDP shards in ``model_dcp/`` (any world size)."""
    if (path / "model_dcp").is_dir():
        from vla_ft.distributed import DCP_DIR, load_dcp_state

        with full_precision(run.model):  # one process with bf16 weights: the shards fill the fp32 masters
            load_dcp_state(run, path / DCP_DIR)
        return
    with full_precision(run.model), ck.reading(path / "model.safetensors"):  # into the fp32 masters
        load_weights(run.model, path / "model.safetensors")
    if (path / "optimizer.pt").is_file():
        load_optimizer_state(run.optimizer, ck.torch_load(path / "optimizer.pt"), path)
    elif run.recipe.checkpoint.save_optimizer:
        warnings.warn(f"{path} has no optimizer state: resuming with a fresh optimizer", stacklevel=2)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any], path: Path) -> None:
    """Optimizer moments and step counts from ``state``; the group settings (base LR, weight
    decay, start and warmup steps) stay those of the current recipe, which
    ``Optimizer.load_state_dict`` would otherwise silently replace with the saved ones."""
    names = [g["name"] for g in optimizer.param_groups]
    saved = [g.get("name") for g in state["param_groups"]]
    if saved != names:
        raise ck.CheckpointError(f"{path}: optimizer groups {saved} do not match this recipe's {names}")
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, settings, strict=True):
        group.update(own)


def read_saved_recipe(path: Path) -> dict[str, Any]:
    with ck.reading(path / "config.yaml"):
        saved = load_yaml((path / "config.yaml").read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a recipe is a mapping, this holds {type(saved).__name__}")
    data, train = saved.get("data"), saved.get("train")
    if isinstance(data, dict) and "split_seed" not in data:  # saved before data.split_seed: train.seed split
        data["split_seed"] = train.get("seed", 0) if isinstance(train, dict) else 0
    return saved
