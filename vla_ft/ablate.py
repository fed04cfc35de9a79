"""``vla-ft ablate``: run the variants of one recipe one after another, then compare them.

A variant is the base recipe plus ``{key.sub: value}`` overrides, named in the recipe's
``ablation.variants`` and/or by ``--grid key=v1,v2`` (every combination; crossed with the
recipe's variants when both are given). Each runs through the one training loop
(:func:`vla_ft.train.main`) in its own run directory, always with ``train.resume=true``, so
rerunning the same command skips finished variants, resumes an interrupted one and retries a
failed one. A run directory holds one recipe: a rerun whose variant differs from the recipe of
its checkpoints is refused (before anything trains), so old results never show under a new
recipe. A variant that fails (its data, memory, a bug) is recorded with its error and the sweep
goes on; the command then exits 1::

    <output_dir>/
      <variant>/              a normal run directory: checkpoints/, metrics.jsonl, config.yaml, ...
        run_summary.json      written after each segment: finished? halted or failed (the error),
                              wall time, peak memory, params, the recipe
      summary.csv             one row per variant: status, steps, trainable params, best and final <metric>
                              (+ step), final headline val metrics, median samples/s, wall time, peak
                              memory, and the error of a failed or halted variant
      summary.md              the same table in Markdown, plus the best variant
      val_curves.png          the chosen validation metric of every variant, overlaid
      metric_bars.png         best value of the chosen metric per variant

Every variant recipe is validated before the first one trains. Variants run in this process;
peak memory is per variant (CUDA: max allocated; CPU: the process's peak RSS, loaded libraries
included, reset between variants where Linux allows it, see :func:`reset_peak_memory`). Wall time
adds up the segments of a resumed variant (a segment killed with SIGKILL is not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import gc
import itertools
import json
import math
import re
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vla_ft.config import Recipe, RecipeError, apply_overrides, read_yaml, recipe_from_dict, to_dict
from vla_ft.config.checks import suggest
from vla_ft.config.loader import parse_value

NAME_OK = re.compile(r"^[A-Za-z0-9_.=+-]+$")
# What ablate sets for every variant itself: a variant setting it would be silently undone.
RESERVED = {
    "output_dir": "each variant runs in <output_dir>/<variant>; set output_dir once, for the whole sweep",
    "train.resume": "every variant resumes (rerunning the command goes on where it stopped)",
    "ablation": "the ablation section configures the sweep, not a variant",
}
# What a rerun may change in a variant's recipe: how long it trains (a sweep run longer) and how it
# logs, saves and loads. They change no result the summary lists under the variant's name.
RERUN_MAY_CHANGE = (
    "train.steps",
    "logging.",
    "checkpoint.",
    "data.num_workers",
    "data.prefetch_factor",
    "data.pin_memory",
    "data.persistent_workers",
    "train.threads",
)
HEADLINE = ("val/action_l1", "val/action_mse", "val/baseline_l1", "val/gripper_acc", "val/gripper_f1")


@dataclass
class Variant:
    name: str
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted key -> value


# ----------------------------------------------------------------------------- variants
def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split on ``sep`` outside brackets/braces/quotes: ``[1,2],[3]`` -> ``['[1,2]', '[3]']``."""
    parts, depth, quote, current = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(current)
            current = ""
            continue
        current += ch
    return [*parts, current]


def grid_variants(specs: Sequence[str]) -> list[Variant]:
    """``["optim.lr=1e-3,3e-4", "freeze.vision_encoder=true,false"]`` -> every combination (values parsed as YAML)."""
    if not specs:
        return []
    axes, swept, problems = [], {}, []
    for spec in specs:
        key, sep, values = spec.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise RecipeError(f"--grid '{spec}' must look like key.sub=v1,v2", "command line")
        if why := reserved_key_problem(key):
            problems.append(f"--grid '{spec}': {why}")
        elif key in swept:
            problems.append(
                f"--grid '{spec}': {key} is swept by --grid '{swept[key]}' already; give all its values "
                f"in one --grid {key}=v1,v2"
            )
        swept.setdefault(key, spec)
        axes.append([(key, parse_value(v, f"--grid '{spec}'")) for v in split_top_level(values)])
    if problems:
        raise RecipeError(problems, "command line")
    variants = []
    for combo in itertools.product(*axes):
        name = "+".join(f"{key}={_short(value)}" for key, value in combo)
        variants.append(Variant(name, dict(combo)))
    return variants


