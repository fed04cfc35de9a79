"""Weighting strategies of the composite loss, chosen by name (``loss.strategy``).

A strategy turns the unweighted terms ``{name: L_k}`` (0-dim fp32 tensors) into one total. The
recipe weights ``w_k`` (``loss.weights``) are the base of every strategy: a zero weight switches
a term off (it is not computed at all) and a non-zero weight scales what the strategy builds:

===========  =====================================================================================
static       sum_k w_k L_k
scheduled    sum_k w_k(step) L_k, ``w_k`` ramping linearly or along a half cosine between two steps
             (``loss.schedule``); terms without a ramp keep their static weight
uncertainty  sum_k w_k (c_k exp(-s_k) L_k + s_k / 2), ``s_k = log sigma_k^2`` learned
             (Kendall, Gal & Cipolla 2018); ``c_k = 1/2`` for the Gaussian (regression) term,
             1 for the categorical/Bernoulli ones. Effective weight ``w_k c_k exp(-s_k)``.
dwa          sum_k w_k lambda_k L_k, ``lambda = K softmax(r / T)`` with ``r_k`` the ratio of the
             last two window averages of ``L_k`` (Dynamic Weight Average, Liu, Johns & Davison
             2019); ``lambda = 1`` until two windows of ``loss.dwa_window`` steps are complete
===========  =====================================================================================

State: the uncertainty log-variances are ``nn.Parameter``s (put them in a no-decay group:
:meth:`Weighting.no_decay_parameters`); the DWA running averages are persistent buffers. Both live
in the loss module's ``state_dict`` so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from vla_ft.config import LossConfig, RecipeError, ScheduledWeight
from vla_ft.config.checks import suggest

TermValues = dict[str, Tensor]
"""0-dim tensors by term name (language, action, gripper)."""

TERMS = ("language", "action", "gripper")

# Kendall et al. 2018: a Gaussian likelihood gives 1/(2 sigma^2) L + log sigma, a softmax (or
# Bernoulli) likelihood 1/sigma^2 L + log sigma. These are the likelihoods' constants, not weights.
KENDALL_SCALE = {"language": 1.0, "action": 0.5, "gripper": 1.0}

RAMPS: dict[str, Callable[[float], float]] = {
    "linear": lambda p: p,
    "cosine": lambda p: 0.5 * (1.0 - math.cos(math.pi * p)),
}


def ramp_weight(spec: ScheduledWeight, step: int) -> float:
    """Weight of a ramp at ``step``: ``start`` before ``start_step``, ``end`` after ``end_step``."""
    if step >= spec.end_step:  # first: a step ramp (start_step == end_step) is ``end`` from that step
        return spec.end
    if step <= spec.start_step:
        return spec.start
    progress = (step - spec.start_step) / (spec.end_step - spec.start_step)
    return spec.start + (spec.end - spec.start) * RAMPS[spec.shape](progress)


def ever_weighted(cfg: LossConfig, term: str) -> bool:
    """Whether the recipe weight of ``term`` is non-zero at some step.

    Under ``loss.strategy: scheduled`` a term's ramp replaces ``loss.weights.<term>`` at every
    step, and runs monotonically from ``start`` to ``end``: those two alone say whether it is ever
    on. Checks of the action dims must ask this, not the static weight, or a ramp from 0 hides a
    regression with nothing to regress and a ramp held at 0 blocks a gripper-only recipe."""
    spec = cfg.schedule.get(term) if cfg.strategy == "scheduled" else None
    return getattr(cfg.weights, term) != 0.0 if spec is None else max(spec.start, spec.end) != 0.0


def check_weights(cfg: LossConfig) -> list[str]:
    """Problems with the recipe weights and ramps (empty = valid)."""
    problems = []
    for term in TERMS:
        value = getattr(cfg.weights, term)
        if not math.isfinite(value) or value < 0:
            problems.append(f"loss.weights.{term}: must be finite and >= 0, got {value}")
    if cfg.strategy != "scheduled" and not any(getattr(cfg.weights, t) for t in TERMS):
        problems.append("loss.weights: every term has weight 0")
    if cfg.schedule and cfg.strategy != "scheduled":  # only ScheduledWeighting reads the ramps
        problems.append(
            f"loss.schedule: ramps for {', '.join(cfg.schedule)} apply only with loss.strategy=scheduled, "
            f"but loss.strategy is '{cfg.strategy}': set loss.strategy: scheduled, or remove loss.schedule"
        )
    problems += schedule_term_problems(cfg)
    for term, spec in cfg.schedule.items():
        if spec.shape not in RAMPS:
            problems.append(f"loss.schedule.{term}.shape: '{spec.shape}' is not one of {', '.join(RAMPS)}")
        if spec.end_step < spec.start_step:
            problems.append(f"loss.schedule.{term}: end_step {spec.end_step} < start_step {spec.start_step}")
        if min(spec.start, spec.end) < 0:
            problems.append(f"loss.schedule.{term}: start and end must be >= 0")
    if cfg.dwa_temperature <= 0:
        problems.append(f"loss.dwa_temperature: must be > 0, got {cfg.dwa_temperature}")
    if cfg.dwa_window < 1:
        problems.append(f"loss.dwa_window: must be >= 1, got {cfg.dwa_window}")
    return problems


def first_moving_step(spec: ScheduledWeight) -> int:
    """The first optimizer step whose ramp weight is not ``start``: ``start_step`` for a step ramp
    (``start_step == end_step``), else the step after it (:func:`ramp_weight` holds ``start`` there)."""
    return spec.start_step if spec.end_step == spec.start_step else spec.start_step + 1


def ramp_step_problems(cfg: LossConfig, steps: int) -> list[str]:
    """Ramps that never move within a run of ``steps`` optimizer steps (0 .. steps - 1).

    Such a ramp holds its term at ``start`` for the whole run, yet :func:`ever_weighted` (and with it
    validation's ``val/loss/<term>``, the metric names and the action-dim checks) reads it as weighted
    by ``max(start, end)``: a ramp from 0 starting past the run trains nothing it reports. Refused, as
    ``unfreeze.<module>.at_step`` past the run is; a resume with more ``train.steps`` passes again. A
    ``start_step`` before step 0 is refused, as a negative ``unfreeze.<module>.at_step`` is.
    """
    if cfg.strategy != "scheduled":
        return []
    problems = [
        f"loss.schedule.{term}.start_step: must be >= 0 (the first step is 0), got {spec.start_step}"
        for term, spec in cfg.schedule.items()
        if term in TERMS and spec.start_step < 0
    ]
    for term, spec in cfg.schedule.items():
        if term not in TERMS or spec.start == spec.end or spec.end_step < spec.start_step:
            continue  # a constant "ramp", or problems reported by check_weights
        first = first_moving_step(spec)
        if first >= steps:
            problems.append(
                f"loss.schedule.{term}.start_step: the ramp starts at step {spec.start_step} but train.steps is "
                f"{steps}: its weight first changes at step {first}, after the run's last step ({steps - 1}), so it "
                f"stays {spec.start} throughout; lower start_step or raise train.steps"
            )
    return problems


def schedule_term_problems(cfg: LossConfig) -> list[str]:
    """``loss.schedule`` entries naming no loss term (reported even next to type errors)."""
    return [
        f"loss.schedule.{term}: unknown term{suggest(term, TERMS)}; terms: {', '.join(TERMS)}"
        for term in cfg.schedule
        if term not in TERMS
    ]


class Weighting(nn.Module):
    """Static weighting, and the base of the others.

    ``terms`` are the terms this loss can compute at all (the gripper term needs a gripper head).
    ``step`` is the optimizer step, set by the loss's ``set_step``.
    """

    def __init__(self, cfg: LossConfig, terms: Sequence[str]):
        super().__init__()
        self.cfg = cfg
        self.terms = tuple(terms)
        self.step = 0

    def base_weight(self, term: str) -> float:
        """The recipe weight of ``term`` at the current step."""
        return float(getattr(self.cfg.weights, term))

    def active(self, term: str) -> bool:
        """Whether ``term`` is computed at the current step (a zero weight is never computed)."""
        return term in self.terms and self.base_weight(term) != 0.0

    def ever_active(self, term: str) -> bool:
        """Whether ``term`` is computed at some step: what validation may log (``val/loss/<term>``)."""
        return self.active(term)

    def factor(self, term: str) -> Tensor | float:
        """What the strategy multiplies the base weight of ``term`` by."""
        return 1.0

    def combine(self, values: TermValues, present: TermValues | None = None, share: TermValues | None = None) -> Tensor:
        """Weighted sum of the (non-empty) terms ``{name: 0-dim}``.

        ``present[name]`` is false where a term had no valid element; such a term is 0 already,
        so only strategies with extra per-term parts (uncertainty) need it. ``share[name]`` (0-dim)
        is the micro-batch's pooling share the values were already multiplied by (None: a lone
        batch); likewise only for the extra parts, which the values do not carry.
        """
        weighted = [self.base_weight(k) * self.factor(k) * v for k, v in values.items()]
        return torch.stack(weighted).sum()

    def effective_weights(self, names: Sequence[str], device: torch.device) -> dict[str, Tensor]:
        """Detached fp32 0-dim weight actually applied to each term's loss."""
        out = {}
        for k in names:
            weight = self.base_weight(k) * self.factor(k)
            if isinstance(weight, Tensor):
                out[k] = weight.detach().float()
            else:  # torch.full runs a fill kernel; as_tensor(float) would be a blocking host-to-device copy
                out[k] = torch.full((), weight, dtype=torch.float32, device=device)
        return out

    def observe(self, values: dict[str, Tensor], present: dict[str, Tensor], new_step: bool) -> None:
        """Record one training micro-batch's detached terms (DWA); ``new_step`` = first of its step.

        Terms absent from ``values``, with ``present`` false, or non-finite are not counted.
        """

    def no_decay_parameters(self) -> list[nn.Parameter]:
        """Learned weighting parameters, for an optimizer group with weight_decay 0."""
        return []


