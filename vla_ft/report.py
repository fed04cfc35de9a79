"""The parameter report: per named module, what will train and how.

Printed by ``vla-ft inspect`` and written to ``<run>/parameters.txt`` before the first step,
so a freeze that did not happen is visible before any compute is spent.
"""

from __future__ import annotations

import torch
from torch import nn

from vla_ft.master_weights import optimized
from vla_ft.quantize import dtype_name, weight_count


def parameter_rows(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> list[dict]:
    """One row per named module: params, trainable, lr, weight decay, dtype, mode."""
    group_of = {}
    if optimizer is not None:
        for g in optimizer.param_groups:
            for p in g["params"]:
                group_of[id(p)] = g
    rows = []
    for name, module in model.named_modules_of_interest().items():
        params = list(module.parameters())
        trainable = [p for p in params if p.requires_grad]
        groups = [g for g in (group_of.get(id(optimized(model, p))) for p in params) if g is not None]
        lrs = sorted({g["base_lr"] for g in groups})
        wds = sorted({g["weight_decay"] for g in groups})
        starts = sorted({g["start_step"] for g in groups if g["start_step"] > 0})
        if name in getattr(model, "lora_modules", ()):
            mode = "lora"
        elif trainable:
            mode = "full"
        else:
            mode = f"frozen->step {starts[0]}" if starts else "frozen"
        rows.append(
            {
                "module": name,
                "params": sum(weight_count(p) for p in params),
                "trainable": sum(p.numel() for p in trainable),
                "lr": ",".join(f"{v:g}" for v in lrs) or "-",
                "weight_decay": ",".join(f"{v:g}" for v in wds) or "-",
                "dtype": ",".join(sorted({dtype_name(p) for p in params})),
                "mode": mode,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    cols = ["module", "params", "trainable", "lr", "weight_decay", "dtype", "mode"]
    cells = [[f"{r[c]:,}" if isinstance(r[c], int) else str(r[c]) for c in cols] for r in rows]
    total = sum(r["params"] for r in rows)
    train = sum(r["trainable"] for r in rows)
    cells.append(["total", f"{total:,}", f"{train:,}", "", "", "", f"{100 * train / max(total, 1):.1f}% trainable"])
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))
    body = [
        "  ".join(v.rjust(w) if v[:1].isdigit() else v.ljust(w) for v, w in zip(row, widths, strict=True))
        for row in cells
    ]
    return "\n".join([line, "-" * len(line), *body])


def inspect_recipe(recipe) -> str:
    """Build the recipe's model and optimizer groups on the CPU and return the report table."""
    from vla_ft import optim
    from vla_ft.run_setup import build_components

    model, _, optimizer, _ = build_components(recipe, torch.device("cpu"))
    model.set_frozen(optim.frozen_at(recipe, model, 0))
    return format_table(parameter_rows(model, optimizer))
