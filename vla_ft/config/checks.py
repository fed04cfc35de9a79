"""Recipe checks that need more than types (cross-key rules), with "did you mean" hints."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import string
import typing

from vla_ft.config.schema import MODULE_NAMES, TRUNK_MODULES, Recipe
from vla_ft.config.training_checks import training_problems

# robot_data.READERS' names (tests keep them equal): importing robot_data here would pull torch and
# every format library into `vla-ft --help` and `vla-ft validate`.
READERS = ("synthetic", "lerobot", "hdf5", "rlds")


def suggest(name: str, valid: typing.Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of ``valid``, or ''."""
    close = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def validate(r: Recipe, training: bool = True) -> list[str]:
    """Checks that need more than types. Returns problems (empty = valid).

    ``training=False``: the recipe of a trained checkpoint, read back to evaluate it (``vla-ft eval``).
    The rules of :func:`~vla_ft.config.training_checks.training_problems`, about how the run trains,
    are skipped: the checkpoint trained as it did, and a rule added since would refuse it. Every other
    rule, which judges what the reader builds and reads (and the reader's overrides), still applies."""
    p: list[str] = []
    if r.data.format not in READERS:
        p.append(
            f"data.format: unknown reader '{r.data.format}'{suggest(r.data.format, READERS)}; "
            f"valid: {', '.join(READERS)}"
        )
    elif r.data.format != "synthetic" and not (r.data.path or r.data.mix):
        p.append(f"data.path: required for data.format={r.data.format} (or data.mix: several datasets)")
    elif r.data.format == "synthetic" and (r.data.path or r.data.mix):  # else ignored: the task is generated
        key, what = ("data.path", r.data.path) if r.data.path else ("data.mix", ", ".join(r.data.mix))
        p.append(
            f"{key}: {what} is not read with data.format=synthetic (the task is generated); "
            f"set data.format to lerobot or hdf5 to read it"
        )
    if r.data.format == "rlds" and r.data.fps is None:
        p.append(
            "data.fps: required for data.format=rlds (RLDS records no control rate; LIBERO runs at 20, Bridge at 5)"
        )
    if r.data.fps is not None and not 0 < r.data.fps < float("inf"):
        p.append(f"data.fps: must be > 0, got {r.data.fps}")
    p += mix_problems(r)
    p += per_source_problems(r)
    p += lora_variant_problems(r)
    p += rollout_problems(r)
    if r.data.format == "hdf5":
        from robot_data.hdf5 import LAYOUTS  # only here: the reader pulls in h5py

        if r.data.layout not in LAYOUTS:
            p.append(
                f"data.layout: unknown hdf5 layout '{r.data.layout}'{suggest(r.data.layout, LAYOUTS)}; "
                f"valid: {', '.join(LAYOUTS)}"
            )
    p += name_problems(r)
    p += range_problems(r)
    p += absent_module_problems(r)
    if len(r.optim.betas) != 2:
        p.append(f"optim.betas: expected 2 values, got {len(r.optim.betas)}")
    absent = absent_modules(r)
    for name in r.unfreeze:
        lora = (name == "language_model" and r.model.lora.enabled) or (name == "vision_encoder" and r.model.lora.vision)
        if lora:
            p.append(f"unfreeze.{name}: module is LoRA-wrapped (its adapters train from the start)")
        elif name in MODULE_NAMES and name not in absent and not getattr(r.freeze, name):
            p.append(f"unfreeze.{name}: module is not frozen (set freeze.{name}: true)")
    if not 0 < r.distributed.timeout_min < float("inf"):
        p.append(f"distributed.timeout_min: must be finite and > 0, got {r.distributed.timeout_min}")
    from vla_ft.loss_weighting import check_weights  # the loss's own rules
    from vla_ft.losses import check_loss_config

    p += check_weights(r.loss) + check_loss_config(r.loss, r.data.chunk, r.model.gripper_head)
    p += training_problems(r) if training else []
    if r.loss.strategy == "scheduled" and not r.loss.schedule:
        p.append("loss.schedule: strategy=scheduled needs at least one term ramp")
    normalised = sorted(set(r.loss.gripper.dims) - set(r.data.raw_dims or [])) if r.data.raw_dims is not None else []
    if r.model.gripper_head and normalised:
        p.append(
            f"data.raw_dims: gripper dim(s) {normalised} would be normalised, but the gripper labels threshold "
            f"raw values (loss.gripper.threshold={r.loss.gripper.threshold}): include them"
        )
    p += delta_problems(r)
    p += template_problems(r.data.prompt_template)
    if r.data.language_target == "action_tokens" and r.data.normalize in ("mean_std", "none"):
        p.append(
            f"data.normalize: {r.data.normalize} with data.language_target=action_tokens, whose bins span [-1, 1]: "
            "values past it (a third of them at one std) are clipped into the edge bins; use q01_q99 (OpenVLA's) "
            "or min_max"
        )
    if r.data.val_filter and r.data.val_episodes:
        p.append("data.val_filter and data.val_episodes both choose the validation episodes; set one")
    if r.data.language_target == "text" and r.data.format != "synthetic" and not r.data.text_key:
        p.append("data.text_key: required for data.language_target=text on recorded datasets")
    p += cache_problems(r)
    p += fsdp_problems(r)
    p += quantize_problems(r)
    if r.logging.wandb.enabled and importlib.util.find_spec("wandb") is None:
        p.append("logging.wandb.enabled: needs wandb (pip install 'vla-ft[wandb]')")
    p += model_problems(r)
    p += tokenizer_problems(r)
    # After every range check (the loss's own included): a value out of range is not also "unread".
    from vla_ft.config.unread_keys import unused_setting_problems  # it imports absent_modules from here

    named = {q.split(":")[0] for q in p}
    p += [q for q in unused_setting_problems(r) if q.split(":")[0] not in named]
    p += nonfinite_problems(r, reported=p)
    if not p:  # the metric names need a consistent loss and data section
        from vla_ft.metrics import best_metric_problems

        p += best_metric_problems(r)
    return list(dict.fromkeys(p))  # a rule checked by two owners (validate and the loss) is reported once


