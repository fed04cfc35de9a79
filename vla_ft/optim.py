"""Named parameter groups, the optimizer, the LR schedule and the freeze/unfreeze plan.

Every module that trains at some point in the run (now, or after a staged unfreeze) gets
its group(s) at the start: ``<module>`` (weight decay) and ``<module>/no_decay`` (biases,
norms, embeddings, tokens). A module waiting to be unfrozen has ``requires_grad=False`` and
LR 0 until its step: its parameters have no gradient, so the optimizer leaves them (and
allocates no state for them) until then. Unfreezing therefore flips ``requires_grad`` and
never rebuilds the other groups' optimizer state, and a resumed run builds the very same
groups.

Schedule: the LR of update ``s`` (0-based count of updates applied before it) is
``base_lr * lr_factor(s)``; the trainer sets it right before each update, so the LR logged
at step ``s + 1`` is the one that update used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from vla_ft import master_adamw
from vla_ft.config import MODULE_NAMES, Recipe, RecipeError
from vla_ft.master_weights import MasterWeights, optimized

if TYPE_CHECKING:
    from vla_ft.model import VLA

# Parameters that are lookup tables rather than maps: their rows should not shrink to 0.
TABLE_LEAVES = ("token", "pos_embed", "position_embedding")


def no_decay_ids(name: str, module: nn.Module) -> set[int]:
    """ids of ``module``'s parameters that get weight decay 0 (nanoGPT's rule, made explicit):
    biases and norm scales (ndim < 2), weights of embedding and norm layers (a tied LM head
    shares the embedding's), positional embeddings and cls/register tokens, and the action
    query table."""
    out: set[int] = set()
    for sub in module.modules():
        kind = type(sub).__name__.lower()
        table_module = isinstance(sub, nn.Embedding) or "embedding" in kind or "norm" in kind
        for leaf, p in sub.named_parameters(recurse=False):
            if p.ndim < 2 or table_module or name == "action_queries" or any(t in leaf for t in TABLE_LEAVES):
                out.add(id(p))
    return out


def trained_modules(recipe: Recipe, model: VLA) -> dict[str, int]:
    """Module name -> step at which it starts training (absent = frozen for the whole run)."""
    present = model.named_modules_of_interest()
    out = {}
    for name in MODULE_NAMES:
        if name not in present:
            continue
        if name in recipe.unfreeze:
            out[name] = recipe.unfreeze[name].at_step
        elif not getattr(recipe.freeze, name) or name in getattr(model, "lora_modules", ()):
            out[name] = 0
    return out


def build_param_groups(recipe: Recipe, model: VLA, extra_no_decay: Sequence[torch.Tensor] = ()) -> list[dict]:
    """Optimizer param groups, named, with ``base_lr``, ``start_step`` and ``warmup_steps``.

    ``extra_no_decay`` (e.g. the loss's learned log-variances) forms the ``loss_weights`` group.
    Raises if a parameter lands in two groups.
    """
    o = recipe.optim
    groups: list[dict] = []
    modules = model.named_modules_of_interest()
    for name, start in trained_modules(recipe, model).items():
        override = o.groups.get(name)
        lr = override.lr if override and override.lr is not None else o.lr
        wd = override.weight_decay if override and override.weight_decay is not None else o.weight_decay
        spec = recipe.unfreeze.get(name)
        warmup = spec.warmup_steps if spec else o.warmup_steps
        skip_decay = no_decay_ids(name, modules[name])
        lora_only = name in getattr(model, "lora_modules", ())
        decay, no_decay = [], []
        for pname, p in modules[name].named_parameters():
            if lora_only and "lora_" not in pname:
                continue  # LoRA: the base weights never train
            (no_decay if id(p) in skip_decay else decay).append(p)
        for suffix, params, group_wd in (("", decay, wd), ("/no_decay", no_decay, 0.0)):
            if params:
                groups.append(
                    {
                        "params": params,
                        "name": name + suffix,
                        "module": name,
                        "base_lr": lr,
                        "lr": 0.0,
                        "weight_decay": group_wd,
                        "start_step": start,
                        "warmup_steps": warmup,
                    }
                )
    if extra_no_decay:
        groups.append(
            {
                "params": list(extra_no_decay),
                "name": "loss_weights",
                "module": "loss_weights",
                "base_lr": o.lr,
                "lr": 0.0,
                "weight_decay": 0.0,
                "start_step": 0,
                "warmup_steps": o.warmup_steps,
            }
        )
    _assert_disjoint(groups)
    return groups


def _assert_disjoint(groups: list[dict]) -> None:
    seen: dict[int, str] = {}
    for g in groups:
        for p in g["params"]:
            if id(p) in seen:
                raise AssertionError(f"parameter in two optimizer groups: {seen[id(p)]} and {g['name']}")
            seen[id(p)] = g["name"]


def check_trainable_covered(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every parameter that currently requires grad is in exactly one optimizer group.

    Checked at setup and after each unfreeze: a trainable parameter outside every group
    would get gradients and never move, silently.
    """
    count: dict[int, int] = {}
    for g in optimizer.param_groups:
        for p in g["params"]:
            count[id(p)] = count.get(id(p), 0) + 1
    counts = ((n, count.get(id(optimized(model, p)), 0)) for n, p in model.named_parameters() if p.requires_grad)
    bad = [(n, c) for n, c in counts if c != 1]
    if bad:
        shown = ", ".join(f"{n} (in {c} groups)" for n, c in bad[:8])
        raise AssertionError(f"trainable parameters not in exactly one optimizer group: {shown}")


def make_optimizer(
    recipe: Recipe,
    model: VLA,
    extra_no_decay: Sequence[torch.Tensor],
    device: torch.device,
    param_dtype: torch.dtype | None = None,
) -> torch.optim.Optimizer:
    """The recipe's optimizer over :func:`build_param_groups`. With ``param_dtype`` (bf16) the
    model's weights become bf16 and the optimizer updates fp32 masters of the ones that train
    (:mod:`vla_ft.master_weights`); on a GPU, AdamW then reads the bf16 gradients and writes the
    bf16 weights in its own pass (:mod:`vla_ft.master_adamw`)."""
    groups = build_param_groups(recipe, model, extra_no_decay)
    if not groups:
        raise RecipeError("freeze: every module is frozen and nothing would train")
    if param_dtype is not None:
        own = {id(p) for p in model.parameters()}  # not the loss's own parameters (loss_weights)
        trained = [p for g in groups for p in g["params"] if id(p) in own]
        model.master_weights = MasterWeights(model, trained, param_dtype)
        groups = model.master_weights.param_groups(groups)
    masters = model.master_weights
    if masters is not None and recipe.optim.name == "adamw" and master_adamw.available(device):
        o = recipe.optim
        optimizer = master_adamw.MasterAdamW(groups, masters.weight_of, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    else:
        optimizer = build_optimizer(recipe, groups, device)
    if masters is not None:
        masters.attach(optimizer)
    return optimizer


def build_optimizer(recipe: Recipe, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """AdamW or Adam (fused: one kernel per step, and a device-side skip, see ``train.queue_update``),
    bitsandbytes' AdamW with 8-bit moments (the plain step path: host check, then the update), or SGD."""
    o = recipe.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    if o.name == "adamw8bit":
        from vla_ft.quantize import bitsandbytes

        return bitsandbytes("optim.name: adamw8bit").optim.AdamW8bit(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=True)


def lr_factor(recipe: Recipe, step: int, start_step: int, warmup_steps: int) -> float:
    """Multiplier of a group's base LR for update ``step`` (0-based).

    0 before the group's start; linear warmup over its own ``warmup_steps`` from its start
    (``(step - start + 1) / warmup``); times the run's global decay after the global warmup:
    ``min_lr_ratio + (1 - min_lr_ratio) * shape(p)``, ``p = (step - warmup) / (steps - warmup)``,
    shape ``(1 + cos(pi p)) / 2`` (cosine), ``1 - p`` (linear) or 1 (constant).
    """
    o = recipe.optim
    if step < start_step:
        return 0.0
    warm = min(1.0, (step - start_step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if o.scheduler == "constant":
        return warm
    begin = o.warmup_steps
    progress = min(1.0, max(0.0, (step - begin) / max(1, recipe.train.steps - begin)))
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if o.scheduler == "cosine" else 1 - progress
    return warm * (o.min_lr_ratio + (1 - o.min_lr_ratio) * shape)


def set_lr(recipe: Recipe, optimizer: torch.optim.Optimizer, step: int) -> None:
    """Set every group's LR for update ``step`` (0-based)."""
    for g in optimizer.param_groups:
        g["lr"] = _lr(recipe, g, step)


def _lr(recipe: Recipe, group: dict, step: int) -> float:
    return group["base_lr"] * lr_factor(recipe, step, group["start_step"], group["warmup_steps"])


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """``lr/<module>`` for every module with a group (a module's two twins share one LR), as set."""
    return {f"lr/{g['module']}": g["lr"] for g in optimizer.param_groups}


def lrs_at(recipe: Recipe, optimizer: torch.optim.Optimizer, step: int) -> dict[str, float]:
    """:func:`group_lrs` of update ``step`` (0-based), whatever is set now."""
    return {f"lr/{g['module']}": _lr(recipe, g, step) for g in optimizer.param_groups}


def frozen_at(recipe: Recipe, model: VLA, step: int) -> set[str]:
    """Modules frozen for update ``step`` (0-based) under the freeze + unfreeze plan."""
    starts = trained_modules(recipe, model)
    return {n for n in model.named_modules_of_interest() if n not in starts or starts[n] > step}
