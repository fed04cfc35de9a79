"""The composite multi-objective loss of a VLA fine-tune: language, action and gripper terms.

Contract: ``CompositeLoss.forward(outputs, batch, share=None) -> (total, parts)``

  outputs  actions         (B, C, A) float  predicted normalised actions over all A dims
           gripper_logits  (B, C, G) float  one logit per gripper dim (absent without a gripper head)
           lm_logits       (N, V)    float  logits at the N supervised positions only (absent or N=0:
           lm_labels       (N,)      int64  no language term); labels may hold -100 (ignored)
  batch    actions         (B, C, A) float  targets, normalised except the gripper dims (raw units)
           action_mask     (B, C) or (B, C, A) bool, False = padded or missing step (absent = all valid)
           target_mask     (B, Lt) bool     the language target's real tokens (read by :meth:`counts`)
  share    optional {term: 0-dim}: multiplies each term's mean (the trainer's accumulation pooling,
           :meth:`CompositeLoss.counts`)

  total    0-dim fp32 with grad: the weighting strategy's combination of the terms
  parts    detached 0-dim tensors (no host sync here; the trainer syncs when it logs):
           loss/<term>       unweighted term, for computed terms only
           weight/<term>     effective weight applied to loss/<term>
           metric/token_acc, metric/perplexity                               (language computed)
           metric/gripper_acc, metric/gripper_f1, metric/gripper_transition_acc  (gripper computed)
           stat/<name>       the counts those metrics are ratios of (:data:`METRIC_STATS`): summed
                             over micro-batches (and ranks), :func:`term_metrics` gives the metrics
                             of one batch of all their samples (the trainer's log pools them)
           gradnorm/<term>, gradnorm_weighted/<term>   on the watched layer, every grad_norm_every steps
           A metric is NaN where undefined (no target token, no valid step, no transition).

Gripper labels (the gripper dims of ``batch["actions"]``, raw units): label 1 = closed.
``high = value > loss.gripper.threshold``; ``closed = high`` if ``closed_is_high`` else ``not high``
(i.e. ``value <= threshold``). ``pos_weight`` multiplies the closed class. Predicted closed = logit > 0.

Numerics: every term is computed in fp32 (fp64 inputs stay fp64) with autocast off. Masked means
divide by the (weighted) count of valid elements, replaced by 1 where it is 0: a term with no valid
element is exactly 0 with zero gradient, and is marked absent for the strategies (DWA averages,
uncertainty regulariser). Masked targets are replaced before use, so NaNs there never leak.

Trainer duties: ``loss.set_step(step)`` before each optimizer step (scheduled weights, DWA windows,
gradient-norm cadence); ``loss.train()``/``loss.eval()`` with the model (DWA statistics are updated
inside forward in training mode only); the model asks ``loss.wants(term)`` before computing a
head's outputs; ``loss.watch(params)`` once with the last trunk layer's parameters to get the
``gradnorm/*`` parts; ``loss.no_decay_parameters()`` go in an optimizer group with weight_decay 0.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vla_ft.config import ActionLossConfig, LossConfig, RecipeError
from vla_ft.loss_weighting import TERMS, TermValues, build_weighting, ever_weighted

IGNORE_INDEX = -100
ElementLoss = Callable[[Tensor, Tensor], Tensor]


def _smooth_l1(pred: Tensor, target: Tensor, beta: float) -> Tensor:
    return F.smooth_l1_loss(pred, target, reduction="none", beta=beta)


ACTION_LOSSES: dict[str, Callable[[ActionLossConfig], ElementLoss]] = {
    "mse": lambda cfg: functools.partial(F.mse_loss, reduction="none"),
    "l1": lambda cfg: functools.partial(F.l1_loss, reduction="none"),
    "smooth_l1": lambda cfg: functools.partial(_smooth_l1, beta=cfg.beta),
}


@dataclass
class TermResult:
    """One term: its masked mean, its (weighted) valid count, its detached metrics and the counts
    they are ratios of (``stats``: :data:`METRIC_STATS`)."""

    value: Tensor
    count: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
    stats: dict[str, Tensor] = field(default_factory=dict)


# ----------------------------------------------------------------------------- checks and helpers
def _expect(term: str, ok: bool, message: str) -> None:
    """Raise a ValueError naming the term when a shape or dtype is wrong."""
    if not ok:
        raise ValueError(f"loss term '{term}': {message}")


def _same_shape(term: str, name_a: str, a: Tensor, name_b: str, b: Tensor) -> None:
    _expect(term, a.shape == b.shape, f"{name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")


def _floating(term: str, name: str, x: Tensor) -> None:
    _expect(term, x.is_floating_point(), f"{name} must be floating point, got {x.dtype} with shape {tuple(x.shape)}")


def _fp32(x: Tensor) -> Tensor:
    """Upcast half precision to fp32 (fp64 stays fp64, for gradient checks)."""
    return x if x.dtype == torch.float64 else x.float()


def _divide(total: Tensor, count: Tensor) -> Tensor:
    """total / count, with 1 in place of a zero count (so an empty term is 0, not NaN)."""
    return total / torch.where(count > 0, count, torch.ones_like(count))


def _defined(value: Tensor, count: Tensor) -> Tensor:
    """A metric over ``count`` elements, NaN where there is none: undefined, so the trainer's
    log leaves it out of its mean (``vla_ft.tracking.Averager``) instead of averaging in a 0."""
    return torch.where(count > 0, value, torch.nan)


def _grad_norm(value: Tensor, params: list[Tensor]) -> Tensor:
    """L2 norm of d value / d params (0 when value does not depend on them); keeps the graph."""
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True) if value.requires_grad else ()
    squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return torch.stack(squares).sum().sqrt() if squares else params[0].new_zeros((), dtype=torch.float32)


@contextlib.contextmanager
def _no_autocast(x: Tensor) -> Iterator[None]:
    with torch.autocast(device_type=x.device.type, enabled=False):
        yield


def element_mask(batch: dict[str, Tensor], shape: torch.Size, term: str) -> Tensor:
    """``batch["action_mask"]`` (B, C) or (B, C, A) bool -> (B, C, A) bool; absent = all valid."""
    mask = batch.get("action_mask")
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=batch["actions"].device)
    _expect(term, mask.dtype == torch.bool, f"batch['action_mask'] must be bool, got {mask.dtype}")
    ok = tuple(mask.shape) in (tuple(shape[:2]), tuple(shape))
    _expect(
        term, ok, f"batch['action_mask'] has shape {tuple(mask.shape)} but batch['actions'] has shape {tuple(shape)}"
    )
    return (mask[..., None] if mask.dim() == 2 else mask).expand(shape)


def gripper_labels(raw: Tensor, threshold: float, closed_is_high: bool) -> Tensor:
    """Raw gripper values (any shape) -> bool labels, True = closed (see the module docstring)."""
    high = raw > threshold
    return high if closed_is_high else ~high


# ----------------------------------------------------------------------------- metrics from counts
METRIC_STATS: dict[str, tuple[str, ...]] = {
    "language": ("tokens", "token_hits", "token_nll"),
    "gripper": (
        "gripper_scored",
        "gripper_hits",
        "gripper_tp2",
        "gripper_f1_den",
        "gripper_transitions",
        "gripper_transition_hits",
    ),
}
"""Per term with ``metric/*`` values, the 0-dim sums they are computed from (:func:`term_metrics`).
A metric is a ratio, so the mean of micro-batch metrics is not the metric of their samples (a
micro-batch with 2 target tokens would weigh as much as one with 20); summed counts are."""


def language_metrics(s: dict[str, Tensor]) -> dict[str, Tensor]:
    """Token accuracy and perplexity from the target tokens (``tokens``), the right ones
    (``token_hits``) and their summed unsmoothed cross-entropy (``token_nll``)."""
    n = s["tokens"]
    return {
        "metric/token_acc": _defined(_divide(s["token_hits"], n), n),
        "metric/perplexity": _defined(torch.exp(_divide(s["token_nll"], n)), n),
    }


def gripper_metrics(s: dict[str, Tensor]) -> dict[str, Tensor]:
    """Accuracy, F1 (closed = positive) and transition accuracy from the scored steps, the right ones,
    2 TP, 2 TP + FP + FN, the transitions and the right transitions (see :func:`gripper_term`)."""
    n, f1_den = s["gripper_scored"], s["gripper_f1_den"]
    # F1 is 1 with no closed step and none predicted; every metric without a scored step, and
    # transition accuracy without a transition, is undefined (NaN, left out of the logged mean).
    f1 = torch.where(f1_den > 0, _divide(s["gripper_tp2"], f1_den), 1.0)
    return {
        "metric/gripper_acc": _defined(_divide(s["gripper_hits"], n), n),
        "metric/gripper_f1": _defined(f1, n),
        "metric/gripper_transition_acc": s["gripper_transition_hits"] / s["gripper_transitions"],
    }


def term_metrics(term: str, stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ``metric/*`` values of ``term`` from its :data:`METRIC_STATS` counts (one batch's, or
    sums over several: the metrics of all their samples together)."""
    return {"language": language_metrics, "gripper": gripper_metrics}[term](stats)


# ----------------------------------------------------------------------------- the three terms
def language_term(logits: Tensor, labels: Tensor, label_smoothing: float) -> TermResult:
    """Cross-entropy at the supervised positions. logits: (N, V), labels: (N,) int64 with -100 ignored."""
    term = "language"
    _expect(term, logits.dim() == 2, f"lm_logits must be (N, V), got shape {tuple(logits.shape)}")
    _expect(
        term,
        labels.dim() == 1 and labels.shape[0] == logits.shape[0],
        f"lm_logits has shape {tuple(logits.shape)} but lm_labels has shape {tuple(labels.shape)}",
    )
    _floating(term, "lm_logits", logits)
    _expect(term, labels.dtype == torch.int64, f"lm_labels must be int64, got {labels.dtype}")
    logits = _fp32(logits)
    valid = labels != IGNORE_INDEX
    count = valid.sum().to(logits.dtype)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=label_smoothing, reduction="none")
    value = _divide(ce.sum(), count)
    with torch.no_grad():
        plain = functools.partial(F.cross_entropy, ignore_index=IGNORE_INDEX, reduction="none")
        nll = ce if label_smoothing == 0 else plain(logits, labels)
        hits = (logits.argmax(dim=-1) == labels) & valid
        stats = {"tokens": count, "token_hits": hits.sum().to(count.dtype), "token_nll": nll.sum()}
    return TermResult(value, count, language_metrics(stats), stats)


def action_term(pred: Tensor, target: Tensor, mask: Tensor, weights: Tensor, loss_fn: ElementLoss) -> TermResult:
    """Weighted masked mean of an element-wise regression loss.

    pred, target: (B, C, A') regressed dims only; mask: (B, C, A') bool; weights: (B, C, A') or
    broadcastable (per-horizon x per-dim). The mean divides by the summed weights of valid elements,
    so the weights are relative and the term's scale is set by ``loss.weights.action`` alone.
    """
    pred, target = _fp32(pred), _fp32(target)
    target = torch.where(mask, target, pred.detach())  # padded/missing targets may be NaN
    w = torch.where(mask, weights.to(pred.dtype), 0.0)
    count = w.sum()
    return TermResult(_divide((loss_fn(pred, target) * w).sum(), count), count)


def action_count(mask: Tensor, weights: Tensor) -> Tensor:
    """What :func:`action_term` divides by: the summed weights of the valid elements."""
    return torch.where(mask, weights.to(torch.float32), 0.0).sum()


def gripper_term(logits: Tensor, labels: Tensor, mask: Tensor, pos_weight: Tensor | None) -> TermResult:
    """BCE-with-logits over valid steps, plus accuracy, F1 (closed = positive) and transition accuracy.

    logits: (B, C, G); labels, mask: (B, C, G) bool. Transitions are steps t >= 1 whose label differs
    from step t-1, with both steps valid: the rare open/close frames that matter most.
    """
    logits = _fp32(logits)
    m = mask.to(logits.dtype)
    pos_weight = None if pos_weight is None else pos_weight.to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), pos_weight=pos_weight, reduction="none")
    count = m.sum()
    value = _divide((bce * m).sum(), count)
    with torch.no_grad():
        pred = logits > 0
        correct = pred == labels
        # As validation (vla_ft.metrics.ActionMetrics): a NaN logit is neither open nor closed, so it
        # is left out of every metric (``NaN > 0`` is false: it would have scored as "open").
        scored = mask & ~logits.isnan()
        n_scored = scored.sum().to(count.dtype)
        tp, fp, fn = ((pred & labels & scored).sum(), (pred & ~labels & scored).sum(), (~pred & labels & scored).sum())
        # a label change between two valid steps; scored where the later step's prediction is not NaN
        trans = (labels[:, 1:] != labels[:, :-1]) & mask[:, 1:] & mask[:, :-1] & scored[:, 1:]
        stats = {
            "gripper_scored": n_scored,
            "gripper_hits": (correct & scored).sum().to(count.dtype),
            "gripper_tp2": (2 * tp).to(count.dtype),
            "gripper_f1_den": (2 * tp + fp + fn).to(count.dtype),
            "gripper_transitions": trans.sum().to(count.dtype),
            "gripper_transition_hits": (correct[:, 1:] & trans).sum().to(count.dtype),
        }
    return TermResult(value, count, gripper_metrics(stats), stats)


# ----------------------------------------------------------------------------- configuration checks
def check_loss_config(cfg: LossConfig, chunk: int, gripper_head: bool) -> list[str]:
    """Problems of the loss section the recipe alone shows (empty = valid): ``vla-ft validate``
    reports them before any data is read."""
    p = []
    if cfg.action.type not in ACTION_LOSSES:
        p.append(f"loss.action.type: unknown loss '{cfg.action.type}'; valid: {', '.join(ACTION_LOSSES)}")
    if cfg.action.beta < 0:
        p.append(f"loss.action.beta: must be >= 0, got {cfg.action.beta}")
    for key, weights in (("dim_weights", cfg.action.dim_weights), ("horizon_weights", cfg.action.horizon_weights)):
        if weights is not None and (min(weights, default=-1) < 0 or sum(weights) <= 0):
            p.append(f"loss.action.{key}: must be >= 0 with at least one > 0, got {weights}")
    horizon = cfg.action.horizon_weights
    if horizon is not None and len(horizon) != chunk:
        p.append(f"loss.action.horizon_weights: {len(horizon)} values for data.chunk={chunk} (lengths must match)")
    dims = cfg.gripper.dims
    if gripper_head and not dims:
        p.append("loss.gripper.dims: name the gripper action dim(s) when model.gripper_head is true")
    if gripper_head and len(set(dims)) != len(dims):
        p.append(f"loss.gripper.dims: repeated dim in {dims}")
    if gripper_head and any(d < 0 for d in dims):
        p.append(f"loss.gripper.dims: {dims} holds a negative index; count action dims from 0")
    if cfg.gripper.pos_weight is not None and cfg.gripper.pos_weight <= 0:
        p.append(f"loss.gripper.pos_weight: must be > 0, got {cfg.gripper.pos_weight}")
    if not 0.0 <= cfg.language.label_smoothing < 1.0:
        p.append(f"loss.language.label_smoothing: must be in [0, 1), got {cfg.language.label_smoothing}")
    if cfg.grad_norm_every < 0:
        p.append(f"loss.grad_norm_every: must be >= 0, got {cfg.grad_norm_every}")
    return p


def check_action_dim(cfg: LossConfig, action_dim: int, gripper_head: bool) -> list[str]:
    """Problems of the loss section against the data's action dim, known once the data is read."""
    p = []
    weights = cfg.action.dim_weights
    if weights is not None and len(weights) != action_dim:
        p.append(f"loss.action.dim_weights: {len(weights)} values for {action_dim} action dims (lengths must match)")
    dims = cfg.gripper.dims
    if gripper_head and any(d >= action_dim for d in dims):
        valid = f"0..{action_dim - 1}"
        p.append(f"loss.gripper.dims: {dims} out of range for the data's {action_dim} action dims ({valid})")
    # The action term at any step, not only under loss.weights.action: a ramp may switch it on or keep it off.
    regressing, why = ever_weighted(cfg, "action"), _action_weight_source(cfg)
    if gripper_head and regressing and len(set(dims)) >= action_dim:
        p.append(f"loss.gripper.dims: every action dim is a gripper dim, nothing is left to regress{why}")
    regress = regressed_dims(action_dim, dims, gripper_head)
    if not p and weights is not None and regressing and sum(weights[a] for a in regress) <= 0:
        p.append(f"loss.action.dim_weights: all regressed dims {regress} have weight 0{why}")
    return p


def _action_weight_source(cfg: LossConfig) -> str:
    """Where a refused action term gets its weight, when the static weight is not the whole story."""
    spec = cfg.schedule.get("action") if cfg.strategy == "scheduled" else None
    return "" if spec is None else f" (loss.schedule.action ramps the action weight from {spec.start} to {spec.end})"


def loss_terms(gripper_head: bool) -> tuple[str, ...]:
    """The terms the loss can compute: the gripper term needs the gripper head."""
    return ("language", "action") + (("gripper",) if gripper_head else ())


def regressed_dims(action_dim: int, gripper_dims: Iterable[int], gripper_head: bool) -> list[int]:
    """Action dims in the regression: all of them, less the gripper dims when the gripper head is on."""
    excluded = set(gripper_dims) if gripper_head else set()
    return [a for a in range(action_dim) if a not in excluded]


# ----------------------------------------------------------------------------- the module
class CompositeLoss(nn.Module):
    """Language + action + gripper terms, combined by the ``loss.strategy`` weighting.

    ``state_dict()`` holds only the strategy state (uncertainty log-variances, DWA averages); the
    per-dim/per-horizon weights are rebuilt from the recipe. See the module docstring for the contract.
    """

    def __init__(self, cfg: LossConfig, action_dim: int, chunk: int, gripper_head: bool):
        super().__init__()
        problems = check_loss_config(cfg, chunk, gripper_head)
        problems += [] if problems else check_action_dim(cfg, action_dim, gripper_head)
        if problems:
            raise RecipeError(problems, "loss")
        self.cfg, self.action_dim, self.chunk, self.gripper_head = cfg, action_dim, chunk, gripper_head
        self.action_loss = ACTION_LOSSES[cfg.action.type](cfg.action)
        regress, dim_w = regressed_dims(action_dim, cfg.gripper.dims, gripper_head), cfg.action.dim_weights
        self.register_buffer("regress_dims", torch.tensor(regress, dtype=torch.long), persistent=False)
        self.register_buffer(
            "gripper_dims", torch.tensor(cfg.gripper.dims if gripper_head else [], dtype=torch.long), persistent=False
        )
        dims = torch.tensor(dim_w if dim_w is not None else [1.0] * action_dim)[regress]
        horizon = torch.tensor(cfg.action.horizon_weights or [1.0] * chunk)
        self.register_buffer("action_weights", horizon[:, None] * dims[None, :], persistent=False)  # (C, A')
        pos = cfg.gripper.pos_weight
        self.register_buffer("pos_weight", None if pos is None else torch.tensor(pos), persistent=False)
        self.weighting = build_weighting(cfg, loss_terms(gripper_head))
        if not any(self.weighting.active(t) for t in TERMS) and cfg.strategy != "scheduled":
            raise RecipeError("loss.weights: every term has weight 0", "loss")
        self._step: int | None = None
        self._new_step = True
        self._watched: list[Tensor] = []

    # ------------------------------------------------------------------ trainer-facing controls
    def set_step(self, step: int) -> None:
        """Tell the loss the optimizer step about to run (weights ramps, DWA windows, grad-norm cadence)."""
        self._new_step = self._new_step or step != self._step
        self._step = step
        self.weighting.step = step

    def step_state(self) -> dict[str, int | bool | None]:
        """The step bookkeeping a checkpoint keeps: a run stopped on a skipped step must not
        open a new DWA window (or a new grad-norm cadence) when it retries that step."""
        return {"step": self._step, "new_step": self._new_step}

    def load_step_state(self, state: dict[str, int | bool | None]) -> None:
        self._step, self._new_step = state["step"], bool(state["new_step"])
        if self._step is not None:
            self.weighting.step = self._step

    def wants(self, term: str) -> bool:
        """Whether ``term`` is computed: in training at the current step (the model skips a head's
        outputs if not); in evaluation at any step of the run, so validation logs every
        ``val/loss/<term>`` the run trains, also while a ramp holds its weight at 0."""
        if term not in TERMS:
            raise ValueError(f"unknown loss term '{term}'; terms: {', '.join(TERMS)}")
        return self.weighting.active(term) if self.training else self.weighting.ever_active(term)

    @property
    def reads_step(self) -> bool:
        """Whether a training forward depends on the step given to :meth:`set_step` (weight ramps,
        DWA windows, the grad-norm cadence); the trainer then prepares no step before knowing the last."""
        return self.cfg.strategy in ("scheduled", "dwa") or (self.cfg.grad_norm_every > 0 and bool(self._watched))

    def watch(self, params: Iterable[Tensor]) -> None:
        """Parameters of the shared layer (the last trunk layer) for the ``gradnorm/*`` diagnostic."""
        self._watched = list(params)  # a plain list: not registered, not in state_dict

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Learned weighting parameters (uncertainty log-variances) for a group with weight_decay 0."""
        return self.weighting.no_decay_parameters()

    # ------------------------------------------------------------------ computation
    def evaluate(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, TermResult]:
        """Every active term with its valid count and metrics."""
        results: dict[str, TermResult] = {}
        anchor = batch["actions"]
        with _no_autocast(anchor):
            if self.wants("language") and self._has_language(outputs):
                results["language"] = language_term(
                    outputs["lm_logits"], outputs["lm_labels"], self.cfg.language.label_smoothing
                )
            if self.wants("action"):
                results["action"] = self._action(outputs, batch)
            if self.wants("gripper"):
                results["gripper"] = self._gripper(outputs, batch)
        return results

    def terms(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Unweighted, undetached 0-dim terms, active terms only."""
        return {k: r.value for k, r in self.evaluate(outputs, batch).items()}

    def combine(self, terms: TermValues, present: TermValues | None = None, share: TermValues | None = None) -> Tensor:
        """Total loss of the terms under the weighting strategy; ``present`` marks terms with valid
        elements, ``share`` is the pooling share the terms were multiplied by (see :meth:`forward`)."""
        if not terms:  # nothing to learn from in this batch: a leaf zero keeps backward() valid
            return torch.zeros((), device=self.regress_dims.device, requires_grad=True)
        with _no_autocast(next(iter(terms.values()))):
            return self.weighting.combine(terms, present, share)

    def forward(
        self, outputs: dict[str, Tensor], batch: dict[str, Tensor], share: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(total, parts); in training mode also feeds the strategy's statistics (DWA).

        ``share`` multiplies each term's mean before the weighting (``loss/<term>`` included): the
        trainer's pooling of one optimizer step's micro-batches (:meth:`counts`); it scales the
        uncertainty regulariser too. DWA statistics and the gradient-norm diagnostic keep the
        micro-batch's own means.
        """
        results = self.evaluate(outputs, batch)
        means = {k: r.value for k, r in results.items()}
        present = {k: r.count > 0 for k, r in results.items()}
        new_step = self._consume_new_step() if self.training else False
        if self.training:
            self.weighting.observe({k: v.detach() for k, v in means.items()}, present, new_step)
        values = means if share is None else {k: v * share[k] for k, v in means.items()}
        total = self.combine(values, present, share)
        parts = self._parts(results, values, total.device)
        for k in (share or {}).keys() - values.keys():  # a term this micro-batch holds none of (no narrated
            parts[f"loss/{k}"] = total.new_zeros(())  # frame): its share is 0, and it still counts 1/n
        if self.training and new_step and self._grad_norm_due():
            parts.update(self.term_grad_norms(means, self._watched))
        return total, parts

    def counts(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Each term's valid (weighted) count in ``batch``, 0-dim fp32: what its mean divides by,
        from the batch alone (before any forward).

        Pooling a step's micro-batches: with counts ``c_i`` and their sum ``C`` over the step's
        ``n`` micro-batches, ``share_i = n c_i / C`` makes the mean of the n micro-batch losses
        the loss of one batch of all their samples: every term's sum over valid elements divided
        by ``C``, not a mean of per-micro-batch means (over W ranks: ``n W c_i / C``, C summed
        over the ranks too; ``vla_ft.train.term_shares``). Terms this batch cannot compute, or
        that are not computed at this step (:meth:`wants`), are left out.
        """
        out = {"action": action_count(self._action_mask(batch), self.action_weights)}
        if "target_mask" in batch:
            out["language"] = batch["target_mask"].sum().float()
        if self.gripper_head:
            out["gripper"] = self._gripper_mask(batch).sum().float()
        return {k: c for k, c in out.items() if self.wants(k)}  # a switched-off term is no "0 loss"

    def term_grad_norms(self, terms: dict[str, Tensor], params: list[Tensor]) -> dict[str, Tensor]:
        """Gradient norm of each term on ``params``: ``gradnorm/<term>`` (unweighted) and
        ``gradnorm_weighted/<term>`` (times its effective weight: what the optimizer actually sees)."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return {}
        weights = self.weighting.effective_weights(list(terms), params[0].device)
        out = {}
        for name, value in terms.items():
            out[f"gradnorm/{name}"] = norm = _grad_norm(value, params)
            out[f"gradnorm_weighted/{name}"] = norm * weights[name].to(norm.device)
        return out

    # ------------------------------------------------------------------ internals
    def _has_language(self, outputs: dict[str, Tensor]) -> bool:
        logits, labels = outputs.get("lm_logits"), outputs.get("lm_labels")
        _expect("language", (logits is None) == (labels is None), "lm_logits and lm_labels must come together")
        return logits is not None and labels is not None and logits.shape[0] > 0

    def _action(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> TermResult:
        term = "action"
        _expect(term, "actions" in outputs, "outputs['actions'] is missing")
        pred, target = outputs["actions"], batch["actions"]
        _same_shape(term, "outputs['actions']", pred, "batch['actions']", target)
        expected = (pred.shape[0], self.chunk, self.action_dim)
        _expect(
            term,
            tuple(pred.shape) == expected,
            f"outputs['actions'] has shape {tuple(pred.shape)}, expected (B, chunk, action_dim) = {expected}",
        )
        _floating(term, "outputs['actions']", pred)
        _floating(term, "batch['actions']", target)
        pick = functools.partial(torch.index_select, dim=-1, index=self.regress_dims)
        return action_term(pick(pred), pick(target), self._action_mask(batch), self.action_weights, self.action_loss)

    def _action_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, C, A') valid elements of the regressed dims."""
        return element_mask(batch, batch["actions"].shape, "action").index_select(-1, self.regress_dims)

    def _gripper_mask(self, batch: dict[str, Tensor]) -> Tensor:
        """(B, C, G) valid elements of the gripper dims."""
        return element_mask(batch, batch["actions"].shape, "gripper").index_select(-1, self.gripper_dims)

    def _gripper(self, outputs: dict[str, Tensor], batch: dict[str, Tensor]) -> TermResult:
        term = "gripper"
        _expect(
            term, "gripper_logits" in outputs, "outputs['gripper_logits'] missing though model.gripper_head is true"
        )
        logits, actions = outputs["gripper_logits"], batch["actions"]
        raw = actions.index_select(-1, self.gripper_dims)
        _same_shape(term, "outputs['gripper_logits']", logits, f"batch['actions'][..., {self.cfg.gripper.dims}]", raw)
        _floating(term, "outputs['gripper_logits']", logits)
        labels = gripper_labels(raw, self.cfg.gripper.threshold, self.cfg.gripper.closed_is_high)
        return gripper_term(logits, labels, self._gripper_mask(batch), self.pos_weight)

    def _parts(
        self, results: dict[str, TermResult], values: dict[str, Tensor], device: torch.device
    ) -> dict[str, Tensor]:
        parts = {f"loss/{k}": v.detach() for k, v in values.items()}
        for r in results.values():
            parts.update(r.metrics)
            parts.update({f"stat/{k}": v for k, v in r.stats.items()})
        parts.update({f"weight/{k}": w for k, w in self.weighting.effective_weights(list(results), device).items()})
        return parts

    def _consume_new_step(self) -> bool:
        """True for the first training forward of an optimizer step (every forward if set_step is never called)."""
        new = self._new_step or self._step is None
        self._new_step = False
        return new

    def _grad_norm_due(self) -> bool:
        every = self.cfg.grad_norm_every
        return bool(self._watched) and every > 0 and self._step is not None and self._step % every == 0
