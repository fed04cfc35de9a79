"""The ``metric/*`` values an optimizer step logs, pooled over its micro-batches and ranks.

A training metric is a ratio (right tokens / target tokens, right gripper steps / scored steps,
...). The loss gives each micro-batch's counts (``stat/<name>`` in its parts,
:data:`vla_ft.losses.METRIC_STATS`); the step sums them over its micro-batches and, with several
processes, over the ranks (one small all-reduce), and takes the ratios once
(:func:`vla_ft.losses.term_metrics`). So batch B x accumulation 2 (x W ranks) logs what one batch of
all the step's samples gives, as the losses (``vla_ft.train.term_shares``) and validation do: a
mean of micro-batch ratios weighs a micro-batch with 2 target tokens or 1 valid step as much as
one with 20.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vla_ft.losses import METRIC_STATS, term_metrics

STAT = "stat/"


def split_stats(parts: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A micro-batch's parts -> (what is averaged over micro-batches, its metric counts by name).
    Its own ``metric/*`` ratios are left out of both: the step's come from the pooled counts."""
    kept = {k: v for k, v in parts.items() if not k.startswith((STAT, "metric/"))}
    stats = {k.removeprefix(STAT): v for k, v in parts.items() if k.startswith(STAT)}
    return kept, stats


def pooled_metrics(
    terms: list[str],
    stats: list[dict[str, torch.Tensor]],
    all_sum: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The step's ``metric/*`` of ``terms`` (those it computes: the same list on every rank) from each
    micro-batch's counts (``stats``, :func:`split_stats`), summed over the ranks by ``all_sum``
    (identity in one process). A micro-batch that computed no term (no language output: no
    narrated frame) adds zeros; a step where none did gets NaN, left out of the logged mean.
    Returns 0-dim tensors, without a host sync.
    """
    names = [n for t in terms if t in METRIC_STATS for n in METRIC_STATS[t]]
    if not names:
        return {}
    zero = torch.zeros((), device=device)
    table = torch.stack([torch.stack([s[n].float() if n in s else zero for n in names]) for s in stats])  # (n, k)
    sums = dict(zip(names, all_sum(table.sum(0)), strict=True))
    out: dict[str, torch.Tensor] = {}
    for t in terms:
        if t in METRIC_STATS:
            out.update(term_metrics(t, {n: sums[n] for n in METRIC_STATS[t]}))
    return out


def metric_terms(model_wants_language: bool, loss_fn) -> list[str]:
    """The terms with metrics a training step computes, from the recipe and the step alone (every
    rank gets the same list, whatever its batches hold)."""
    terms = ["language"] if model_wants_language else []
    return terms + (["gripper"] if loss_fn.wants("gripper") else [])  # wants: needs the gripper head
