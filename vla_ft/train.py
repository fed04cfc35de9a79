"""The one training loop: ``main -> setup -> fit -> StepLoop -> train_step / evaluate``.

Every regime (full, frozen vision, staged unfreeze, head-only, LoRA, CPU/GPU, 1 or N
processes) is this loop with a different recipe. The host waits for the GPU once per
optimizer step, to read the step's finite flags (loss, gradients: does the step count?), and
once per log interval. With a fused optimizer in one process the update is skipped on the
device when a flag is down, so the host reads a step's flags only after it has queued the next
step's forward and backward, wherever nothing it prepared for that step depends on them
(:func:`can_defer`): the GPU then does not wait for the host between steps.

One iteration: ``prepare_update`` (unfreeze what is due, set the LR of update ``step``) ->
the next group of micro-batches -> ``train_step`` (backward each, then one optimizer step,
or a skip) -> ``after_update`` (log, validate) -> checkpoint if due or if asked to stop.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch

from vla_ft import optim
from vla_ft.config import Recipe, RecipeError
from vla_ft.data import step_groups, to_device
from vla_ft.master_adamw import MasterAdamW
from vla_ft.metrics import ActionMetrics, source_metrics
from vla_ft.rollout import rollout_metrics
from vla_ft.run_setup import Run, setup, teardown
from vla_ft.run_state import TrainState, save_training_checkpoint
from vla_ft.signals import StopRequest, TrainingHalted, record_skip
from vla_ft.tracking import Averager, TrainWindow, summary_line
from vla_ft.train_metrics import metric_terms, pooled_metrics, split_stats

__all__ = ["StepLoop", "TrainingHalted", "evaluate", "fit", "main", "train_step"]

Group = list[dict[str, torch.Tensor]]


@dataclass
class StepResult:
    # micro-batch means: loss, loss/<term>, ...; metric/* pooled over micro-batches and ranks (train_metrics)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_norm: torch.Tensor | None = None  # total norm before clipping (unscaled under fp16)
    applied: bool | None = True  # False: skipped (non-finite, or an fp16 overflow); None: flags not read yet
    samples: int = 0  # this rank's samples in the group
    # per term: did the step (every micro-batch, every rank) hold any of its elements? (0-dim bool)
    # A step without any has no value of loss/<term>: the log's mean leaves it out.
    defined: dict[str, torch.Tensor] = field(default_factory=dict)
    flags: QueuedFlags | None = None  # a queued update's finite flags until :func:`resolve` reads them


class QueuedFlags:
    """A step's finite flags (loss, gradients), copied to host memory behind the work that computes
    them; :meth:`read` is where the host waits for the GPU."""

    def __init__(self, finite: torch.Tensor):
        self.ready: torch.cuda.Event | None = None
        if finite.is_cuda:
            self.host = torch.empty(2, dtype=torch.bool, pin_memory=True)
            self.host.copy_(finite, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record()  # the flags are ready here, before the update that follows
        else:
            self.host = finite

    def read(self) -> list[bool]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


def main(recipe: Recipe) -> dict[str, float]:
    """Train a recipe end to end; returns the last validation metrics."""
    run = setup(recipe)
    try:
        final = fit(run)
        if run.rt.is_main and (run.state.step >= recipe.train.steps or run.early_stop):
            print(summary_line(final, run.state.best_value, recipe.train.best_metric), flush=True)
        return final
    finally:
        teardown(run)


def fit(run: Run) -> dict[str, float]:
    """Train until ``train.steps`` updates, early stopping, or SIGTERM/SIGINT; returns the last validation."""
    r, st = run.recipe, run.state
    if st.step >= r.train.steps:
        run.progress.write(f"nothing to do: the checkpoint is at step {st.step} of {r.train.steps}")
        return validate(run)
    if stalled(r, st):  # relaunched after early stopping
        run.early_stop, patience = True, r.train.early_stopping.patience
        run.progress.write(
            f"nothing to do: the run stopped early at step {st.step} ({r.train.best_metric} did not improve "
            f"for {patience} validations); raise train.early_stopping.patience to train on"
        )
        return validate(run)
    groups = step_groups(run.train_loader, run.sampler, st, r.optim.accumulation)
    with StopRequest() as stop:
        loop = StepLoop(run, stop)
        while st.step < r.train.steps and not loop.stopped:
            loop.advance(groups)
    run.progress.close()
    return loop.last_val


class StepLoop:
    """``fit``'s iterations: prepare, fetch, step; then log, validate and checkpoint what is due.

    Speed: a step whose flags the host may leave unread (:func:`can_defer`) stays ``pending``
    while the next step is prepared as if it counted and its forward and backward are queued;
    ``train_step`` reads it (:meth:`settle_pending`) just before queuing the next update. If it
    was skipped, the step being queued retries its index with that index's LR, and nothing else
    differs: ``can_defer`` admits no unfreeze, log, validation or checkpoint at the index ahead,
    and no loss that reads the step. Every step ends as it does when each is read at once
    (tests/test_deferred_step.py).
    """

    def __init__(self, run: Run, stop: StopRequest):
        self.run, self.stop = run, stop
        self.window = run.window  # restored from the checkpoint on resume
        self.window.start_clock()
        self.last_val: dict[str, float] = {}
        self.stopped = False  # a signal or early stopping ended the run (checkpoint saved)
        self.pending: tuple[StepResult, Group] | None = None

    def advance(self, groups: Iterator[Group]) -> StepResult:
        """One optimizer step on the next group; returns its result (``applied`` None while pending)."""
        run, st, window = self.run, self.run.state, self.window
        prepare_update(run, st.step + (self.pending is not None))
        t_wait = time.perf_counter()
        group = next(groups)
        window.wait_s += time.perf_counter() - t_wait
        result = train_step(run, group, self.settle_pending if self.pending else None, defer=True)
        st.consumed += result.samples * run.rt.world_size
        window.samples += result.samples * run.rt.world_size
        if result.applied is None and can_defer(run, self.stop):
            self.pending = (result, group)
        else:
            if result.applied is None:
                resolve(run, result, group)
            self.finish(result)
        return result

    def settle_pending(self) -> None:
        """Read the pending step: it counted (its index is done), or the step being queued retries its index."""
        (result, group), self.pending = self.pending, None
        run = self.run
        resolve(run, result, group)
        if result.applied:
            run.state.step += 1
            after_update(run, result, self.window)  # nothing is due at this index (can_defer)
        else:
            optim.set_lr(run.recipe, run.optimizer, run.state.step)

    def finish(self, result: StepResult) -> None:
        """After a read step: log and validate what is due, checkpoint if due or stopping."""
        run, r, st, stop = self.run, self.run.recipe, self.run.state, self.stop
        due = False
        if result.applied:
            st.step += 1
            self.last_val = after_update(run, result, self.window) or self.last_val
            due = (bool(r.checkpoint.every) and st.step % r.checkpoint.every == 0) or st.step == r.train.steps
            due = due or st.best_step == st.step  # the best is always a real checkpoint
        stopping = run.rt.any_true(stop.requested) or run.early_stop
        if run.early_stop and self.window.samples:  # the run ends here: its last steps get their row
            log_train(run, self.window)  # (a signal keeps them in the checkpoint's window instead)
        if due or stopping:
            with self.window.paused(run.rt.device):
                save_training_checkpoint(run)
        if stopping:
            why = f"signal {stop.signame}" if stop.requested else f"early stopping ({r.train.best_metric} stalled)"
            run.progress.write(f"{why}: checkpoint saved at step {st.step}, exiting")
            self.stopped = True


def can_defer(run: Run, stop: StopRequest) -> bool:
    """Whether the host may prepare and queue the next step before reading this one's flags:
    nothing at the next index may depend on them (this step counts, or the next retries its index)."""
    r, ahead = run.recipe, run.state.step + 1

    def due(every: int) -> bool:
        return bool(every) and ahead % every == 0

    return not (
        stop.requested
        or run.early_stop
        or run.loss_fn.reads_step
        or ahead >= r.train.steps
        or due(r.logging.every)
        or due(r.train.val_every)
        or due(r.checkpoint.every)
        or optim.frozen_at(r, run.model, ahead) != run.model.frozen
    )


def stalled(recipe: Recipe, state: TrainState) -> bool:
    """Early stopping: ``best_metric`` has not improved for ``patience`` validations (0 = never)."""
    patience = recipe.train.early_stopping.patience
    return bool(patience) and state.evals_since_best >= patience


def prepare_update(run: Run, step: int | None = None) -> None:
    """Before update ``step`` (0-based; default ``state.step``): unfreeze what is due, set every group's LR."""
    step = run.state.step if step is None else step
    apply_freeze_plan(run, step)
    optim.set_lr(run.recipe, run.optimizer, step)
    run.loss_fn.set_step(step)  # scheduled weights, DWA windows, grad-norm cadence