def reserved_key_problem(key: str) -> str | None:
    """Why a variant may not set ``key`` (ablate sets it for every variant), or None."""
    for reserved, why in RESERVED.items():
        if key == reserved or key.startswith(reserved + "."):
            return f"{key} cannot differ between variants: {why}"
    return None


def _short(value: Any) -> str:
    text = json.dumps(value, separators=(",", ":")) if isinstance(value, (list, dict)) else str(value).lower()
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


def combine(recipe_variants: list[Variant], grid: list[Variant]) -> list[Variant]:
    """The recipe's variants, the grid's, or (both given) every recipe variant x every grid point."""
    if recipe_variants and grid:
        return [Variant(f"{a.name}+{b.name}", {**a.overrides, **b.overrides}) for a in recipe_variants for b in grid]
    return recipe_variants or grid


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[leaf] = copy.deepcopy(value)


def variant_recipe(base_raw: dict[str, Any], variant: Variant, root: Path) -> Recipe:
    """Base recipe + the variant's overrides, in ``root/<name>``, resumable. Errors name the variant."""
    raw = copy.deepcopy(base_raw)
    raw.pop("ablation", None)  # a variant is a plain training run
    for key, value in variant.overrides.items():
        _set(raw, key, value)
    _set(raw, "output_dir", str(root / variant.name))
    _set(raw, "train.resume", True)
    return recipe_from_dict(raw, f"variant '{variant.name}'")


def plan(
    recipe_path: str | Path, overrides: Sequence[str], grid: Sequence[str]
) -> tuple[Recipe, list[tuple[Variant, Recipe]]]:
    """Validate the base recipe and every variant (all problems at once) before anything trains."""
    base_raw = apply_overrides(read_yaml(recipe_path), list(overrides))
    base = recipe_from_dict(base_raw, str(recipe_path))
    named = [Variant(name, dict(ov or {})) for name, ov in base.ablation.variants.items()]
    variants = combine(named, grid_variants(grid))
    if not variants:
        raise RecipeError(
            "ablation.variants: no variants; name them in the recipe or pass --grid key=v1,v2", str(recipe_path)
        )
    problems = [
        f"ablation.variants.{v.name}: use letters, digits and _ . = + - in variant names"
        for v in variants
        if not NAME_OK.match(v.name)
    ]
    problems += [
        f"ablation.variants.{v.name}: {why}" for v in named for k in v.overrides if (why := reserved_key_problem(k))
    ]
    seen = [v.name for v in variants]
    problems += [f"ablation.variants: duplicate variant '{n}'" for n in sorted({n for n in seen if seen.count(n) > 1})]
    planned = []
    root = Path(base.output_dir)
    for variant in variants:
        try:
            planned.append((variant, variant_recipe(base_raw, variant, root)))
        except RecipeError as err:
            problems += [f"variant '{variant.name}': {p}" for p in err.problems]
    problems += same_recipe_problems(planned) + trained_elsewhere_problems(planned)
    if problems:
        raise RecipeError(problems, str(recipe_path))
    return base, planned


def same_recipe_problems(planned: list[tuple[Variant, Recipe]]) -> list[str]:
    """Variants that resolve to one recipe (``--grid optim.lr=1e-3,0.001``) would train it twice
    under two names."""
    first: dict[str, Variant] = {}
    problems = []
    for variant, recipe in planned:
        resolved = {**to_dict(recipe), "output_dir": None}
        other = first.setdefault(json.dumps(resolved, sort_keys=True), variant)
        if other is not variant:
            problems.append(
                f"variants '{other.name}' and '{variant.name}' are the same recipe"
                f"{_override_difference(other, variant)}; drop one"
            )
    return problems


