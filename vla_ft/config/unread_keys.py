"""The "unread key" rules: settings a recipe sets for something the run never does or reads.

A key that the chosen optimizer, schedule, loss type or reader never reads, or that sets a module that
never trains, would otherwise be ignored without a word; each rule refuses it, saying why and what to
do. They live apart from the range and structure rules of :mod:`vla_ft.config.checks`, whose
:func:`~vla_ft.config.checks.validate` runs them after every range check, so a value already
reported out of range is not also called unread.
"""

from __future__ import annotations

from vla_ft.config.checks import absent_modules
from vla_ft.config.schema import Recipe


def unused_setting_problems(r: Recipe) -> list[str]:
    """Keys set for something the run never does: a module's group that never trains (frozen, never
    unfrozen, no adapters), DWA's settings under another strategy, a cache directory without the cache."""
    lora = r.model.lora
    adapted = {name for name, on in (("language_model", lora.enabled), ("vision_encoder", lora.vision)) if on}
    p = [
        f"optim.groups.{name}: freeze.{name} is true and unfreeze.{name} unset, so {name} never trains; "
        f"remove optim.groups.{name} or add unfreeze.{name}"
        for name in r.optim.groups
        if getattr(r.freeze, name, False) and name not in {*r.unfreeze, *adapted, *absent_modules(r)}
    ]
    defaults = type(r.loss)()
    if r.loss.strategy != "dwa":
        p += [
            f"loss.{key}: only loss.strategy=dwa reads it (strategy is {r.loss.strategy})"
            for key in ("dwa_temperature", "dwa_window")
            if getattr(r.loss, key) != getattr(defaults, key)
        ]
    if r.loss.strategy == "dwa" and r.train.steps < 2 * r.loss.dwa_window:
        p.append(
            f"loss.dwa_window: DWA weighs the terms from its third window of {r.loss.dwa_window} steps on, and "
            f"train.steps is {r.train.steps}: it would never engage; lower loss.dwa_window"
        )
    if r.train.feature_cache_dir is not None and not r.train.cache_features:
        p.append("train.feature_cache_dir: only train.cache_features=true reads it")
    return p + unread_optimizer_and_loss_keys(r) + unread_data_keys(r)


def unread_optimizer_and_loss_keys(r: Recipe) -> list[str]:
    """Optimizer and loss settings that the chosen optimizer, schedule or loss type never reads."""
    o, od, loss = r.optim, type(r.optim)(), r.loss
    adam = o.name != "sgd"
    unread = [("optim.momentum", "only optim.name=sgd reads it", adam and o.momentum != od.momentum)]
    unread += [
        (f"optim.{k}", "optim.name=sgd reads no Adam setting", not adam and getattr(o, k) != getattr(od, k))
        for k in ("betas", "eps")
    ]
    unread += [
        (
            "optim.min_lr_ratio",
            "optim.scheduler=constant never decays",
            o.scheduler == "constant" and o.min_lr_ratio != od.min_lr_ratio,
        ),
        (
            "optim.groups.action_queries.weight_decay",
            "action queries are a lookup table: never decayed",
            "action_queries" in o.groups and o.groups["action_queries"].weight_decay is not None,
        ),
        (
            "loss.action.beta",
            f"only loss.action.type=smooth_l1 reads it (type is {loss.action.type})",
            loss.action.type != "smooth_l1" and loss.action.beta != type(loss.action)().beta,
        ),
        (
            "loss.gripper.pos_weight",
            "model.gripper_head is false: no gripper BCE",
            not r.model.gripper_head and loss.gripper.pos_weight is not None,
        ),
        (
            "loss.schedule.gripper",
            "model.gripper_head is false: no gripper term to ramp",
            not r.model.gripper_head and "gripper" in loss.schedule,
        ),
    ]
    return [f"{key}: {why}; remove it" for key, why, set_ in unread if set_]


def unread_data_keys(r: Recipe) -> list[str]:
    """Data settings that the chosen reader never reads. The tuning keys of a feature switched off
    (``train.compile_mode`` with ``train.compile=false``, ``train.ema_warmup`` with ``ema_decay: 0``)
    are not refused: ``key=value`` overrides and ablation variants switch features off in recipes
    that tune them."""
    d, dd = r.data, type(r.data)()
    own_rate = {"lerobot": "a LeRobot dataset records its own (meta/info.json)", "synthetic": "the task sets its own"}
    unread = [
        (
            "data.fps",
            f"data.format={d.format} never reads it: {own_rate.get(d.format)}",
            d.format in own_rate and d.fps is not None,
        ),
        (
            "data.layout",
            f"only data.format=hdf5 reads it (format is {d.format})",
            d.format != "hdf5" and d.layout != dd.layout,
        ),
    ]
    return [f"{key}: {why}; remove it" for key, why, set_ in unread if set_]
