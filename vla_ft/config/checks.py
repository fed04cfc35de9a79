"""Recipe checks that need more than types (cross-key rules), with "did you mean" hints."""

from __future__ import annotations

import difflib
import typing

from vla_ft.config.schema import MODULE_NAMES, TRUNK_MODULES, Recipe


def suggest(name: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


READERS = ("synthetic", "lerobot", "hdf5")


def validate(r: Recipe) -> list[str]:
    """Checks that need more than types. Returns problems (empty = valid)."""
    p: list[str] = []
    if r.data.format not in READERS:
        p.append(
            f"data.format: unknown reader '{r.data.format}'{suggest(r.data.format, READERS)}; "
            f"valid: {', '.join(READERS)}"
        )
    elif r.data.format != "synthetic" and not r.data.path:
        p.append(f"data.path: required for data.format={r.data.format}")
    if r.data.format == "hdf5":
        from robot_data.hdf5 import LAYOUTS  # only here: the reader pulls in h5py

        if r.data.layout not in LAYOUTS:
            p.append(
                f"data.layout: unknown hdf5 layout '{r.data.layout}'{suggest(r.data.layout, LAYOUTS)}; "
                f"valid: {', '.join(LAYOUTS)}"
            )
    for key, value in [
        ("train.steps", r.train.steps),
        ("train.batch_size", r.train.batch_size),
        ("data.chunk", r.data.chunk),
        ("data.history", r.data.history),
        ("optim.accumulation", r.optim.accumulation),
    ]:
        if value < 1:
            p.append(f"{key}: must be >= 1, got {value}")
    if not 0.0 <= r.data.val_ratio < 1.0:
        p.append(f"data.val_ratio: must be in [0, 1), got {r.data.val_ratio}")
    if not r.optim.lr > 0 or r.optim.lr == float("inf"):
        p.append(f"optim.lr: must be finite and > 0, got {r.optim.lr}")
    if len(r.optim.betas) != 2:
        p.append(f"optim.betas: expected 2 values, got {len(r.optim.betas)}")
    for section, keys in (("optim.groups", r.optim.groups), ("unfreeze", r.unfreeze)):
        for name in keys:
            if name not in MODULE_NAMES:
                p.append(
                    f"{section}.{name}: unknown module{suggest(name, MODULE_NAMES)}; modules: {', '.join(MODULE_NAMES)}"
                )
    for name, spec in r.unfreeze.items():
        lora = (name == "language_model" and r.model.lora.enabled) or (name == "vision_encoder" and r.model.lora.vision)
        if lora:
            p.append(f"unfreeze.{name}: module is LoRA-wrapped (its adapters train from the start)")
        elif name in MODULE_NAMES and not getattr(r.freeze, name):
            p.append(f"unfreeze.{name}: module is not frozen (set freeze.{name}: true)")
        if spec.at_step < 0 or spec.warmup_steps < 0:
            p.append(f"unfreeze.{name}: at_step and warmup_steps must be >= 0")
        elif spec.at_step >= r.train.steps:  # the run would equal one with the module frozen throughout
            p.append(
                f"unfreeze.{name}.at_step: {spec.at_step} is not before train.steps ({r.train.steps}): "
                f"the module would never train; lower at_step or raise train.steps"
            )
    if not 0 < r.distributed.timeout_min < float("inf"):
        p.append(f"distributed.timeout_min: must be finite and > 0, got {r.distributed.timeout_min}")
    from vla_ft.loss_weighting import check_weights  # the loss's own rules: validate and train agree

    p += check_weights(r.loss)
    if r.loss.strategy == "scheduled" and not r.loss.schedule:
        p.append("loss.schedule: strategy=scheduled needs at least one term ramp")
    if r.model.gripper_head and not r.loss.gripper.dims:
        p.append("loss.gripper.dims: name the gripper action dim(s) when model.gripper_head is true")
    normalised = sorted(set(r.loss.gripper.dims) - set(r.data.raw_dims or [])) if r.data.raw_dims is not None else []
    if r.model.gripper_head and normalised:
        p.append(
            f"data.raw_dims: gripper dim(s) {normalised} would be normalised, but the gripper labels threshold "
            f"raw values (loss.gripper.threshold={r.loss.gripper.threshold}): include them"
        )
    if r.data.language_target == "text" and r.data.format != "synthetic" and not r.data.text_key:
        p.append("data.text_key: required for data.language_target=text on recorded datasets")
    p += cache_problems(r)
    if not p:  # the metric names need a consistent loss and data section
        from vla_ft.metrics import best_metric_problems

        p += best_metric_problems(r)
    return p


def cache_problems(r: Recipe) -> list[str]:
    """Why ``train.cache_features`` would train differently from running the frozen trunk (empty = cacheable).

    The model-level check (dropout active in the trunk) is in :mod:`vla_ft.feature_cache`.
    """
    if not r.train.cache_features:
        return []
    why = "train.cache_features: refused because"
    p = []
    if r.data.augment.enabled:
        p.append(f"{why} data.augment.enabled is true (every epoch sees new images; cached features would be stale)")
    for name in TRUNK_MODULES:
        if name == "proprio_encoder" and not r.model.proprio:
            continue
        if not getattr(r.freeze, name):
            p.append(f"{why} freeze.{name} is false (a trained trunk module changes its features): set it true")
        elif name in r.unfreeze:
            p.append(f"{why} unfreeze.{name} trains the trunk from step {r.unfreeze[name].at_step}")
    for key, on in (("model.lora.enabled", r.model.lora.enabled), ("model.lora.vision", r.model.lora.vision)):
        if on:
            p.append(f"{why} {key} is true (LoRA adapters train inside the trunk)")
    if r.data.language_target != "none" and (r.loss.weights.language > 0 or "language" in r.loss.schedule):
        p.append(
            f"{why} the language term needs the LM run on the target tokens, and with a frozen LM it trains "
            "nothing: set loss.weights.language: 0 (or data.language_target: none)"
        )
    return p