def _override_difference(a: Variant, b: Variant) -> str:
    """`` (optim.lr: '1e-3' vs 0.001)``: the overrides that differ in writing only."""
    keys = sorted(k for k in a.overrides.keys() | b.overrides.keys() if a.overrides.get(k) != b.overrides.get(k))
    shown = [f"{k}: {_written(a, k)} vs {_written(b, k)}" for k in keys]
    return f" ({'; '.join(shown)})" if shown else ""


def _written(variant: Variant, key: str) -> str:
    return repr(variant.overrides[key]) if key in variant.overrides else "unset"


def trained_elsewhere_problems(planned: list[tuple[Variant, Recipe]]) -> list[str]:
    """A variant's run directory with checkpoints of another recipe (a changed override, base
    key or --grid value): resuming or skipping it would report those results as this recipe's."""
    from vla_ft.checkpoint import latest_checkpoint
    from vla_ft.run_state import read_saved_recipe, recipe_changes

    problems = []
    for variant, recipe in planned:
        run_dir = Path(recipe.output_dir)
        path = latest_checkpoint(run_dir / "checkpoints")
        changes = recipe_changes(read_saved_recipe(path), recipe, RERUN_MAY_CHANGE) if path is not None else []
        if changes:
            problems.append(
                f"variant '{variant.name}': {run_dir} was trained with another recipe ({'; '.join(changes)}); "
                f"rerun with that recipe, delete {run_dir} to train the variant afresh, or choose a new output_dir"
            )
    return problems


# ----------------------------------------------------------------------------- one variant
def reset_peak_memory(device_type: str) -> bool:
    """Start a new peak-memory window; False when only the process-lifetime CPU peak is available."""
    if device_type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return True
    try:  # Linux >= 4.0: writing 5 resets the peak RSS (VmHWM) of this process
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_memory_gb(device_type: str) -> float:
    """CUDA max allocated, or the CPU peak resident set (VmHWM; ru_maxrss where /proc is absent)."""
    if device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


@contextlib.contextmanager
def observe_run(info: dict[str, Any]):
    """Record what the trainer built (parameter counts, device) through a temporary installer."""
    from vla_ft import extensions

    def observe(run) -> None:
        info["trainable_params"] = sum(p.numel() for g in run.optimizer.param_groups for p in g["params"])
        info["total_params"] = sum(p.numel() for p in run.model.parameters())
        info["device"] = run.rt.device.type

    extensions.INSTALLERS.append(observe)
    try:
        yield info
    finally:
        extensions.INSTALLERS.remove(observe)


def checkpoint_state(recipe: Recipe) -> dict[str, Any] | None:
    """trainer_state.json of the newest complete checkpoint of a variant, or None."""
    from vla_ft.checkpoint import latest_checkpoint

    path = latest_checkpoint(Path(recipe.output_dir) / "checkpoints")
    return json.loads((path / "trainer_state.json").read_text())["state"] if path else None


def is_finished(recipe: Recipe, state: dict[str, Any] | None) -> bool:
    """Trained to ``train.steps``, or stopped early by patience (not by a signal)."""
    from vla_ft.run_state import TrainState
    from vla_ft.train import stalled

    if state is None:
        return False
    return state["step"] >= recipe.train.steps or stalled(recipe, TrainState(**state))


def _comparable(recipe: Recipe) -> dict[str, Any]:
    d = to_dict(recipe)
    d["train"].pop("resume", None)
    return d


def read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run_summary.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def is_done(recipe: Recipe) -> bool:
    """Skip a variant whose last segment finished this very recipe and whose checkpoint is still
    there, or that halted on non-finite steps (it would diverge again: change the recipe instead)."""
    summary = read_summary(Path(recipe.output_dir))
    if summary.get("recipe") != _comparable(recipe):
        return False
    if summary.get("halted"):
        return True
    return bool(summary.get("finished")) and is_finished(recipe, checkpoint_state(recipe))