def rollout_problems(r: Recipe) -> list[str]:
    """``rollout``: one way to run chunks, an environment to run them in, one the loop can drive."""
    o, p = r.rollout, []
    if o.execute is not None and o.ensemble is not None:
        p.append("rollout.execute and rollout.ensemble: set one (receding horizon or temporal ensembling)")
    if o.execute is not None and not 1 <= o.execute <= r.data.chunk:
        p.append(f"rollout.execute: {o.execute} actions per chunk, but the policy predicts {r.data.chunk} (data.chunk)")
    if o.ensemble is not None and not 0 <= o.ensemble < float("inf"):
        p.append(f"rollout.ensemble: the decay must be finite and >= 0, got {o.ensemble}")
    if o.episodes < 0 or o.max_steps < 1:
        p.append(f"rollout.episodes >= 0 and rollout.max_steps >= 1, got {o.episodes} and {o.max_steps}")
    if o.batch < 1:
        p.append(f"rollout.batch: episodes run at once must be >= 1, got {o.batch}")
    if o.start is not None and o.start < 0:  # gymnasium's seeds are >= 0: the env would refuse it mid-run
        p.append(f"rollout.start: the first reset seed must be >= 0, got {o.start}")
    if o.episodes and not o.env and r.data.format != "synthetic":
        p.append(f"rollout.env: required to roll out a policy of data.format={r.data.format} (module:callable)")
    if o.episodes and r.distributed.strategy == "fsdp":
        p.append("rollout.episodes: rollouts run the whole model on each process; use distributed.strategy=ddp")
    d, key = r.data, r.train.best_metric
    no_val_set = d.val_ratio == 0 and not d.val_episodes and not d.val_filter
    if o.episodes and no_val_set and not key.startswith("val/rollout/"):
        p.append(
            f"train.best_metric: '{key}' needs a validation set, but the run has none (data.val_ratio is 0, no "
            "data.val_episodes or data.val_filter) and validation only rolls out: set data.val_ratio > 0, or "
            "train.best_metric: val/rollout/success_rate with train.best_mode: max"
        )
    return p