def apply_freeze_plan(run: Run, step: int) -> None:
    """Unfreeze modules whose step has come; their groups exist from the start (see optim)."""
    frozen = optim.frozen_at(run.recipe, run.model, step)
    if frozen != run.model.frozen:
        thawed = sorted(run.model.frozen - frozen)
        run.model.set_frozen(frozen)
        optim.check_trainable_covered(run.model, run.optimizer)
        run.loss_fn.watch(run.shared_params)  # the watched layer may just have become trainable
        run.on_freeze_change()
        run.progress.write(f"step {step + 1}: unfreezing {', '.join(thawed)}")


def train_step(
    run: Run, group: Group, before_update: Callable[[], None] | None = None, defer: bool = False
) -> StepResult:
    """Forward/backward every micro-batch of the group, then one optimizer step (or a skip).

    ``before_update`` runs after the last backward, just before the update is queued
    (``StepLoop`` reads the previous step there). With ``defer``, a queued update
    (:func:`queues_step`) leaves its finite flags unread: ``applied`` is None until :func:`resolve`.
    """
    r, model, opt = run.recipe, run.model, run.optimizer
    model.train()  # frozen modules stay in eval (VLA.train)
    run.loss_fn.train()
    model.wants_language = r.data.language_target != "none" and run.loss_fn.wants("language")
    parts, stats, n, samples = Averager(), [], len(group), 0
    fused = queues_step(run)
    reads_bf16 = fused and isinstance(opt, MasterAdamW)  # the last micro-batch's bf16 gradients stay
    pooled = pools_terms(run, group)  # the shares need every micro-batch's counts first
    moved = (to_device(b, run.rt.device) for b in group)  # one micro-batch on the device at a time...
    batches = list(moved) if pooled else moved  # ...unless the shares need them all first
    shares, defined = term_shares(run, batches) if pooled else (None, None)
    for i, batch in enumerate(batches):
        # The backward too: FSDP2 reads its sync flag when the gradients are reduced, DDP in the forward.
        with run.no_sync(last=i == n - 1):
            with run.rt.autocast():
                outputs = run.forward(batch)
                total, terms = run.loss_fn(outputs, batch, None if shares is None else shares[i])
            # Each micro-batch counts 1/n; with the shares, the step's gradient is that of one batch
            # of every sample of the group (and of every rank).
            loss = total / n
            (run.scaler.scale(loss) if run.scaler else loss).backward()
        if model.master_weights is not None and not (reads_bf16 and n == 1):  # (n = 1: nothing to collect)
            # bf16 gradients -> fp32 masters, accumulated in fp32
            model.master_weights.collect_grads(keep_bf16=reads_bf16 and i == n - 1)
        logged, counts = split_stats(terms)  # metric/*: from the counts of every micro-batch and rank
        parts.add({"loss": total, **logged})
        stats.append(counts)
        samples += batch["actions"].shape[0]
    if defined is None:  # one micro-batch in one process: its own counts say
        defined = {k: c > 0 for k, c in term_counts(run, batch).items()}
    metrics = pooled_metrics(metric_terms(model.wants_language, run.loss_fn), stats, run.rt.all_sum, run.rt.device)
    result = StepResult({**parts.mean_values(), **metrics}, samples=samples, defined=defined)
    if run.scaler:
        run.scaler.unscale_(opt)
    clip = r.optim.grad_clip if r.optim.grad_clip > 0 else math.inf
    if reads_bf16:
        result.grad_norm = opt.grad_norm()
    else:
        result.grad_norm = (total_grad_norm(run.trainable_params()) if fused else run.clip_grad_norm(clip)).detach()
    finite = torch.isfinite(torch.stack([result.parts["loss"].float(), result.grad_norm.float()]))
    if before_update is not None:
        before_update()
    if fused:
        result.flags, result.applied = queue_update(run, finite, result.grad_norm, clip), None
        if run.ema is not None:
            run.ema.update(finite.all(), run.state.step)  # a skipped update leaves it as it is, unread
        opt.zero_grad(set_to_none=True)
        if not defer:
            resolve(run, result, group)
        return result
    loss_ok, grads_ok = run.rt.all_true_each(finite.tolist())  # the host waits for the step here
    if not loss_ok or (not grads_ok and run.scaler is None):
        result.applied = False
        if run.scaler:
            run.scaler.update()  # resets the scaler's per-step state (unscale_ was called)
    elif run.scaler:
        result.applied = scaler_step(run)
    else:
        opt.step()
    if run.ema is not None and result.applied:
        run.ema.update(torch.ones((), device=run.rt.device), run.state.step)
    opt.zero_grad(set_to_none=True)
    # an fp16 overflow is routine until the scale falls below 1 (get_scale reads the device: skips only)
    routine = not result.applied and bool(run.scaler and loss_ok and run.scaler.get_scale() >= 1.0)
    tally(run, result, group, routine)
    return result