class ScheduledWeighting(Weighting):
    """Recipe weights, with ``loss.schedule`` ramps replacing them for the terms named there."""

    def base_weight(self, term: str) -> float:
        spec = self.cfg.schedule.get(term)
        return super().base_weight(term) if spec is None else ramp_weight(spec, self.step)

    def ever_active(self, term: str) -> bool:
        return term in self.terms and ever_weighted(self.cfg, term)


class UncertaintyWeighting(Weighting):
    """Homoscedastic-uncertainty weighting with one learned log-variance per active term."""

    def __init__(self, cfg: LossConfig, terms: Sequence[str]):
        super().__init__(cfg, terms)
        learned = [t for t in self.terms if self.base_weight(t) != 0.0]
        self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in learned})

    def factor(self, term: str) -> Tensor:
        return KENDALL_SCALE[term] * torch.exp(-self.log_vars[term])

    def combine(self, values: TermValues, present: TermValues | None = None, share: TermValues | None = None) -> Tensor:
        """The regulariser ``s_k / 2`` is scaled by the term's pooling share like the data part:
        the step then counts it once (a micro-batch or rank without the term adds none of it and
        the others make up for it), as one batch of all the step's samples does."""
        weighted = []
        for name, value in values.items():
            s = self.log_vars[name]
            regulariser = 0.5 * s if share is None else 0.5 * s * share[name]
            term = self.base_weight(name) * (KENDALL_SCALE[name] * torch.exp(-s) * value + regulariser)
            # an empty term must not pull its variance down through the regulariser alone
            weighted.append(term if present is None else torch.where(present[name], term, 0.0))
        return torch.stack(weighted).sum()

    def no_decay_parameters(self) -> list[nn.Parameter]:
        return list(self.log_vars.values())