def run_variant(recipe: Recipe) -> dict[str, Any]:
    """Train (or resume) one variant; update and return its run_summary.json."""
    from vla_ft import train
    from vla_ft.run_state import recipe_changes
    from vla_ft.runtime import is_main_process

    run_dir = Path(recipe.output_dir)
    previous = read_summary(run_dir)
    if "recipe" not in previous or recipe_changes(previous["recipe"], recipe, RERUN_MAY_CHANGE):
        previous = {}  # another recipe's segment before any checkpoint: its time is not this run's
    device = previous.get("device", "cuda" if recipe.train.device != "cpu" and _cuda() else "cpu")
    exact = reset_peak_memory(device)
    t0 = time.perf_counter()
    halted = failed = None
    with observe_run({}) as info:
        try:
            train.main(recipe)
        except train.TrainingHalted as err:  # one diverging variant must not end the sweep
            halted = str(err)
        except Exception as err:  # nor one its data, memory or disk fails: recorded, retried on a rerun
            failed = f"{type(err).__name__}: {err}"
            report_failure(err)
    wall = time.perf_counter() - t0
    device = info.get("device", device)
    kind = "cuda_max_allocated" if device == "cuda" else ("cpu_peak_rss" if exact else "cpu_peak_rss_process")
    summary = {
        **previous,
        **info,
        "finished": is_finished(recipe, checkpoint_state(recipe)),
        "halted": halted,
        "failed": failed,
        "segments": previous.get("segments", 0) + 1,
        "wall_s": previous.get("wall_s", 0.0) + wall,
        "peak_mem_gb": max(previous.get("peak_mem_gb", 0.0), peak_memory_gb(device)),
        "peak_mem_kind": kind,
        "recipe": _comparable(recipe),
    }
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "run_summary.json").write_text(json.dumps(summary, indent=1))
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    return summary


def report_failure(err: Exception) -> None:
    """A user error (bad data, a refused resume) is its message, printed by the sweep; anything else
    may be a bug and shows its traceback, as it would without the sweep."""
    from vla_ft.cli import user_errors

    if not isinstance(err, user_errors()):
        traceback.print_exception(err, file=sys.stderr)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- the table
def read_rows(run_dir: Path) -> list[dict[str, float]]:
    from vla_ft.tracking import read_rows as read_metrics_file

    return read_metrics_file(run_dir / "metrics.jsonl")