def pools_terms(run: Run, group: Group) -> bool:
    """Whether the step's terms are pooled over several micro-batches or ranks (:func:`term_shares`)."""
    return len(group) > 1 or run.rt.distributed


def term_shares(run: Run, batches: Group) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """Per micro-batch, each term's share ``n W c_i / C`` (``c_i`` its valid count, ``C`` the sum
    over the step's n micro-batches and W ranks): a masked mean over a micro-batch with fewer
    target tokens or padded action steps then weighs what it holds (``CompositeLoss.counts``).
    The gradient is the one of a single batch of all the step's samples, whatever the split.
    Also returns, per term, whether C > 0 (:attr:`StepResult.defined`)."""
    counts = [term_counts(run, b) for b in batches]
    names = sorted(set.intersection(*(set(c) for c in counts)))
    if not names:  # every term's weight is 0 at this step (a schedule's start): nothing to share
        return [{} for _ in batches], {}
    table = torch.stack([torch.stack([c[k] for k in names]) for c in counts])  # (n, terms)
    pooled = run.rt.all_sum(table.sum(0))
    scale = len(batches) * run.rt.world_size
    shares = table * scale / torch.where(pooled > 0, pooled, torch.ones_like(pooled))
    return [dict(zip(names, row, strict=True)) for row in shares], dict(zip(names, pooled > 0, strict=True))


