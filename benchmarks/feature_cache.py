"""Step time of an action-head-only fine-tune with and without the frozen-feature cache.

    python benchmarks/feature_cache.py                       # recipes/head_only.yaml, 40 timed steps
    python benchmarks/feature_cache.py --steps 100 --threads 2 train.batch_size=64

Both runs are the same recipe through the same loop functions (``setup``, ``step_groups``,
``prepare_update``, ``train_step``); only ``train.cache_features`` differs. A step is timed from asking for its batch
to the end of the optimizer step, so data loading (frame rendering/decoding, tokenisation) counts,
as it does for a user. Medians over the timed steps, after warm-up steps. After the same number of
steps both runs are validated: the metrics must agree (the cache changes speed, not results).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vla_ft.config import load_recipe
from vla_ft.data import step_groups
from vla_ft.run_setup import setup, teardown
from vla_ft.train import evaluate, prepare_update, train_step

ROOT = Path(__file__).resolve().parents[1]


def time_steps(overrides: list[str], warmup: int, steps: int) -> dict[str, float]:
    """Median step / data / compute milliseconds, setup seconds, and the validation metrics afterwards."""
    recipe = load_recipe(ROOT / "recipes" / "head_only.yaml", overrides)
    t0 = time.perf_counter()
    run = setup(recipe)
    setup_s = time.perf_counter() - t0
    try:
        groups = step_groups(run.train_loader, run.sampler, run.state, recipe.optim.accumulation)
        totals, datas = [], []
        for i in range(warmup + steps):
            prepare_update(run)
            t_start = time.perf_counter()
            group = next(groups)
            t_data = time.perf_counter()
            train_step(run, group)
            t_end = time.perf_counter()
            run.state.step += 1
            if i >= warmup:
                totals.append(t_end - t_start)
                datas.append(t_data - t_start)
        val = evaluate(run)
    finally:
        teardown(run)
    total, data = statistics.median(totals) * 1e3, statistics.median(datas) * 1e3
    return {
        "step_ms": total,
        "data_ms": data,
        "compute_ms": total - data,
        "setup_s": setup_s,
        "val/action_l1": val.get("val/action_l1", float("nan")),
        "val/gripper_acc": val.get("val/gripper_acc", float("nan")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("overrides", nargs="*", help="extra key.sub=value recipe overrides")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cached in (False, True):
            overrides = [
                f"output_dir={tmp}/{cached}",
                f"train.cache_features={str(cached).lower()}",
                f"train.threads={args.threads}",
                "logging.tensorboard=false",
                "logging.progress=none",
                *args.overrides,
            ]
            results[cached] = time_steps(overrides, args.warmup, args.steps)
    base, fast = results[False], results[True]
    print(
        f"head-only fine-tune, recipes/head_only.yaml, {args.steps} timed steps (median), "
        f"{args.threads} threads, torch {torch.__version__}, {torch.get_num_threads()} threads in use"
    )
    print(f"{'run':<10} {'step ms':>9} {'data ms':>9} {'compute ms':>11} {'setup s':>8} {'val L1':>10} {'val grip':>9}")
    for name, r in (("uncached", base), ("cached", fast)):
        print(
            f"{name:<10} {r['step_ms']:>9.2f} {r['data_ms']:>9.2f} {r['compute_ms']:>11.2f} {r['setup_s']:>8.2f} "
            f"{r['val/action_l1']:>10.6g} {r['val/gripper_acc']:>9.4g}"
        )
    print(
        f"speed-up per step: {base['step_ms'] / fast['step_ms']:.1f}x (target >= 20x); "
        f"cache built during setup: +{fast['setup_s'] - base['setup_s']:.2f}s"
    )
    same = abs(base["val/action_l1"] - fast["val/action_l1"]) <= 1e-5 * max(1.0, abs(base["val/action_l1"]))
    print(f"validation after {args.warmup + args.steps} steps: {'identical' if same else 'DIFFERENT'} within 1e-5")


if __name__ == "__main__":
    main()