class DWAWeighting(Weighting):
    """Dynamic Weight Average over windows of ``loss.dwa_window`` optimizer steps.

    Buffers (all persistent, shape (K,) over the active terms unless noted):
      win_sum, win_count  sum and number of valid observations in the open window
      avg_last, avg_prev  averages of the last two closed windows (0 = never observed)
      lam                 current lambda
      win_steps ()        optimizer steps seen in the open window
      windows ()          closed windows
    Everything is updated with tensor ops only, so no host sync happens in forward.
    """

    def __init__(self, cfg: LossConfig, terms: Sequence[str]):
        super().__init__(cfg, terms)
        self.names = [t for t in self.terms if self.base_weight(t) != 0.0]
        k = len(self.names)
        for name in ("win_sum", "win_count", "avg_last", "avg_prev"):
            self.register_buffer(name, torch.zeros(k))
        self.register_buffer("lam", torch.ones(k))
        self.register_buffer("win_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("windows", torch.zeros((), dtype=torch.long))

    def factor(self, term: str) -> Tensor:
        return self.lam[self.names.index(term)]

    def observe(self, values: dict[str, Tensor], present: dict[str, Tensor], new_step: bool) -> None:
        if not self.names:
            return
        if new_step:
            self._roll()
        zero = self.win_sum.new_zeros(())
        loss = torch.stack([values.get(n, zero).detach().to(zero.dtype) for n in self.names])
        # a non-finite loss (a step the trainer will skip) must not poison the averages for good
        seen = torch.stack([present.get(n, zero.bool()) for n in self.names]) & torch.isfinite(loss)
        self.win_sum += torch.where(seen, loss, 0.0)
        self.win_count += seen

    @torch.no_grad()
    def _roll(self) -> None:
        """Start a new optimizer step; close the window first if it is full."""
        done = self.win_steps >= self.cfg.dwa_window
        # a term absent for a whole window carries its last average forward (ratio 1 next time)
        avg = torch.where(self.win_count > 0, self.win_sum / self.win_count.clamp(min=1), self.avg_last)
        self.avg_prev.copy_(torch.where(done, self.avg_last, self.avg_prev))
        self.avg_last.copy_(torch.where(done, avg, self.avg_last))
        self.windows += done
        self.win_sum.copy_(torch.where(done, 0.0, self.win_sum))
        self.win_count.copy_(torch.where(done, 0.0, self.win_count))
        self.win_steps.copy_(torch.where(done, 0, self.win_steps) + 1)
        self.lam.copy_(torch.where(self.windows >= 2, self._lambda(), self.lam))

    def _lambda(self) -> Tensor:
        """K' softmax(r / T) over the K' terms with a defined ratio; 1 for the others."""
        defined = (self.avg_prev > 0) & (self.avg_last > 0)
        ratio = self.avg_last / self.avg_prev.clamp(min=torch.finfo(self.avg_prev.dtype).tiny)
        logits = torch.where(defined, ratio / self.cfg.dwa_temperature, -torch.inf)
        lam = defined.sum() * torch.softmax(logits, dim=0)
        return torch.where(defined, lam, 1.0)


STRATEGIES: dict[str, type[Weighting]] = {
    "static": Weighting,
    "scheduled": ScheduledWeighting,
    "uncertainty": UncertaintyWeighting,
    "dwa": DWAWeighting,
}


def build_weighting(cfg: LossConfig, terms: Sequence[str]) -> Weighting:
    """The strategy named by ``cfg.strategy``; a RecipeError lists the valid names and weight problems."""
    problems = check_weights(cfg)
    if cfg.strategy not in STRATEGIES:
        problems.append(f"loss.strategy: unknown strategy '{cfg.strategy}'; valid: {', '.join(STRATEGIES)}")
    if problems:
        raise RecipeError(problems, "loss")
    return STRATEGIES[cfg.strategy](cfg, terms)