def metric_curve(rows: list[dict[str, float]], metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``metric`` over the rows that have it."""
    pairs = [(int(r["step"]), float(r[metric])) for r in rows if metric in r]
    return [s for s, _ in pairs], [v for _, v in pairs]


def summary_row(name: str, run_dir: Path, metric: str, mode: str) -> dict[str, Any]:
    """One table row from a variant's metrics.jsonl and run_summary.json."""
    rows, info = read_rows(run_dir), read_summary(run_dir)
    steps, values = metric_curve(rows, metric)
    finite = [(v, s) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    best_value, best_step = (min(finite) if mode == "min" else max(finite)) if finite else (math.nan, None)
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
    if info.get("failed") or info.get("halted"):
        row["error"] = info.get("failed") or info.get("halted")
    return row


def variant_status(info: dict[str, Any]) -> str:
    """A variant's state from its run_summary.json: failed, halted, finished or stopped."""
    for key in ("failed", "halted", "finished"):
        if info.get(key):
            return key
    return "stopped"


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of every row, first seen first; the error (long, of a few rows) last."""
    cols: list[str] = []
    for row in rows:
        cols += [k for k in row if k not in cols]
    return [c for c in cols if c != "error"] + ["error"] * ("error" in cols)


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
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols)
        writer.writeheader()
        writer.writerows([{c: row.get(c, "") for c in cols} for row in rows])


def best_variant(rows: list[dict[str, Any]], metric: str, mode: str) -> str | None:
    scored = [(r[f"best {metric}"], r["variant"]) for r in rows if math.isfinite(r[f"best {metric}"])]
    if not scored:
        return None
    return (min(scored) if mode == "min" else max(scored))[1]


def markdown_table(rows: list[dict[str, Any]], metric: str, mode: str) -> str:
    cols = _columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |" for row in rows]
    best = best_variant(rows, metric, mode)
    if best is not None:
        lines += ["", f"Best by {metric} ({mode}): **{best}**."]
    return "\n".join(lines) + "\n"


def write_summary(root: Path, names: list[str], metric: str, mode: str) -> list[dict[str, Any]]:
    """summary.csv, summary.md, val_curves.png and metric_bars.png under ``root``; returns the rows."""
    from vla_ft import plots

    rows = [summary_row(name, root / name, metric, mode) for name in names]
    write_csv(rows, root / "summary.csv")
    (root / "summary.md").write_text(markdown_table(rows, metric, mode))
    curves = {name: metric_curve(read_rows(root / name), metric) for name in names}
    plots.plot_overlay(curves, metric, root / "val_curves.png")
    plots.plot_bars({r["variant"]: r[f"best {metric}"] for r in rows}, f"best {metric}", mode, root / "metric_bars.png")
    return rows


# ----------------------------------------------------------------------------- the command
def run_ablation(recipe_path: str | Path, overrides: Sequence[str] = (), grid: Sequence[str] = ()) -> int:
    """Run every variant not yet finished, then write the summary. Returns the exit status: 0;
    1 when a variant failed (its error is in the summary, the other variants ran); 130 when a
    variant stopped on a signal. Rerunning the same command resumes, and retries failed variants."""
    from vla_ft.runtime import is_main_process, say  # here: torch loads when a sweep runs, not for --help

    base, planned = plan(recipe_path, list(overrides), list(grid))
    root = Path(base.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    failed, stopped = [], False
    for i, (variant, recipe) in enumerate(planned, 1):
        head = f"[ablate {i}/{len(planned)}] {variant.name}"
        if is_done(recipe):
            why = "halted" if read_summary(Path(recipe.output_dir)).get("halted") else "finished"
            say(f"{head}: {why} earlier, skipped")
            check_metric_logged(base.ablation.metric, variant.name, Path(recipe.output_dir))
            continue
        say(f"{head}: {'resuming' if checkpoint_state(recipe) else 'training'} in {recipe.output_dir}")
        summary = run_variant(recipe)
        check_metric_logged(base.ablation.metric, variant.name, Path(recipe.output_dir))  # before the next variant
        if summary["failed"] or summary["halted"]:
            what = "failed" if summary["failed"] else "halted"
            say(f"{head}: {what} ({summary[what]}); going on with the other variants")
            failed += [variant.name] if summary["failed"] else []
        elif not summary["finished"]:
            say(f"{head}: stopped before the end; rerun the same command to resume")
            stopped = True
            break
    names = [
        v.name for v, r in planned if read_rows(Path(r.output_dir)) or read_summary(Path(r.output_dir)).get("failed")
    ]
    if names and is_main_process():
        rows = write_summary(root, names, base.ablation.metric, base.ablation.mode)
        print(markdown_table(rows, base.ablation.metric, base.ablation.mode), end="")
        print(
            f"summary: {root / 'summary.md'}, {root / 'summary.csv'}, {root / 'val_curves.png'}, "
            f"{root / 'metric_bars.png'}"
        )
    if failed:
        say(f"failed: {', '.join(failed)} (error column of the summary); rerun the same command to retry")
    return 130 if stopped else (1 if failed else 0)


def check_metric_logged(metric: str, name: str, run_dir: Path) -> None:
    """``ablation.metric`` must be a validation metric the variant logged (a typo would give a table of NaNs)."""
    logged = sorted({k for r in read_rows(run_dir) for k in r if k.startswith("val/")})
    if logged and metric not in logged:
        raise RecipeError(
            f"ablation.metric: '{metric}' is not logged by variant {name}{suggest(metric, logged)}; "
            f"validation metrics: {', '.join(logged)} (finished variants are kept; rerun to go on)"
        )


def cmd_ablate(args: argparse.Namespace) -> int:
    return run_ablation(args.recipe, args.overrides, args.grid)


def add_parser(sub: argparse._SubParsersAction) -> None:
    text = "run the ablation variants of a recipe (ablation.variants and/or --grid), resumable, and compare them"
    p = sub.add_parser("ablate", help=text, description=text)
    p.add_argument("recipe", help="recipe YAML file (its ablation: section names the variants)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides applied to every variant")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a swept key (repeatable: every combination; crossed with the recipe's variants)",
    )
    p.set_defaults(func=cmd_ablate)
