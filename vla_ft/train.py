"""The one training loop: ``main -> setup -> fit -> train_step / evaluate``.

Every regime (full, frozen vision, staged unfreeze, head-only, LoRA, CPU/GPU, 1 or N
processes) is this loop with a different recipe. Host syncs happen once per optimizer step
(the finite-gradient check every rank must agree on) and once per log interval.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from vla_ft import optim
from vla_ft.config import Recipe
from vla_ft.data import to_device
from vla_ft.metrics import ActionMetrics
from vla_ft.run_setup import Run, setup, teardown
from vla_ft.run_state import save_training_checkpoint
from vla_ft.signals import StopRequest


class TrainingHalted(RuntimeError):
    """Too many consecutive non-finite steps; the message names step, samples and LR."""


@dataclass
class StepResult:
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_norm: torch.Tensor | None = None
    applied: bool = True
    samples: int = 0


def main(recipe: Recipe) -> dict[str, float]:
    """Train a recipe end to end; returns the final validation metrics."""
    run = setup(recipe)
    try:
        final = fit(run)
        if run.rt.is_main:
            print(summary_line(final, run.state.best_value, recipe.train.best_metric), flush=True)
        return final
    finally:
        teardown(run)


def summary_line(values: dict[str, float], best: float | None, best_metric: str) -> str:
    """The closing line: is the policy better than always predicting the mean action?"""
    if "val/action_l1" not in values:
        return "done (no validation episodes)"
    l1, base = values["val/action_l1"], values["val/baseline_l1"]
    text = f"held-out action L1 {l1:.4g} vs mean-action baseline {base:.4g} ({l1 / max(base, 1e-12):.0%} of baseline)"
    if "val/gripper_acc" in values:
        text += f", gripper accuracy {values['val/gripper_acc']:.1%}"
    if best is not None:
        text += f"; best {best_metric} {best:.4g}"
    return text


def step_groups(run: Run):
    """Yield lists of micro-batches, one list per optimizer step, epoch after epoch.

    The last group of an epoch may be shorter than ``optim.accumulation`` (a final partial
    accumulation); ``run.state.consumed`` counts samples of the epoch already used.
    """
    accum = run.recipe.optim.accumulation
    while True:
        run.sampler.set_epoch(run.state.epoch, run.state.consumed)
        group: list[dict[str, torch.Tensor]] = []
        for batch in run.train_loader:
            group.append(batch)
            if len(group) == accum:
                yield group
                group = []
        if group:
            yield group
        run.state.epoch, run.state.consumed = run.state.epoch + 1, 0


def fit(run: Run) -> dict[str, float]:
    r, st = run.recipe, run.state
    groups = step_groups(run)
    last_val: dict[str, float] = {}
    window: dict[str, Any] = {"t0": time.perf_counter(), "wait": 0.0, "samples": 0, "parts": {}, "n": 0}
    with StopRequest() as stop:
        while st.step < r.train.steps:
            t_wait = time.perf_counter()
            group = next(groups)
            window["wait"] += time.perf_counter() - t_wait
            result = train_step(run, group)
            st.consumed += result.samples * run.rt.world_size
            window["samples"] += result.samples * run.rt.world_size
            if not result.applied:
                continue
            st.step += 1
            optim.set_lr(r, run.optimizer, st.step)
            apply_freeze_plan(run)
            for k, v in result.parts.items():
                window["parts"][k] = window["parts"].get(k, 0.0) + v
            window["n"] += 1
            window["grad_norm"] = result.grad_norm
            if st.step % r.logging.every == 0 or st.step == r.train.steps:
                log_train(run, window)
            if (r.train.val_every and st.step % r.train.val_every == 0) or st.step == r.train.steps:
                last_val = validate_and_select(run)
            if run.early_stop:
                run.progress.write(f"early stopping at step {st.step}: {r.train.best_metric} stalled")
            should_save = (r.checkpoint.every and st.step % r.checkpoint.every == 0) or st.step == r.train.steps
            should_save = should_save or st.best_step == st.step  # the best is always a real checkpoint
            stopping = run.rt.any_true(stop.requested) or run.early_stop
            if should_save or stopping:
                save_training_checkpoint(run)
            if stopping:
                if stop.requested:
                    run.progress.write(f"signal {stop.signame}: checkpoint saved at step {st.step}, exiting")
                break
    run.progress.close()
    return last_val


def apply_freeze_plan(run: Run) -> None:
    """Unfreeze modules whose step has come; groups already exist (see optim)."""
    frozen = optim.frozen_at(run.recipe, run.model, run.state.step)
    if frozen != run.model.frozen:
        thawed = sorted(run.model.frozen - frozen)
        run.model.set_frozen(frozen)
        run.on_freeze_change()
        run.progress.write(f"step {run.state.step}: unfroze {', '.join(thawed)}")


def train_step(run: Run, group: list[dict[str, torch.Tensor]]) -> StepResult:
    """Forward/backward every micro-batch of the group, then one optimizer step (or a skip)."""
    r, model, opt = run.recipe, run.model, run.optimizer
    model.train()
    run.loss_fn.train()
    run.loss_fn.set_step(run.state.step)  # scheduled weights; a zero-weight term is not computed
    model.wants_language = r.data.language_target != "none" and run.loss_fn.wants("language")
    result, n = StepResult(), len(group)
    for i, batch in enumerate(group):
        batch = to_device(batch, run.rt.device)
        with run.no_sync(last=i == n - 1), run.rt.autocast():
            outputs = run.forward(batch)
            if i == 0 and r.loss.grad_norm_every and (run.state.step + 1) % r.loss.grad_norm_every == 0:
                terms = run.loss_fn.terms(outputs, batch)
                result.parts.update(run.loss_fn.term_grad_norms(terms, run.shared_params))
            total, parts = run.loss_fn(outputs, batch)
        loss = total / n  # each micro-batch's mean counts 1/n, also for a short final group
        (run.scaler.scale(loss) if run.scaler else loss).backward()
        result.parts["loss"] = result.parts.get("loss", 0.0) + total.detach() / n
        for k, v in parts.items():
            result.parts[k] = result.parts.get(k, 0.0) + v / n
        result.samples += batch["actions"].shape[0]
    if run.scaler:
        run.scaler.unscale_(opt)
    clip = r.optim.grad_clip if r.optim.grad_clip > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(run.trainable_params(), clip)
    finite = run.rt.all_true(bool(torch.isfinite(norm) & torch.isfinite(result.parts["loss"])))
    result.grad_norm = norm.detach()
    if not finite and not (run.scaler and torch.isfinite(result.parts["loss"])):
        record_skip(run, group)
        opt.zero_grad(set_to_none=True)
        result.applied = False
        return result
    if run.scaler:
        scale = run.scaler.get_scale()
        run.scaler.step(opt)
        run.scaler.update()
        result.applied = run.scaler.get_scale() >= scale  # a skipped fp16 step does not advance the schedule
        run.state.scaler_skips += 0 if result.applied else 1
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    run.state.consecutive_skips = 0
    return result


def record_skip(run: Run, group: list[dict[str, torch.Tensor]]) -> None:
    st = run.state
    st.skipped += 1
    st.consecutive_skips += 1
    ids = [(int(e), int(f)) for b in group for e, f in zip(b["episode_index"], b["frame_index"])]
    lr = max(g["lr"] for g in run.optimizer.param_groups)
    run.logger.log(st.step, {"fault/nonfinite_skips": float(st.skipped)})
    run.progress.write(f"step {st.step + 1}: non-finite loss or gradient, step skipped ({st.consecutive_skips} in a row)")
    if st.consecutive_skips >= run.recipe.train.max_consecutive_skips:
        shown = ", ".join(f"ep{e}/f{f}" for e, f in ids[:16]) + (" ..." if len(ids) > 16 else "")
        raise TrainingHalted(
            f"halted at step {st.step + 1} after {st.consecutive_skips} consecutive non-finite steps; "
            f"lr {lr:.3g}; last batch (episode/frame): {shown}"
        )


def log_train(run: Run, window: dict[str, Any]) -> None:
    n = max(window["n"], 1)
    values = {k: float(v) / n for k, v in window["parts"].items()}  # the one host sync per log interval
    elapsed = time.perf_counter() - window["t0"]
    values["grad_norm"] = float(window["grad_norm"]) if window.get("grad_norm") is not None else math.nan
    values["perf/samples_per_s"] = window["samples"] / max(elapsed, 1e-9)
    values["perf/data_wait_frac"] = window["wait"] / max(elapsed, 1e-9)
    values.update(optim.group_lrs(run.optimizer))
    values.update(run.perf_metrics(window["samples"], elapsed))
    run.logger.log(run.state.step, values)
    run.progress.update(run.state.step, {"loss": values["loss"], **{k: values[k] for k in values if k.startswith("loss/")}})
    window.update(t0=time.perf_counter(), wait=0.0, samples=0, parts={}, n=0)


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Each loss term and action metrics in real units on the held-out episodes."""
    if run.val_loader is None:
        return {}
    r, model = run.recipe, run.model
    model.eval()
    run.loss_fn.eval()
    metrics = ActionMetrics(run.data.normalizer, run.data.action_dim, r.data.chunk, run.gripper_dims,
                            r.loss.gripper, r.model.gripper_head)
    sums: dict[str, float] = {}
    batches = 0
    for i, batch in enumerate(run.val_loader):
        if r.train.val_batches and i >= r.train.val_batches:
            break
        batch = to_device(batch, run.rt.device)
        with run.rt.autocast():
            outputs = run.forward(batch)
            _, parts = run.loss_fn(outputs, batch)
        for k, v in parts.items():
            if k.startswith("loss/"):
                sums[k] = sums.get(k, 0.0) + float(v)
        metrics.update(outputs, batch)
        batches += 1
    out = {f"val/{k}": v / max(batches, 1) for k, v in sums.items()}
    out.update(metrics.compute("val/"))
    return run.reduce_metrics(out)


def validate_and_select(run: Run) -> dict[str, float]:
    """Validate, log, track the best checkpoint and early stopping."""
    r, st = run.recipe, run.state
    values = evaluate(run)
    if not values:
        return values
    run.logger.log(st.step, values)
    key = r.train.best_metric
    if key not in values:
        raise KeyError(f"train.best_metric: '{key}' is not a validation metric; have: {', '.join(sorted(values))}")
    value = values[key]
    sign = 1.0 if r.train.best_mode == "min" else -1.0
    improved = st.best_value is None or sign * (st.best_value - value) > r.train.early_stopping.min_delta
    if improved:
        st.best_value, st.best_step, st.evals_since_best = value, st.step, 0
    else:
        st.evals_since_best += 1
    patience = r.train.early_stopping.patience
    run.early_stop = bool(patience) and st.evals_since_best >= patience
    run.progress.write(
        f"step {st.step}: val {key}={value:.4g} (best {st.best_value:.4g} @ {st.best_step})"
        + "".join(f" {k[4:]}={values[k]:.4g}" for k in ("val/baseline_l1", "val/gripper_acc") if k in values)
    )
    return values

