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
                              wall time, peak memory, params, the recipe, the train.steps of its segments
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
import gc
import json
import resource
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vla_ft.ablate_table import SWEEP_FILES, markdown_table, read_rows, read_summary, write_summary
from vla_ft.ablate_variants import RERUN_MAY_CHANGE, Variant, plan
from vla_ft.config import Recipe, RecipeError, to_dict
from vla_ft.config.checks import suggest

if TYPE_CHECKING:
    from vla_ft.runtime import Runtime


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
    from vla_ft.quantize import weight_count

    def observe(run) -> None:
        info["trainable_params"] = sum(p.numel() for g in run.optimizer.param_groups for p in g["params"])
        info["total_params"] = sum(weight_count(p) for p in run.model.parameters())
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


def is_done(recipe: Recipe) -> bool:
    """Skip a variant whose last segment finished this very recipe and whose checkpoint is still
    there, or that halted on non-finite steps (it would diverge again: change the recipe instead)."""
    summary = read_summary(Path(recipe.output_dir))
    if summary.get("recipe") != _comparable(recipe) or summary.get("failed"):
        return False  # a variant that failed after its last checkpoint (a full disk) runs its ending again
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
        "train_steps": _appended(previous.get("train_steps", []), recipe.train.steps),
        "wall_s": previous.get("wall_s", 0.0) + wall,
        "peak_mem_gb": max(previous.get("peak_mem_gb", 0.0), peak_memory_gb(device)),
        "peak_mem_kind": kind,
        "recipe": _comparable(recipe),
    }
    if is_main_process():
        run_dir.mkdir(parents=True, exist_ok=True)
        from vla_ft.checkpoint import write_atomically

        write_atomically(run_dir / "run_summary.json", json.dumps(summary, indent=1))
    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()
    return summary


def _appended(history: list[int], steps: int) -> list[int]:
    """The train.steps each run of a variant trained toward, a repeat not listed again."""
    return history if history[-1:] == [steps] else [*history, steps]


def report_failure(err: Exception) -> None:
    """A user error (bad data, a refused resume) is its message, printed by the sweep; anything else
    may be a bug and shows its traceback, as it would without the sweep."""
    from vla_ft.cli import user_errors

    if not isinstance(err, user_errors()):
        traceback.print_exception(err, file=sys.stderr)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- the command
def run_ablation(recipe_path: str | Path, overrides: Sequence[str] = (), grid: Sequence[str] = ()) -> int:
    """Run every variant not yet finished, then write the summary. Returns the exit status: 0;
    1 when a variant failed (its error is in the summary, the other variants ran); 130 when a
    variant stopped on a signal. Rerunning the same command resumes, and retries failed variants."""
    from vla_ft.runtime import init_runtime, shutdown  # here: torch loads when a sweep runs, not for --help

    base, planned = plan(recipe_path, list(overrides), list(grid))
    root = Path(base.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    rt = init_runtime(base)  # under torchrun: one process group for every variant
    try:
        return _sweep(base, planned, rt)
    finally:
        shutdown(rt)


def _sweep(base: Recipe, planned: list[tuple[Variant, Recipe]], rt: Runtime) -> int:
    """The variants in turn (see :func:`run_ablation`)."""
    from vla_ft.runtime import is_main_process, say

    root = Path(base.output_dir)
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
        rt.barrier()  # rank 0 wrote the run summary the others read next
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
        behind = {v.name: why for v, r in planned if v.name in names and (why := short_of(r))}
        rows = write_summary(root, names, base.ablation.metric, base.ablation.mode, behind)
        print(markdown_table(rows, base.ablation.metric, base.ablation.mode), end="")
        print(f"summary: {', '.join(str(root / name) for name in SWEEP_FILES)}")
    if failed:
        say(f"failed: {', '.join(failed)} (error column of the summary); rerun the same command to retry")
    return 130 if stopped else (1 if failed else 0)


def short_of(recipe: Recipe) -> str | None:
    """Why a variant whose summary says finished is not, for this sweep: it finished a shorter one
    (``train.steps`` may grow between reruns) and this one stopped before resuming it. None otherwise."""
    if not read_summary(Path(recipe.output_dir)).get("finished"):
        return None
    state = checkpoint_state(recipe)
    if is_finished(recipe, state):
        return None
    step = state["step"] if state else 0
    return f"trained to step {step} of train.steps={recipe.train.steps} (a shorter sweep); rerun to finish it"


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
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides of the base recipe (a variant's own keys win)")
    p.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="a swept key (repeatable: every combination; crossed with the recipe's variants)",
    )
    p.set_defaults(func=cmd_ablate)