def mix_problems(r: Recipe) -> list[str]:
    """``data.mix``: instead of ``data.path``, every source with a path, weights on all sources or none."""
    mix = r.data.mix
    if not mix:
        return []
    p = ["data.mix: replaces data.path (one dataset); set one of them"] if r.data.path else []
    p += [
        f"data.mix.{name}: a source name may not hold '.' or '/' (it is the <name> of data.mix.<name>.path "
        "and of val/mix/<name>/...)"
        for name in mix
        if not name or "." in name or "/" in name
    ]
    p += [f"data.mix.{name}.path: required" for name, source in mix.items() if not source.path]
    weighted = [name for name, source in mix.items() if source.weight is not None]
    if weighted and len(weighted) < len(mix):
        unset = [f"data.mix.{name}.weight" for name in mix if name not in weighted]
        p.append(f"{', '.join(unset)}: set a weight on every source or on none (none: in proportion to frames)")
    p += [
        f"data.mix.{name}.weight: must be finite and > 0, got {mix[name].weight}"
        for name in weighted
        if not 0 < mix[name].weight < float("inf")
    ]
    return p


def lora_variant_problems(r: Recipe) -> list[str]:
    """``model.lora.use_rslora`` / ``use_dora`` shape adapters, so they need some."""
    lora = r.model.lora
    set_keys = [f"model.lora.{k}" for k in ("use_rslora", "use_dora") if getattr(lora, k)]
    if set_keys and not (lora.enabled or lora.vision):
        return [f"{', '.join(set_keys)}: no adapter to shape (set model.lora.enabled or model.lora.vision)"]
    return []


def per_source_problems(r: Recipe) -> list[str]:
    """``data.normalize_per_source`` needs sources; ``rollout.source`` names the one a rollout drives."""
    d, source = r.data, r.rollout.source
    p = []
    if d.normalize_per_source and not d.mix and d.format != "hdf5":
        p.append(
            "data.normalize_per_source: statistics per source need a mixture (data.mix, or data.path a directory "
            f"of robomimic files); this recipe reads one dataset ({d.format})"
        )
    if source is not None and not d.normalize_per_source:
        p.append("rollout.source: only with data.normalize_per_source (one set of statistics drives every robot)")
    if d.normalize_per_source and r.rollout.episodes and source is None:
        p.append(
            "rollout.source: required with data.normalize_per_source: the mixture source whose statistics the "
            f"rollout env's robot uses{(': one of ' + ', '.join(d.mix)) if d.mix else ''}"
        )
    if source is not None and d.mix and source not in d.mix:
        p.append(f"rollout.source: unknown source '{source}'{suggest(source, d.mix)}; valid: {', '.join(d.mix)}")
    return p


def delta_problems(r: Recipe) -> list[str]:
    """``data.delta_action_dims`` / ``data.delta_state_dims`` that cannot work whatever the data
    (their range is checked when the data is open: ``vla_ft.data.check_action_dims``)."""
    from robot_data.delta_actions import DeltaActions

    problems = DeltaActions.problems(r.data.delta_action_dims, r.data.delta_state_dims)
    if problems:
        return [f"data.{line}" for line in problems]
    delta = DeltaActions.build(r.data.delta_action_dims, r.data.delta_state_dims)
    gripper = sorted(set(delta.action_dims) & set(r.loss.gripper.dims)) if delta and r.model.gripper_head else []
    if gripper:
        return [
            f"data.delta_action_dims: gripper dim(s) {gripper} must stay absolute: their labels threshold the raw "
            f"command (loss.gripper.threshold={r.loss.gripper.threshold})"
        ]
    return []


def name_problems(r: Recipe) -> list[str]:
    """Names of modules and loss terms used as keys (``optim.groups.<module>``, ``unfreeze.<module>``,
    ``loss.schedule.<term>``) that name nothing. They need only the section's keys, so the loader
    reports them together with the type errors."""
    from vla_ft.loss_weighting import schedule_term_problems

    p = []
    for section, keys in (("optim.groups", r.optim.groups), ("unfreeze", r.unfreeze)):
        for name in keys:
            if name not in MODULE_NAMES:
                p.append(
                    f"{section}.{name}: unknown module{suggest(name, MODULE_NAMES)}; modules: {', '.join(MODULE_NAMES)}"
                )
    return p + schedule_term_problems(r.loss)


