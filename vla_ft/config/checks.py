"""Recipe checks that need more than types (cross-key rules), with "did you mean" hints."""

from __future__ import annotations

import difflib
import string
import typing

from vla_ft.config.schema import MODULE_NAMES, TRUNK_MODULES, Recipe

# robot_data.READERS' names (tests keep them equal): importing robot_data here would pull torch and
# every format library into `vla-ft --help` and `vla-ft validate`.
READERS = ("synthetic", "lerobot", "hdf5")


def suggest(name: str, valid: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of ``valid``, or ''."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


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
    p += range_problems(r)
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
    from vla_ft.losses import check_loss_config

    p += check_weights(r.loss) + check_loss_config(r.loss, r.data.chunk, r.model.gripper_head)
    if r.loss.strategy == "scheduled" and not r.loss.schedule:
        p.append("loss.schedule: strategy=scheduled needs at least one term ramp")
    normalised = sorted(set(r.loss.gripper.dims) - set(r.data.raw_dims or [])) if r.data.raw_dims is not None else []
    if r.model.gripper_head and normalised:
        p.append(
            f"data.raw_dims: gripper dim(s) {normalised} would be normalised, but the gripper labels threshold "
            f"raw values (loss.gripper.threshold={r.loss.gripper.threshold}): include them"
        )
    p += template_problems(r.data.prompt_template)
    if r.data.val_filter and r.data.val_episodes:
        p.append("data.val_filter and data.val_episodes both choose the validation episodes; set one")
    if r.data.language_target == "text" and r.data.format != "synthetic" and not r.data.text_key:
        p.append("data.text_key: required for data.language_target=text on recorded datasets")
    p += cache_problems(r)
    p += fsdp_problems(r)
    if not p:  # the metric names need a consistent loss and data section
        from vla_ft.metrics import best_metric_problems

        p += best_metric_problems(r)
    return p


def range_problems(r: Recipe) -> list[str]:
    """Numbers outside the range their key means something in (a count of 0 or -1 would train,
    log or validate differently from what the recipe says, or fail later with a traceback)."""
    t, o, d, m = r.train, r.optim, r.data, r.model
    at_least = {
        1: {
            "train.steps": t.steps,
            "train.batch_size": t.batch_size,
            "train.max_consecutive_skips": t.max_consecutive_skips,
            "optim.accumulation": o.accumulation,
            "logging.every": r.logging.every,
            "data.chunk": d.chunk,
            "data.history": d.history,
            "data.prefetch_factor": d.prefetch_factor,
            "data.synthetic.episodes": d.synthetic.episodes,
            "data.synthetic.episode_length": d.synthetic.episode_length,
            "data.synthetic.image_size": d.synthetic.image_size,
            "model.vision.img_size": m.vision.img_size,
            "model.action_head_hidden": m.action_head_hidden,
            "model.lora.r": m.lora.r,
        },
        0: {
            "train.val_every": t.val_every,
            "train.val_batches": t.val_batches,
            "train.threads": t.threads,
            "train.early_stopping.patience": t.early_stopping.patience,
            "train.early_stopping.min_delta": t.early_stopping.min_delta,
            "optim.warmup_steps": o.warmup_steps,
            "optim.grad_clip": o.grad_clip,
            "optim.weight_decay": o.weight_decay,
            "checkpoint.every": r.checkpoint.every,
            "checkpoint.keep_last": r.checkpoint.keep_last,
            "data.num_workers": d.num_workers,
            "data.video_tolerance_s": d.video_tolerance_s,
            "data.augment.color_jitter": d.augment.color_jitter,
            "model.projector_hidden": m.projector_hidden,
        },
    }
    p = [
        f"{key}: must be >= {low}, got {value}"
        for low, keys in at_least.items()
        for key, value in keys.items()
        if not value >= low  # NaN fails too
    ]
    for key, value, one_ok in (  # fractions in [0, 1), or [0, 1]
        ("data.val_ratio", d.val_ratio, False),
        ("optim.min_lr_ratio", o.min_lr_ratio, True),
        ("model.lora.dropout", m.lora.dropout, False),
        *((f"optim.betas[{i}]", beta, False) for i, beta in enumerate(o.betas)),
    ):
        if not (0.0 <= value < 1.0 or (one_ok and value == 1.0)):
            p.append(f"{key}: must be in [0, 1{']' if one_ok else ')'}, got {value}")
    if not o.eps > 0:
        p.append(f"optim.eps: must be > 0, got {o.eps}")
    return p


def fsdp_problems(r: Recipe) -> list[str]:
    """What ``distributed.strategy: fsdp`` cannot run, refused whatever the launch (one process or torchrun),
    so ``vla-ft validate`` gives the answer the multi-GPU launch would."""
    if r.distributed.strategy != "fsdp":
        return []
    p = []
    if r.train.precision == "fp16":
        p.append("train.precision: fp16 (GradScaler) is not supported with distributed.strategy=fsdp; use bf16")
    if r.loss.grad_norm_every:
        p.append("loss.grad_norm_every: per-term gradient norms need whole parameters; set 0 with fsdp")
    if r.train.cache_features:
        p.append("train.cache_features: the feature cache runs the trunk outside FSDP; use ddp")
    if r.model.lora.enabled or r.model.lora.vision:
        p.append("model.lora: PEFT saves adapters from whole tensors, not FSDP shards; use ddp with LoRA")
    return p


def template_problems(template: str) -> list[str]:
    """``data.prompt_template`` is formatted with ``instruction`` only: it must name it, and nothing else
    (write literal braces as ``{{`` and ``}}``)."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:  # an unmatched brace
        return [f"data.prompt_template: {template!r}: {err} (write a literal brace as {{{{ or }}}})"]
    if "instruction" not in fields:
        return [f"data.prompt_template: {template!r} has no {{instruction}} placeholder"]
    if fields - {"instruction"}:
        others = sorted(fields - {"instruction"})
        return [f"data.prompt_template: {template!r} names {others}; only {{instruction}} is filled"]
    return []


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
