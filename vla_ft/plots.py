"""PNG plots: a run's loss and metric curves (``vla-ft plot RUN_DIR``), ablation comparisons, and
predicted vs true action trajectories (``vla-ft eval``).

Plots are built from plain data first (:class:`Panel`: a title and named ``(steps, values)``
series), then drawn with matplotlib's Agg backend (no display needed). Every ``plot_*`` function
returns the figure it saved, so callers and tests can inspect its axes and lines.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

Series = tuple[list[float], list[float]]  # (x, y)
# Per-dimension and per-horizon metrics (.../dim3, .../h0): in `vla-ft eval`, not in curves. Anchored at the
# end, so a mixture source named hammer or dimsum (val/mix/hammer/action_l1) keeps its curve.
BREAKDOWN = re.compile(r"/(dim|h)\d+$")


@dataclass
class Panel:
    title: str
    series: dict[str, Series] = field(default_factory=dict)
    ylabel: str = ""


def _figure(n_panels: int, cols: int = 3, size: tuple[float, float] = (4.8, 3.2)) -> tuple[Figure, list[Any]]:
    # Agg is chosen per figure (no pyplot state): works headless and inside other programs' backends.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = max(1, min(cols, n_panels))
    rows = max(1, math.ceil(n_panels / cols))
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes[:n_panels]


def draw_panels(panels: list[Panel], path: Path, title: str = "", xlabel: str = "step") -> Figure:
    """One subplot per panel, one line per series (markers when a series has few points)."""
    fig, axes = _figure(len(panels))
    for ax, panel in zip(axes, panels, strict=True):
        for label, (x, y) in panel.series.items():
            ax.plot(x, y, label=label, marker="o" if len(x) <= 20 else None, markersize=3)
        ax.set_title(panel.title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.grid(alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    _save(fig, path)
    return fig


def _save(fig: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


# ----------------------------------------------------------------------------- run curves
def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir} (is it a run directory?)")
    from vla_ft.tracking import read_rows

    return read_rows(path)


def _series(rows: list[dict[str, float]], key: str) -> Series:
    pairs = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [float(s) for s, _ in pairs], [float(v) for _, v in pairs]


def loss_panels(rows: list[dict[str, float]]) -> list[Panel]:
    """One panel per loss term (``loss``, ``loss/<term>``): the train curve and, when logged, ``val/loss/<term>``."""
    keys = sorted({k for r in rows for k in r if k == "loss" or k.startswith("loss/")})
    panels = []
    for key in keys:
        panel = Panel(key if key != "loss" else "loss (weighted total)", {"train": _series(rows, key)}, "loss")
        val = _series(rows, f"val/{key}")
        if val[0]:
            panel.series["val"] = val
        panels.append(panel)
    return panels


def metric_panels(rows: list[dict[str, float]]) -> list[Panel]:
    """Train ``metric/<m>`` next to ``val/<m>``; validation-only metrics on their own; the
    mean-action baseline drawn in the action-L1 panel. Per-dim/per-horizon breakdowns are left out."""
    keys = {k for r in rows for k in r}
    train = sorted(k[len("metric/") :] for k in keys if k.startswith("metric/"))
    val = sorted(k[len("val/") :] for k in keys if k.startswith("val/") and not k.startswith("val/loss/"))
    val = [k for k in val if not BREAKDOWN.search(k) and k != "baseline_l1"]
    panels = []
    for name in [*train, *(k for k in val if k not in train)]:
        panel = Panel(name, ylabel=name)
        if name in train:
            panel.series["train"] = _series(rows, f"metric/{name}")
        if name in val:
            panel.series["val"] = _series(rows, f"val/{name}")
        if name == "action_l1" and "val/baseline_l1" in keys:
            panel.series["mean-action baseline"] = _series(rows, "val/baseline_l1")
        panels.append(panel)
    return panels


def plot_run(run_dir: Path, out_dir: Path | None = None) -> dict[str, Figure]:
    """``<out_dir>/losses.png`` and ``<out_dir>/metrics.png`` (default ``<run_dir>/plots``)."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / "plots"
    rows = read_metrics(run_dir)
    figures = {}
    for name, panels in (("losses", loss_panels(rows)), ("metrics", metric_panels(rows))):
        if panels:
            figures[name] = draw_panels(panels, out_dir / f"{name}.png", f"{run_dir.name}: {name}")
    return figures