def term_counts(run: Run, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The loss's valid counts of the terms this step computes: no language term when the model
    predicts no language (``data.language_target: none``, or its weight off)."""
    counts = run.loss_fn.counts(batch)
    if not run.model.wants_language:
        counts.pop("language", None)
    return counts


def queues_step(run: Run) -> bool:
    """Whether this step takes the fused path of :func:`queue_update`: a fused Adam/AdamW in one
    process without a GradScaler (other optimizers, fp16 and several ranks take the plain one)."""
    opt = run.optimizer
    return run.scaler is None and not run.rt.distributed and bool(opt.defaults.get("fused"))


def resolve(run: Run, result: StepResult, group: Group) -> None:
    """Read a queued step's finite flags: the step counted, or the device skipped its update
    (recorded; may halt the run)."""
    loss_ok, grads_ok = result.flags.read()
    result.flags, result.applied = None, loss_ok and grads_ok
    tally(run, result, group)


def tally(run: Run, result: StepResult, group: Group, routine: bool = False) -> None:
    """End a run of skips, or count a skip (``routine``: an fp16 overflow, not counted)."""
    if result.applied:
        run.state.consecutive_skips = 0
    elif not routine:
        record_skip(run, group)


def total_grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients together (what ``clip_grad_norm_`` returns), without clipping;
    on the parameters' device also when none of them got a gradient (torch then returns a CPU zero)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.to(params[0].device) if params else norm


def queue_update(run: Run, finite: torch.Tensor, grad_norm: torch.Tensor, clip: float) -> QueuedFlags:
    """Speed: queue the optimizer step without the host reading ``finite`` (loss_ok, grads_ok),
    and clip inside the fused update.

    The fused kernel skips the update on the device when ``found_inf`` is set (the mechanism
    GradScaler uses), so a non-finite step still changes no weight, moment or step count, while
    the GPU runs the update during the host's wait and bookkeeping. It also divides every
    gradient by ``grad_scale`` as it reads it: ``max((norm + 1e-6) / clip, 1)`` is exactly
    ``clip_grad_norm_``'s factor, without its pass over every gradient. Reference VLA on an
    H100, against the plain path (host wait, ``clip_grad_norm_``, update): -1.1% step time
    (full fine-tune), -2.4% (LoRA). Returns the flags, for :func:`resolve`.
    """
    opt = run.optimizer
    flags = QueuedFlags(finite)
    opt.found_inf = (~finite.all()).float()  # 0-dim, like the fused optimizer's step counters
    opt.grad_scale = clip_divisor(grad_norm, clip)
    try:
        opt.step()
    finally:
        del opt.found_inf, opt.grad_scale
    return flags


def clip_divisor(grad_norm: torch.Tensor, clip: float) -> torch.Tensor | None:
    """What a fused optimizer divides the gradients by to clip them like ``clip_grad_norm_(clip)``
    (which multiplies by ``min(clip / (norm + 1e-6), 1)``); None when there is no clipping."""
    return None if math.isinf(clip) else ((grad_norm.float() + 1e-6) / clip).clamp(min=1.0)


def scaler_step(run: Run) -> bool:
    """fp16: step through the GradScaler; False when it skipped the update (inf/NaN gradients),
    which then does not advance the step count or the LR schedule."""
    scale = run.scaler.get_scale()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    applied = run.scaler.get_scale() >= scale  # the scale only shrinks when the step was skipped
    run.state.scaler_skips += 0 if applied else 1
    return applied


def after_update(run: Run, result: StepResult, window: TrainWindow) -> dict[str, float]:
    """Log at log steps, validate at validation steps (returns the validation values, else {})."""
    r, st = run.recipe, run.state
    window.values.add(
        {**result.parts, "grad_norm": result.grad_norm}, {f"loss/{k}": d for k, d in result.defined.items()}
    )
    run.progress.update(st.step)
    if st.step % r.logging.every == 0 or st.step == r.train.steps:
        log_train(run, window)
    if (r.train.val_every and st.step % r.train.val_every == 0) or st.step == r.train.steps:
        with window.paused(run.rt.device):
            return validate_and_select(run)
    return {}


def log_train(run: Run, window: TrainWindow) -> None:
    """Means over the window (the one host sync per log interval), LRs, throughput, faults."""
    st = run.state
    values = {**run.reduce_metrics(window.values.means()), **optim.group_lrs(run.optimizer)}
    elapsed = window.elapsed()  # read once: samples/s, data wait and TFLOP/s share one interval
    values.update({**window.perf(elapsed), **run.perf_metrics(window.samples, elapsed)})
    values["fault/nonfinite_skips"] = float(st.skipped)
    if run.scaler:
        values.update({"amp/scale": run.scaler.get_scale(), "amp/scaler_skips": float(st.scaler_skips)})
    run.logger.log(st.step, values)
    run.progress.update(st.step, {k: v for k, v in values.items() if k == "loss" or k.startswith("loss/")})
    window.reset()


@torch.no_grad()
def evaluate(run: Run) -> dict[str, float]:
    """Each loss term (``val/loss/<term>``) and action metrics in real units on the held-out episodes,
    and with ``rollout.episodes`` the closed-loop success rate (``val/rollout/*``)."""
    if run.val_loader is None and not run.recipe.rollout.episodes:
        return {}
    run.model.eval()
    out = held_out_metrics(run) if run.val_loader is not None else {}
    out.update(rollout_metrics(run))
    return run.reduce_metrics(out)


def held_out_metrics(run: Run) -> dict[str, float]:
    """The loss terms and action metrics on the validation episodes (the model in eval mode)."""
    r, model = run.recipe, run.model
    run.loss_fn.eval()
    model.wants_language = r.data.language_target != "none" and run.loss_fn.wants("language")

    d = run.data
    make = partial(
        ActionMetrics, d.normalizer, d.action_dim, r.data.chunk, run.gripper_dims, r.loss.gripper, r.model.gripper_head
    )
    metrics, per_source = make(), source_metrics(d.reader, d.val_episodes, make)
    sums: dict[str, torch.Tensor] = {}  # per term: sum of value x valid count, and the count
    counts: dict[str, torch.Tensor] = {}
    for batch in run.val_loader:
        batch = to_device(batch, run.rt.device)
        with run.rt.autocast():
            outputs = run.forward(batch)
            results = run.loss_fn.evaluate(outputs, batch)
        for k, res in results.items():  # pooled over valid elements: a short last batch weighs what it holds
            sums[k] = sums.get(k, 0.0) + res.value.detach().float() * res.count
            counts[k] = counts.get(k, 0.0) + res.count
        metrics.update(outputs, batch)
        if per_source is not None:
            per_source.update(outputs, batch)
    out = {f"val/loss/{k}": float(sums[k] / counts[k]) if counts[k] > 0 else math.nan for k in sums}
    out.update(metrics.compute("val/"))
    out.update(per_source.compute("val/") if per_source is not None else {})
    return out


def validate(run: Run) -> dict[str, float]:
    """:func:`evaluate` of the weights the run ships: the average with ``train.ema_decay`` (what
    every validation and the best checkpoint measure), else the trained weights."""
    with run.ema.swapped_in() if run.ema is not None else contextlib.nullcontext():
        return evaluate(run)


SHOWN = ("val/baseline_l1", "val/gripper_acc", "val/rollout/success_rate")
"""Validation values the progress line shows after the best metric's."""


def validate_and_select(run: Run) -> dict[str, float]:
    """Validate, log, track the best value of ``train.best_metric`` and early stopping."""
    r, st = run.recipe, run.state
    values = validate(run)
    if not values:
        return values
    run.logger.log(st.step, values)
    key = r.train.best_metric
    if key not in values:
        raise RecipeError(f"train.best_metric: '{key}' is not a validation metric; have: {', '.join(sorted(values))}")
    value = values[key]
    sign = 1.0 if r.train.best_mode == "min" else -1.0
    # A non-finite value is never the best: NaN would compare False with every later value.
    if math.isfinite(value) and (
        st.best_value is None or sign * (st.best_value - value) > r.train.early_stopping.min_delta
    ):
        st.best_value, st.best_step, st.evals_since_best = value, st.step, 0
    else:
        st.evals_since_best += 1
    run.early_stop = stalled(r, st)
    run.progress.write(
        f"step {st.step}: val {key}={value:.4g} "
        + (f"(best {st.best_value:.4g} @ {st.best_step})" if st.best_value is not None else "(no finite value yet)")
        + "".join(f" {k[4:]}={values[k]:.4g}" for k in SHOWN if k in values)
    )
    return values