def absent_modules(r: Recipe) -> dict[str, str]:
    """Modules this recipe's model does not have -> the switch that leaves them out."""
    switches = {
        "gripper_head": ("model.gripper_head", r.model.gripper_head),
        "proprio_encoder": ("model.proprio", r.model.proprio),
        "film": ("model.vision.film", r.model.vision.film),
    }
    return {name: key for name, (key, on) in switches.items() if not on}


def absent_module_problems(r: Recipe) -> list[str]:
    """Keys that set a module the model does not have: they would do nothing (a pattern matching
    nothing is an error)."""
    p = []
    for name, switch in absent_modules(r).items():
        keys = [f"optim.groups.{name}"] if name in r.optim.groups else []
        keys += [f"freeze.{name}"] if getattr(r.freeze, name) else []
        keys += [f"unfreeze.{name}"] if name in r.unfreeze else []
        p += [
            f"{key}: {switch} is false, so the model has no {name}; remove {key} or set {switch}: true" for key in keys
        ]
    return p


def model_problems(r: Recipe) -> list[str]:
    """What the model section asks of the installed libraries and the model's structure, checked before
    any weight exists: the attention kernel's package, and the backbones built on the meta device
    (:mod:`vla_ft.model_check`)."""
    import importlib.util

    p = []
    if r.model.language.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        p.append(
            "model.language.attn_implementation: flash_attention_2 needs the flash_attn package, which is not "
            "installed (pip install flash-attn, on a CUDA machine); or use sdpa"
        )
    from vla_ft.model_check import model_structure_problems  # torch, timm, transformers: not at import

    return p + model_structure_problems(r.model)


def tokenizer_problems(r: Recipe) -> list[str]:
    """``model.language.tokenizer: builtin:<name>`` that names no built-in tokenizer: validate said ok,
    and the run refused it only when it built the tokenizer."""
    from vla_ft.tokenizer import BUILTIN  # transformers: not at import

    name = r.model.language.tokenizer
    if not name.startswith("builtin:") or name in BUILTIN:
        return []
    return [
        f"model.language.tokenizer: unknown built-in tokenizer '{name}'{suggest(name, BUILTIN)}; "
        f"built-in: {', '.join(BUILTIN)}"
    ]


def range_problems(r: Recipe) -> list[str]:
    """Numbers outside the range their key means something in (a count of 0 or -1 would train,
    log or validate differently from what the recipe says, or fail later with a traceback)."""
    t, o, d, m = r.train, r.optim, r.data, r.model
    at_least = {
        2: {"model.action_tokens_bins": m.action_tokens_bins},  # one bin says no action value apart from another
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
    for name, group in o.groups.items():  # null: the group takes optim.weight_decay
        if group.weight_decay is not None:
            at_least[0][f"optim.groups.{name}.weight_decay"] = group.weight_decay
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
        ("train.ema_decay", t.ema_decay, False),
        *((f"optim.betas[{i}]", beta, False) for i, beta in enumerate(o.betas)),
    ):
        if not (0.0 <= value < 1.0 or (one_ok and value == 1.0)):
            p.append(f"{key}: must be in [0, 1{']' if one_ok else ')'}, got {value}")
    for key, value in (  # a negative LR ascends the gradient; an infinite one or eps is no step size
        ("optim.lr", o.lr),
        *((f"optim.groups.{name}.lr", g.lr) for name, g in o.groups.items() if g.lr is not None),
        ("optim.eps", o.eps),
        ("model.lora.alpha", m.lora.alpha),  # the adapters' scale alpha / r: 0 would never learn
    ):
        if not 0 < value < math.inf:
            p.append(f"{key}: must be finite and > 0, got {value}")
    if not 0.0 <= o.momentum < 1.0:
        p.append(f"optim.momentum: must be in [0, 1), got {o.momentum}")
    scale = d.augment.crop_scale  # fractions of the image's area that the random crop keeps
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        p.append(f"data.augment.crop_scale: must be [low, high] with 0 < low <= high <= 1, got {scale}")
    for key, seed in (
        ("train.seed", t.seed),
        ("data.split_seed", d.split_seed),
        ("data.synthetic.seed", d.synthetic.seed),
    ):
        if not 0 <= seed < 2**32:  # numpy refuses negative seeds; the samplers multiply the seed into 64 bits
            p.append(f"{key}: must be in [0, 2**32), got {seed}")
    return p