# ----------------------------------------------------------------------------- ablations
def plot_overlay(curves: dict[str, Series], metric: str, path: Path) -> Figure:
    """One line per variant: ``metric`` against step."""
    return draw_panels([Panel(metric, dict(curves), metric)], path, "validation curves by variant")


def plot_bars(
    values: dict[str, float], label: str, mode: str, path: Path, best: str | None, unfinished: Sequence[str] = ()
) -> Figure:
    """One bar per variant: ``best`` (the summary table's choice) highlighted, ``unfinished`` ones
    (failed, halted, stopped) hatched grey, a variant without a value labelled, never drawn as 0."""
    fig, (ax,) = _figure(1, size=(max(4.8, 1.1 * len(values) + 2), 3.6))
    names = list(values)
    heights = [values[n] for n in names]
    colors = ["tab:orange" if n == best else "lightgrey" if n in unfinished else "tab:blue" for n in names]
    bars = ax.bar(range(len(names)), [h if math.isfinite(h) else 0.0 for h in heights], color=colors)
    for bar, name in zip(bars, names, strict=True):
        if name in unfinished:
            bar.set_hatch("//")
    labels = [f"{h:.4g}" if math.isfinite(h) else "no value" for h in heights]
    ax.bar_label(
        bars,
        labels=[f"{t} ({n})" if n in unfinished else t for t, n in zip(labels, names, strict=True)],
        fontsize="small",
    )
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_ylabel(label)
    ax.set_title(f"{label} ({'lower' if mode == 'min' else 'higher'} is better)")
    _save(fig, path)
    return fig


# ----------------------------------------------------------------------------- trajectories
def plot_trajectories(
    episodes: dict[int, dict[str, np.ndarray]], path: Path, dim_names: list[str] | None = None
) -> Figure:
    """Predicted vs true action over the frames of a few episodes: one row per episode, one
    subplot per action dim. ``episodes[e]``: frames (T,), pred (T, A), true (T, A) in real units."""
    first = next(iter(episodes.values()))
    n_dims = first["true"].shape[1]
    names = dim_names or [f"dim {d}" for d in range(n_dims)]
    fig, axes = _figure(len(episodes) * n_dims, cols=n_dims, size=(3.6, 2.6))
    for row, (episode, arrays) in enumerate(episodes.items()):
        for d in range(n_dims):
            ax = axes[row * n_dims + d]
            ax.plot(arrays["frames"], arrays["true"][:, d], label="true", color="black")
            ax.plot(arrays["frames"], arrays["pred"][:, d], label="predicted", color="tab:red", linestyle="--")
            ax.set_title(f"episode {episode}, {names[d]}", fontsize="small")
            ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle("action chunk step 0: predicted vs true (real units)")
    _save(fig, path)
    return fig


# ----------------------------------------------------------------------------- command
def cmd_plot(args: argparse.Namespace) -> int:
    figures = plot_run(Path(args.run_dir), Path(args.out) if args.out else None)
    out = Path(args.out) if args.out else Path(args.run_dir) / "plots"
    print("wrote " + ", ".join(str(out / f"{name}.png") for name in figures))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    text = "plot loss and metric curves (train and val) of a run directory's metrics.jsonl as PNG"
    p = sub.add_parser("plot", help=text, description=text)
    p.add_argument("run_dir", help="run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="output directory (default RUN_DIR/plots)")
    p.set_defaults(func=cmd_plot)
