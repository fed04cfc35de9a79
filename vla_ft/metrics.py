"""Action metrics in the dataset's real units, accumulated over validation batches.

Used by validation during training and by ``vla-ft eval``. Predictions are de-normalised
with the run's statistics; with a gripper head the gripper dims are predicted as the
dataset's open/closed values (min/max of that dim), which is what a robot would receive.
Also reported: the L1 of the *mean-action baseline* (always predicting the training mean),
so "is it learning?" has an answer on the same line. Delta action dims
(``data.delta_action_dims``) are compared as offsets from the frame's state: the same errors as
absolute actions (both sides shift by that state), and their baseline is the state plus the mean
offset, a stronger one than the mean absolute action.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable

import torch

from robot_data import MixtureReader
from vla_ft.config import GripperLossConfig, Recipe
from vla_ft.loss_weighting import build_weighting
from vla_ft.losses import gripper_labels, loss_terms, regressed_dims

INDEXED = re.compile(r"(/[a-z]+)(\d+)$")  # per-index names: .../dim3 (action dim), .../h0 (chunk step)


def real_actions(
    outputs: dict[str, torch.Tensor],
    normalizer,
    gripper_dims: list[int],
    closed_is_high: bool,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """Model outputs -> actions in the dataset's units, (B, C, A) float32 on the CPU.

    ``outputs["actions"]`` (B, C, A) is de-normalised; with ``outputs["gripper_logits"]`` (B, C, G),
    gripper dim ``gripper_dims[j]`` becomes the dataset's closed value where logit j > 0, else its
    open value (the max / min of that dim; swapped when ``closed_is_high`` is false): what a robot
    is sent. A NaN logit stays NaN (``> 0`` would read it as open). ``source`` (B,): each row's
    statistics, with per-source ones (``batch["source"]``). Shared by validation metrics and
    :class:`vla_ft.policy.VLAPolicy`.
    """
    source = None if source is None else source.cpu()
    pred = normalizer.unnormalize("action", outputs["actions"].detach().float().cpu(), source)
    if gripper_dims and "gripper_logits" in outputs:
        logits = outputs["gripper_logits"].detach().float().cpu()
        lows, highs = (torch.as_tensor(normalizer.stat("action", s, source)) for s in ("min", "max"))
        for j, dim in enumerate(gripper_dims):
            lo, hi = lows[..., dim, None], highs[..., dim, None]  # () or (B, 1): per row, over the chunk
            closed_value, open_value = (hi, lo) if closed_is_high else (lo, hi)
            value = torch.where(logits[..., j] > 0, closed_value, open_value)
            pred[..., dim] = value.masked_fill(logits[..., j].isnan(), math.nan)
    return pred


class ActionMetrics:
    """Accumulates sums over batches; :meth:`compute` returns ``{name: float}``."""

    def __init__(
        self,
        normalizer,
        action_dim: int,
        chunk: int,
        gripper_dims: list[int],
        gripper_cfg: GripperLossConfig,
        gripper_head: bool,
    ):
        self.norm, self.gripper_dims, self.gcfg, self.gripper_head = (
            normalizer,
            list(gripper_dims),
            gripper_cfg,
            gripper_head,
        )
        self.reg_dims = regressed_dims(action_dim, self.gripper_dims, gripper_head)
        self.abs = torch.zeros(action_dim, dtype=torch.float64)
        self.sq = torch.zeros(action_dim, dtype=torch.float64)
        self.base_abs = torch.zeros(action_dim, dtype=torch.float64)
        self.by_horizon = torch.zeros(chunk, dtype=torch.float64)
        self.count_h = torch.zeros(chunk, dtype=torch.float64)
        self.count = 0.0
        self.g_tp = self.g_fp = self.g_fn = self.g_correct = self.g_total = 0.0
        self.g_scored = 0.0  # valid gripper steps with a prediction (not NaN)
        self.t_correct = self.t_total = 0.0
        self.tok_correct = self.tok_total = 0.0
        self.tok_nll = 0.0  # summed cross-entropy (no label smoothing) of the supervised tokens

    def real(self, key: str, x: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """Batch rows (B, ..., D) of ``key`` ("state", "action") in dataset units, float64 on the CPU;
        ``source`` (B,) is ``batch["source"]``."""
        return self.norm.unnormalize(key, x.detach().float().cpu(), source.cpu()).double()

    def predicted_real(self, outputs: dict[str, torch.Tensor], source: torch.Tensor) -> torch.Tensor:
        """Predicted actions in real units (B, C, A), gripper dims as open/closed values."""
        dims = self.gripper_dims if self.gripper_head else []
        return real_actions(outputs, self.norm, dims, self.gcfg.closed_is_high, source).double()

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        source = batch["source"].cpu()
        pred, true = self.predicted_real(outputs, source), self.real("action", batch["actions"], source)
        mask = batch["action_mask"].cpu().double()  # (B, C)
        err = (pred - true).abs()
        mean = torch.as_tensor(self.norm.stat("action", "mean", source), dtype=torch.float64)  # (A,) or (B, A)
        mean = mean[:, None] if mean.ndim == 2 else mean
        self.abs += (err * mask[..., None]).sum((0, 1))
        self.sq += (err.square() * mask[..., None]).sum((0, 1))
        self.base_abs += ((mean - true).abs() * mask[..., None]).sum((0, 1))
        self.by_horizon += (err[..., self.reg_dims].mean(-1) * mask).sum(0)
        self.count_h += mask.sum(0)
        self.count += float(mask.sum())
        if self.gripper_dims:
            self._update_gripper(pred, true, mask.bool())
        if "lm_logits" in outputs and outputs["lm_logits"].numel():
            logits = outputs["lm_logits"].detach()  # (N, V) stays on its device: only sums come back
            labels = outputs["lm_labels"].to(logits.device)
            valid = labels != -100
            hit = (logits.argmax(-1) == labels) & valid
            self.tok_correct += float(hit.sum())
            self.tok_total += float(valid.sum())
            nll = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
            self.tok_nll += float(nll)

    def _update_gripper(self, pred: torch.Tensor, true: torch.Tensor, mask: torch.Tensor) -> None:
        """Gripper counts over valid steps. A NaN prediction (a NaN logit, :func:`real_actions`) is
        neither open nor closed: it is counted in ``gripper_nan`` and left out of accuracy, F1 and
        transition accuracy (``NaN > threshold`` would have scored it as one of the two)."""
        g = self.gcfg
        raw = pred[..., self.gripper_dims]
        p = gripper_labels(raw, g.threshold, g.closed_is_high)
        t = gripper_labels(true[..., self.gripper_dims], g.threshold, g.closed_is_high)
        m = mask[..., None].expand_as(t)
        scored = m & ~raw.isnan()
        self.g_tp += float((p & t & scored).sum())
        self.g_fp += float((p & ~t & scored).sum())
        self.g_fn += float((~p & t & scored).sum())
        self.g_correct += float(((p == t) & scored).sum())
        self.g_total += float(m.sum())
        self.g_scored += float(scored.sum())
        trans = (t[:, 1:] != t[:, :-1]) & m[:, 1:] & m[:, :-1]  # label changes inside the chunk
        self.t_correct += float(((p[:, 1:] == t[:, 1:]) & trans & scored[:, 1:]).sum())
        self.t_total += float((trans & scored[:, 1:]).sum())

    def compute(self, prefix: str = "val/") -> dict[str, float]:
        n = self.count if self.count > 0 else math.nan  # no valid step seen: undefined, never 0
        reg = self.reg_dims
        out = {
            f"{prefix}action_l1": float(self.abs[reg].sum() / (n * len(reg))),
            f"{prefix}action_mse": float(self.sq[reg].sum() / (n * len(reg))),
            f"{prefix}baseline_l1": float(self.base_abs[reg].sum() / (n * len(reg))),
        }
        for i in range(len(self.abs)):
            out[f"{prefix}action_l1/dim{i}"] = float(self.abs[i] / n)
            out[f"{prefix}action_mse/dim{i}"] = float(self.sq[i] / n)
        for t in range(len(self.by_horizon)):
            out[f"{prefix}action_l1/h{t}"] = float(self.by_horizon[t] / (float(self.count_h[t]) or math.nan))
        if self.g_total:  # valid gripper steps seen: the names are logged, NaN where nothing was scored
            scored = self.g_scored or math.nan
            out[f"{prefix}gripper_acc"] = self.g_correct / scored
            denom = 2 * self.g_tp + self.g_fp + self.g_fn
            out[f"{prefix}gripper_f1"] = 2 * self.g_tp / denom if denom else (1.0 if self.g_scored else math.nan)
            out[f"{prefix}gripper_transition_acc"] = self.t_correct / self.t_total if self.t_total else math.nan
            out[f"{prefix}gripper_nan"] = self.g_total - self.g_scored
        if self.tok_total:
            out[f"{prefix}token_acc"] = self.tok_correct / self.tok_total
            # exp of the mean NLL per supervised token (every token weighs the same, whatever its
            # batch); without label smoothing, unlike val/loss/language, so it is a true perplexity
            out[f"{prefix}perplexity"] = math.exp(self.tok_nll / self.tok_total)
        return out


SOURCE_METRICS = ("action_l1", "action_mse", "baseline_l1", "gripper_acc", "gripper_f1")
"""The headline metrics logged per source of a dataset mixture, as ``<prefix>mix/<source>/<name>``."""


class SourceMetrics:
    """:class:`ActionMetrics` per source of a dataset mixture (a LIBERO suite's tasks, the datasets
    of ``data.mix``): one mean over every source hides the task a policy fails. Each sample goes to
    its source by ``batch["episode_index"]``; ``owner`` maps episode id -> source name."""

    def __init__(self, owner: dict[int, str], make: Callable[[], ActionMetrics]):
        self.owner = owner
        self.metrics = {name: make() for name in dict.fromkeys(owner.values())}

    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> None:
        names = [self.owner[int(e)] for e in batch["episode_index"].tolist()]
        size = len(names)
        for name in dict.fromkeys(names):
            rows = torch.tensor([i for i, n in enumerate(names) if n == name])
            pick = {  # per-sample tensors; the LM's logits sit at supervised positions of the whole batch
                key: value[rows.to(value.device)]
                for key, value in outputs.items()
                if not key.startswith("lm_") and value.ndim and len(value) == size
            }
            self.metrics[name].update(
                pick, {k: batch[k][rows.to(batch[k].device)] for k in ("actions", "action_mask", "source")}
            )

    def compute(self, prefix: str = "val/") -> dict[str, float]:
        out = {}
        for name, metrics in self.metrics.items():
            values = metrics.compute("")
            out.update({f"{prefix}mix/{name}/{k}": values[k] for k in SOURCE_METRICS if k in values})
        return out


def source_metrics(reader, episodes: list[int], make: Callable[[], ActionMetrics]) -> SourceMetrics | None:
    """Per-source metrics over ``episodes`` when ``reader`` is a mixture, else None."""
    if not isinstance(reader, MixtureReader):
        return None
    return SourceMetrics({e: reader.source_name(e) for e in episodes}, make)


def mixture_sources(recipe: Recipe) -> list[str]:
    """The source names a recipe's data is read as: ``data.mix``'s, or the files of a robomimic
    directory (a LIBERO suite's tasks, by file stem); none for one dataset."""
    from robot_data.mixture import robomimic_files
    from robot_data.reader import DatasetFormatError
    from robot_data.registry import is_robomimic_dir

    d = recipe.data
    if d.mix:
        return list(d.mix)
    if d.path is None or not is_robomimic_dir(d.format, {"path": d.path, "layout": d.layout}):
        return []
    try:
        return [f.stem for f in robomimic_files(d.path)]
    except DatasetFormatError:  # no files: reading the data says so
        return []


def trains_language(recipe: Recipe) -> bool:
    """Whether the run trains the LM on language targets at some step (a weight of 0 never does):
    only then do validation and ``vla-ft eval`` report token accuracy and perplexity."""
    weighting = build_weighting(recipe.loss, loss_terms(recipe.model.gripper_head))
    return recipe.data.language_target != "none" and weighting.ever_active("language")


def validation_names(
    recipe: Recipe, action_dim: int, gripper_head: bool | None = None, language: bool | None = None
) -> list[str]:
    """Every name validation (:func:`vla_ft.train.evaluate`) can log for ``recipe`` on ``action_dim`` dims.

    ``val/loss/<term>`` for each term the loss computes at some step, then the names
    :meth:`ActionMetrics.compute` returns once a batch has fed its gripper and token counts:
    the names come from the code that produces them, so they cannot drift from it.
    ``gripper_head`` / ``language`` (LM target and loss) force a part on, to tell a typo from a part left out.
    """
    r = recipe
    head = r.model.gripper_head if gripper_head is None else gripper_head
    weighting = build_weighting(r.loss, loss_terms(head))
    if language is None:
        language = trains_language(r)  # else no LM logits
    terms = [t for t in weighting.terms if (language if t == "language" else weighting.ever_active(t))]
    gripper = r.loss.gripper.dims if head else []
    metrics = ActionMetrics(None, action_dim, r.data.chunk, gripper, r.loss.gripper, head)
    metrics.g_total, metrics.tok_total = float(head), float(language)
    values = metrics.compute("")
    per_source = [f"val/mix/{name}/{k}" for name in mixture_sources(r) for k in SOURCE_METRICS if k in values]
    rollout = ["val/rollout/success_rate", "val/rollout/mean_reward"] if r.rollout.episodes else []
    return [f"val/loss/{t}" for t in terms] + [f"val/{k}" for k in values] + per_source + rollout


def _left_out(recipe: Recipe, key: str, action_dim: int) -> str | None:
    """The setting without which validation never logs ``key``, or None: 'val/gripper_acc' without a
    gripper head is no typo, and the closest name ('val/token_acc') would send the user astray."""
    if key in validation_names(recipe, action_dim, gripper_head=True):
        return "model.gripper_head: true"
    if key in validation_names(recipe, action_dim, language=True):
        if recipe.data.language_target == "none":
            return "data.language_target: text or action_tokens"
        return "loss.weights.language > 0 (or a loss.schedule.language ramp)"
    if key in ("val/rollout/success_rate", "val/rollout/mean_reward"):
        return "rollout.episodes > 0"
    return None


def best_metric_problems(recipe: Recipe, action_dim: int | None = None) -> list[str]:
    """``train.best_metric`` must be a name validation logs: a typo would otherwise stop the run at
    its first validation. Before the data is read (``action_dim`` None) any action dim index passes."""
    key = recipe.train.best_metric
    if action_dim is None:
        index = INDEXED.search(key)
        action_dim = int(index.group(2)) + 1 if index else 1
    names = validation_names(recipe, action_dim)
    if key in names:
        return direction_problems(key, recipe.train.best_mode)
    needs = _left_out(recipe, key, action_dim)
    if needs:
        return [f"train.best_metric: '{key}' is logged only with {needs}"]
    kinds = dict.fromkeys(INDEXED.sub(r"\1<i>", n) for n in names)
    hint = _closest(recipe, key, action_dim, names)
    return [
        f"train.best_metric: '{key}' is not a validation metric of this recipe{hint}; "
        f"validation metrics: {', '.join(kinds)} (<i>: an action dim or chunk step)"
    ]


HIGHER_IS_BETTER = ("_acc", "_f1", "/success_rate", "/mean_reward")
"""Suffixes of the validation metrics where higher is better; every other one is a loss or an error."""


def direction_problems(
    key: str, mode: str, keys: tuple[str, str] = ("train.best_metric", "train.best_mode")
) -> list[str]:
    """A best_mode against the metric's direction would keep the worst checkpoint as best and stop
    early while the metric still improves (an ablation would crown its worst variant); the
    baseline's error is the same at every validation. ``keys``: the recipe's (metric, mode) keys."""
    metric, mode_key = keys
    if key.endswith("/baseline_l1"):
        return [f"{metric}: '{key}' is the mean-action baseline's error, which training does not change"]
    want = "max" if key.endswith(HIGHER_IS_BETTER) else "min"
    if mode == want:
        return []
    better = "higher" if want == "max" else "lower"
    return [f"{mode_key}: {mode}, but {better} is better for '{key}': set {mode_key}: {want}"]


def _closest(recipe: Recipe, key: str, action_dim: int, names: list[str]) -> str:
    """The did-you-mean hint, drawn from every name some recipe logs: a typo of a gripper metric
    with the head off points at that metric and the switch, not at a lookalike this recipe logs."""
    every = validation_names(recipe, action_dim, gripper_head=True, language=True)
    close = difflib.get_close_matches(key, every, n=1, cutoff=0.5)
    if not close:
        return ""
    needs = _left_out(recipe, close[0], action_dim) if close[0] not in names else None
    return f" (did you mean '{close[0]}'?{f' It is logged only with {needs}' if needs else ''})"