def nonfinite_problems(r: Recipe, reported: typing.Iterable[str] = ()) -> list[str]:
    """Every float of the recipe (lists and keyed sections included) must be finite: inf or NaN
    trains nothing meaningful (no key gives inf a meaning: optim.grad_clip's off is 0). Free-form sections
    (``dict[str, Any]``: model.vision.kwargs, model.language.config, ablation.variants) belong to
    their libraries. Keys already named in ``reported`` (a range check) are not reported twice."""
    named = {problem.split(":", 1)[0] for problem in reported}
    return [
        f"{key}: must be finite, got {value}"
        for key, value in _floats(r, "")
        if not math.isfinite(value) and key not in named and key.split("[", 1)[0] not in named
    ]


def _floats(obj: typing.Any, key: str) -> typing.Iterator[tuple[str, float]]:
    """(dotted key, value) of every float below ``obj``, following the schema's types."""
    if dataclasses.is_dataclass(obj):
        hints = typing.get_type_hints(type(obj))
        for f in dataclasses.fields(obj):
            if not _free_form(hints[f.name]):
                yield from _floats(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name)
    elif isinstance(obj, dict):
        for name, value in obj.items():
            yield from _floats(value, f"{key}.{name}")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _floats(value, f"{key}[{i}]")
    elif isinstance(obj, float):
        yield key, obj


def _free_form(tp: typing.Any) -> bool:
    return tp is typing.Any or any(_free_form(arg) for arg in typing.get_args(tp))


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
    if r.train.ema_decay:
        p.append("train.ema_decay: the weight average is kept and saved whole, not as FSDP shards; use ddp")
    return p


def quantize_problems(r: Recipe) -> list[str]:
    """``model.language.quantize`` and ``optim.name: adamw8bit`` (bitsandbytes): 4-bit weights never
    train, FSDP shards neither, and bitsandbytes must be installed (looked up, not imported: importing
    it loads its CUDA libraries)."""
    keys = [f"model.language.quantize: {r.model.language.quantize}"] if r.model.language.quantize != "none" else []
    keys += ["optim.name: adamw8bit"] if r.optim.name == "adamw8bit" else []
    if keys and importlib.util.find_spec("bitsandbytes") is None:
        return [f"{key}: needs bitsandbytes (pip install 'vla-ft[quant]')" for key in keys]
    p = []
    if r.distributed.strategy == "fsdp":
        p += [f"{key}: FSDP cannot shard bitsandbytes' tensors; use distributed.strategy: ddp" for key in keys]
    if r.model.language.quantize != "none":
        key = keys[0]
        if not (r.model.lora.enabled or r.freeze.language_model):
            p.append(
                f"{key} weights cannot train: set model.lora.enabled: true (QLoRA: adapters on the 4-bit base) "
                "or freeze.language_model: true"
            )
        if "language_model" in r.unfreeze:
            p.append(f"unfreeze.language_model: the LM is quantized ({key}); its 4-bit weights cannot train")
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
    absent = absent_modules(r)
    for name in TRUNK_MODULES:
        if name in absent:
            continue
        if not getattr(r.freeze, name):
            p.append(f"{why} freeze.{name} is false (a trained trunk module changes its features): set it true")
        elif name in r.unfreeze:
            p.append(f"{why} unfreeze.{name} trains the trunk from step {r.unfreeze[name].at_step}")
    for key, on in (("model.lora.enabled", r.model.lora.enabled), ("model.lora.vision", r.model.lora.vision)):
        if on:
            p.append(f"{why} {key} is true (LoRA adapters train inside the trunk)")
    from vla_ft.loss_weighting import ever_weighted  # a ramp replaces loss.weights.language at every step

    if r.data.language_target != "none" and ever_weighted(r.loss, "language"):
        ramped = r.loss.strategy == "scheduled" and "language" in r.loss.schedule
        fix = "hold loss.schedule.language at 0 or remove it" if ramped else "set loss.weights.language: 0"
        p.append(
            f"{why} the language term needs the LM run on the target tokens, and with a frozen LM it trains "
            f"nothing: {fix} (or data.language_target: none)"
        )
    return p
