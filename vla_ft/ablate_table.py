"""The comparison an ablation ends with: one row per variant (best and final metric, headline
validation metrics, throughput, wall time, peak memory, status and error) from its ``metrics.jsonl``
and ``run_summary.json``, written as ``summary.csv``, ``summary.md`` and two plots."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

SWEEP_FILES = (MARKDOWN, CSV, CURVES, BARS) = ("summary.md", "summary.csv", "val_curves.png", "metric_bars.png")
"""What :func:`write_summary` writes in the sweep's directory (no variant may be named so)."""

HEADLINE = (
    "val/action_l1",
    "val/action_mse",
    "val/baseline_l1",
    "val/gripper_acc",
    "val/gripper_f1",
    "val/rollout/success_rate",  # with rollout.episodes: what a closed-loop comparison is for
)


def read_summary(run_dir: Path) -> dict[str, Any]:
    """A variant's ``run_summary.json``; {} when there is none or it is unreadable (the variant runs again)."""
    path = run_dir / "run_summary.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}


def read_rows(run_dir: Path) -> list[dict[str, float]]:
    from vla_ft.tracking import read_rows as read_metrics_file

    return read_metrics_file(run_dir / "metrics.jsonl")


def metric_curve(rows: list[dict[str, float]], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``metric`` over the rows that have it."""
    pairs = [(int(r["step"]), float(r[metric])) for r in rows if metric in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def summary_row(name: str, run_dir: Path, metric: str, mode: str, behind: str | None = None) -> dict[str, Any]:
    """One table row from a variant's metrics.jsonl and run_summary.json. ``behind``: why a variant
    its summary calls finished is short of this sweep's ``train.steps`` (then it is 'stopped')."""
    rows, info = read_rows(run_dir), read_summary(run_dir)
    if behind:
        info = {**info, "finished": False}
    steps, values = metric_curve(rows, metric)
    best_value, best_step = best_point(steps, values, mode)
    val_rows = [r for r in rows if any(k.startswith("val/") for k in r)]
    final = val_rows[-1] if val_rows else {}
    rates = [r["perf/samples_per_s"] for r in rows if "perf/samples_per_s" in r]
    row = {
        "variant": name,
        "status": variant_status(info),
        "steps": max((int(r["step"]) for r in rows), default=0),
        "trainable_params": info.get("trainable_params"),
        f"best {metric}": best_value,
        "best_step": best_step,
        f"final {metric}": final.get(metric, math.nan),
    }
    row.update({f"final {k}": final[k] for k in HEADLINE if k != metric and k in final})
    row.update(
        {
            "samples_per_s": statistics.median(rates) if rates else math.nan,
            "wall_s": info.get("wall_s", math.nan),
            "peak_mem_gb": info.get("peak_mem_gb", math.nan),
            "peak_mem_kind": info.get("peak_mem_kind", ""),
        }
    )
    notes = [behind] if behind else []
    if len(info.get("train_steps", [])) > 1:  # a sweep relaunched longer: the schedule bent mid-run
        changed = " -> ".join(map(str, info["train_steps"]))
        notes.append(f"train.steps {changed} while it trained: not the LR schedule of a fresh run")
    if notes:
        row["note"] = "; ".join(notes)
    if info.get("failed") or info.get("halted"):
        row["error"] = info.get("failed") or info.get("halted")
    return row


def best_point(steps: list[int], values: list[float], mode: str) -> tuple[float, int | None]:
    """The best finite value and the first step that reached it: a tie later on is no improvement,
    as for the trainer's best checkpoint (``max`` of (value, step) pairs took the last tied step)."""
    finite = [(v if mode == "min" else -v, s) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    if not finite:
        return math.nan, None
    value, step = min(finite)
    return (value if mode == "min" else -value), step


def variant_status(info: dict[str, Any]) -> str:
    """A variant's state from its run_summary.json: failed, halted, finished or stopped."""
    for key in ("failed", "halted", "finished"):
        if info.get(key):
            return key
    return "stopped"


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of every row, first seen first; the note and the error (long, of a few rows) last."""
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    last = [c for c in ("note", "error") if c in cols]
    return [c for c in cols if c not in last] + last


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return " ".join(str(value).split()).replace("|", "\\|")  # one table cell: an error message may span lines


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    cols = _columns(rows)
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=cols)
    writer.writeheader()
    writer.writerows([{c: row.get(c, "") for c in cols} for row in rows])
    from vla_ft.checkpoint import write_atomically  # torch: only when a table is written

    write_atomically(path, text.getvalue())


def best_variant(rows: list[dict[str, Any]], metric: str, mode: str) -> str | None:
    """The finished variant with the best value: a failed, halted or stopped one trained fewer
    steps than the others (its best may predate a divergence), so it is not in the running."""
    scored = [
        (r[f"best {metric}"], r["variant"])
        for r in rows
        if r["status"] == "finished" and math.isfinite(r[f"best {metric}"])
    ]
    if not scored:
        return None
    return (min(scored) if mode == "min" else max(scored))[1]


def markdown_table(rows: list[dict[str, Any]], metric: str, mode: str) -> str:
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |" for row in rows]
    best = best_variant(rows, metric, mode)
    unfinished = [f"{r['variant']} ({r['status']})" for r in rows if r["status"] != "finished"]
    among = f" among the finished variants (not: {', '.join(unfinished)})" if unfinished else ""
    if best is not None:
        lines += ["", f"Best by {metric} ({mode}){among}: **{best}**."]
    elif rows:
        lines += ["", f"Best by {metric} ({mode}): none, no variant finished with a finite value."]
    return "\n".join(lines) + "\n"


def write_summary(
    root: Path, names: list[str], metric: str, mode: str, behind: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """summary.csv, summary.md, val_curves.png and metric_bars.png under ``root``; returns the rows.
    ``behind``: variant -> why it is short of this sweep although its summary says finished."""
    from vla_ft import plots

    behind = behind or {}
    rows = [summary_row(name, root / name, metric, mode, behind.get(name)) for name in names]
    write_csv(rows, root / CSV)
    from vla_ft.checkpoint import write_atomically

    write_atomically(root / MARKDOWN, markdown_table(rows, metric, mode))
    curves = {name: metric_curve(read_rows(root / name), metric) for name in names}
    plots.plot_overlay(curves, metric, root / CURVES)
    values = {r["variant"]: r[f"best {metric}"] for r in rows}
    unfinished = [r["variant"] for r in rows if r["status"] != "finished"]
    best = best_variant(rows, metric, mode)
    plots.plot_bars(values, f"best {metric}", mode, root / BARS, best, unfinished)
    return rows
