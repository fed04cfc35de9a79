"""Named parameter groups, the optimizer, the LR schedule and the freeze/unfreeze plan.

Every module that trains at some point in the run (now, or after a staged unfreeze) gets
its group(s) at the start: ``<module>`` (weight decay) and ``<module>/no_decay`` (biases,
norms, embeddings, tokens). A module waiting to be unfrozen has ``requires_grad=False`` and
LR 0 until its step: its parameters have no gradient, so the optimizer leaves them (and
allocates no state for them) until then. Unfreezing therefore flips ``requires_grad`` and
never rebuilds the other groups' optimizer state, and a resumed run builds the very same
groups.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from vla_ft.config import MODULE_NAMES, Recipe


@dataclass
class GroupSpec:
    name: str
    module: str
    lr: float
    weight_decay: float
    start_step: int = 0  # 0 for modules trained from the start
    warmup_steps: int = 0


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # Biases and norm scales are 1-D; embeddings, position embeddings, cls/register tokens
    # and action queries are lookup tables whose rows should not shrink towards zero.
    lowered = name.lower()
    return p.ndim < 2 or any(k in lowered for k in ("norm", "embed", "token", "action_queries", "wte", "wpe"))


def trained_modules(recipe: Recipe, model: nn.Module) -> dict[str, int]:
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


def build_param_groups(recipe: Recipe, model: nn.Module, extra_no_decay: list[torch.Tensor] = ()) -> list[dict]:
    """Optimizer param groups, named, with ``base_lr``, ``start_step`` and ``warmup_steps``.

    ``extra_no_decay`` (e.g. the loss's learned log-variances) forms the ``loss_weights`` group.
    Raises if any trainable-at-some-point parameter lands in zero or two groups.
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
        decay, no_decay = [], []
        lora_only = name in getattr(model, "lora_modules", ())
        for pname, p in modules[name].named_parameters():
            if lora_only and "lora_" not in pname:
                continue
            (no_decay if _no_decay(pname, p) else decay).append(p)
        for suffix, params, group_wd in (("", decay, wd), ("/no_decay", no_decay, 0.0)):
            if params:
                groups.append({"params": params, "name": name + suffix, "module": name, "base_lr": lr,
                               "lr": 0.0, "weight_decay": group_wd, "start_step": start, "warmup_steps": warmup})
    if extra_no_decay:
        groups.append({"params": list(extra_no_decay), "name": "loss_weights", "module": "loss", "base_lr": o.lr,
                       "lr": 0.0, "weight_decay": 0.0, "start_step": 0, "warmup_steps": o.warmup_steps})
    _assert_partition(groups)
    return groups


def _assert_partition(groups: list[dict]) -> None:
    seen: dict[int, str] = {}
    for g in groups:
        for p in g["params"]:
            if id(p) in seen:
                raise AssertionError(f"parameter in two groups: {seen[id(p)]} and {g['name']}")
            seen[id(p)] = g["name"]


def build_optimizer(recipe: Recipe, groups: list[dict], device: torch.device) -> torch.optim.Optimizer:
    """AdamW (fused on CUDA), Adam or SGD by name."""
    o = recipe.optim
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    fused = device.type == "cuda"
    return cls(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)


def lr_factor(recipe: Recipe, step: int, start_step: int, warmup_steps: int) -> float:
    """Multiplier of a group's base LR at optimizer step ``step`` (0-based).

    0 before the group's start; linear warmup over its own ``warmup_steps`` from its start;
    then the run's global decay (cosine / linear / constant down to ``min_lr_ratio``).
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
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * lr_factor(recipe, step, g["start_step"], g["warmup_steps"])


def group_lrs(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    return {f"lr/{g['name']}": g["lr"] for g in optimizer.param_groups if not g["name"].endswith("/no_decay")}


def frozen_at(recipe: Recipe, model: nn.Module, step: int) -> set[str]:
    """Modules frozen at ``step`` under the freeze + unfreeze plan."""
    starts = trained_modules(recipe, model)
    return {n for n in model.named_modules_of_interest() if n not in starts or starts[n] > step}
