"""Recipe rules about how the run trains over its ``train.steps``: step schedules, the loss terms it
ever computes, early stopping's validations, and warmups as long as the run.

Split from :mod:`vla_ft.config.checks` because these rules, unlike the others, judge only training:
a checkpoint's recipe read back to evaluate it skips them (``validate(recipe, training=False)``),
and the loader reports :func:`training_warnings` only for a recipe that will train."""

from __future__ import annotations

from vla_ft.config.schema import Recipe


def training_problems(r: Recipe) -> list[str]:
    """Rules about how the run trains over its ``train.steps``: its step schedules (``unfreeze.<module>``,
    ``loss.schedule.<term>``), that it computes some loss term, and early stopping's validations. A
    checkpoint's recipe read back to evaluate it skips them (``validate(recipe, training=False)``):
    none judges what an evaluation reads, and one added after the checkpoint trained would refuse it."""
    from vla_ft.loss_weighting import ramp_step_problems

    p = []
    for name, spec in r.unfreeze.items():
        if spec.at_step < 0:
            p.append(f"unfreeze.{name}.at_step: must be >= 0 (the first step is 0), got {spec.at_step}")
        if spec.warmup_steps < 0:
            p.append(f"unfreeze.{name}.warmup_steps: must be >= 0, got {spec.warmup_steps}")
        if spec.at_step >= 0 and spec.at_step >= r.train.steps:  # as if the module stayed frozen throughout
            p.append(
                f"unfreeze.{name}.at_step: {spec.at_step} is not before train.steps ({r.train.steps}): "
                f"the module would never train; lower at_step or raise train.steps"
            )
    p += ramp_step_problems(r.loss, r.train.steps)
    p += trained_term_problems(r)
    return p + early_stopping_problems(r)


def training_warnings(r: Recipe) -> list[str]:
    """Settings that train, but not as written: a learning-rate warmup as long as the run (the LR reaches
    its peak at the last step at best, and the global decay, which starts after ``optim.warmup_steps``,
    never does). Warnings, not errors: short runs (smoke tests, a ``train.steps`` override of a recipe)
    are meant to run with the recipe's warmup. Of training only, like :func:`training_problems`."""
    steps, o = r.train.steps, r.optim
    w = []
    if o.warmup_steps > 1 and o.warmup_steps >= steps:  # lr_factor: full LR from step warmup_steps - 1
        decay = "" if o.scheduler == "constant" else f", and the {o.scheduler} decay never starts"
        w.append(
            f"optim.warmup_steps: {o.warmup_steps} is not below train.steps ({steps}): "
            f"{_reaches('the LR (optim.lr)', o.warmup_steps, steps)}{decay}; lower optim.warmup_steps or raise "
            "train.steps"
        )
    for name, spec in r.unfreeze.items():  # the module's group warms up from its at_step instead
        end = spec.at_step + spec.warmup_steps
        if spec.warmup_steps > 1 and end >= steps:
            w.append(
                f"unfreeze.{name}.warmup_steps: {spec.warmup_steps} steps from at_step {spec.at_step} do not end "
                f"before train.steps ({steps}): {_reaches(f'the LR of {name}', end, steps)}; lower "
                f"unfreeze.{name}.warmup_steps or raise train.steps"
            )
    return w


def _reaches(lr: str, end: int, steps: int) -> str:
    """When ``lr``, warmed up until ``end >= steps`` (full from step ``end - 1``), reaches its peak."""
    if end == steps:
        return f"{lr} reaches its peak only at the run's last step ({steps - 1})"
    return f"{lr} never reaches its peak (it would at step {end - 1}; the run's last is {steps - 1})"


def trained_term_problems(r: Recipe) -> list[str]:
    """A run that never computes any loss term trains nothing: its loss is a constant 0 at every step
    (``CompositeLoss.combine``), silently. A term is computed where its weight is non-zero at some
    step (:func:`~vla_ft.loss_weighting.ever_weighted`, ramps included) and the run can compute it:
    the gripper term needs ``model.gripper_head``, the language term ``data.language_target``."""
    from vla_ft.loss_weighting import TERMS, ever_weighted

    weighted = {t: ever_weighted(r.loss, t) for t in TERMS}
    if not any(weighted.values()) and r.loss.strategy != "scheduled":
        return []  # check_weights: "every term has weight 0"
    missing = {"gripper": not r.model.gripper_head, "language": r.data.language_target == "none"}
    if any(on and not missing.get(t, False) for t, on in weighted.items()):
        return []
    needs = {"gripper": "model.gripper_head is false", "language": "data.language_target is none"}
    why = [f"{t}: {needs[t]}" if on else f"{t}: weight 0 at every step" for t, on in weighted.items()]
    return [f"loss.weights: no loss term is ever computed, so nothing would train ({'; '.join(why)})"]


def early_stopping_problems(r: Recipe) -> list[str]:
    """``train.early_stopping.patience`` counts validations: without any during the run it does nothing."""
    t, d = r.train, r.data
    if not t.early_stopping.patience > 0:
        return []
    key = f"train.early_stopping.patience: {t.early_stopping.patience} stops on stalled validations, but"
    if d.val_ratio == 0 and not d.val_episodes and not d.val_filter and not r.rollout.episodes:
        return [
            f"{key} the run has no validation set (data.val_ratio is 0, no data.val_episodes or data.val_filter): "
            "set data.val_ratio > 0, or patience 0"
        ]
    if t.val_every == 0:
        return [f"{key} train.val_every is 0 (validation only at the end): set train.val_every, or patience 0"]
    n = -(-t.steps // t.val_every)  # every val_every steps and at the end; the first sets the best
    if t.early_stopping.patience > n - 1:
        return [
            f"{key} train.steps {t.steps} with train.val_every {t.val_every} validate {n} time(s), and the first "
            f"sets the best: at most {n - 1} can stall; lower the patience or validate more often"
        ]
    return []
