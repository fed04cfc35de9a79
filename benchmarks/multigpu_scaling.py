"""Data-parallel scaling of the reference VLA through the real entry points: 1 GPU, DDP and FSDP2 on N.

    python benchmarks/multigpu_scaling.py                     # GPUs: 1 vs 2 (DDP, FSDP2), ~5 min
    python benchmarks/multigpu_scaling.py --gpus 4 --steps 60
    python benchmarks/multigpu_scaling.py --smoke             # CPU, gloo, tiny model: checks this script

Each row is ``vla-ft train recipes/bench/reference.yaml`` (one process) or ``torchrun
--nproc_per_node N -m vla_ft train ...`` with the same per-device batch (64), so N GPUs train
on an N-times larger global batch. Throughput is ``perf/samples_per_s`` of the loop itself
(global samples per second, data loading included, ``perf/data_wait_frac`` says how much of
it was waiting), averaged over the log windows after the first (warm-up) one. Weak scaling:
ratio = samples/s on N GPUs / samples/s on one. Eager mode (``train.compile=false``): the
compile time of three runs would cost more device time than the runs themselves.
Last, the FSDP2 checkpoint is consolidated into one file and resumed on one GPU with the same
global batch (``train.batch_size`` x N), which must continue from the saved step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# NVLink multicast stays off: on shared hosts a program using it can take the GPUs out of service.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def run(cmd: list[str], log: Path, env: dict[str, str]) -> tuple[int, float]:
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    return rc, time.perf_counter() - t0


def summarise(run_dir: Path, after_step: int = 0) -> dict[str, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "perf/samples_per_s" in r and r["step"] > after_step]
    steady = train[1:] or train  # the first window holds CUDA/cuDNN warm-up
    mean = lambda key: sum(r.get(key, float("nan")) for r in steady) / len(steady)  # noqa: E731
    return {
        "samples_per_s": mean("perf/samples_per_s"),
        "data_wait_frac": mean("perf/data_wait_frac"),
        "gpu_mem_gb": max((r.get("perf/gpu_mem_gb", float("nan")) for r in train), default=float("nan")),
        "last_step": train[-1]["step"],
        "last_loss": train[-1]["loss"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64, help="per-device batch")
    ap.add_argument("--smoke", action="store_true", help="CPU, gloo, the tiny quickstart model, 4 steps")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (and logs beside it)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()

    work = args.workdir or Path(tempfile.mkdtemp(prefix="vla_scaling_"))
    logs = args.out.parent if args.out else work
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **SAFE_ENV, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    py = sys.executable
    if args.smoke:
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import TINY

        recipe, steps, every = str(ROOT / "recipes/quickstart.yaml"), 4, 1
        common = [*TINY, "train.device=cpu", "data.num_workers=0", "train.batch_size=2"]
    else:
        recipe, steps, every = str(ROOT / "recipes/bench/reference.yaml"), args.steps, 10
        common = ["train.compile=false", f"train.batch_size={args.batch}", "train.val_batches=2"]
    common += [
        f"train.steps={steps}",
        f"logging.every={every}",
        "train.val_every=0",
        "checkpoint.every=0",
        "checkpoint.save_optimizer=false",  # only the FSDP2 row's checkpoint is resumed
        "logging.progress=plain",
    ]
    torchrun = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}", "-m", "vla_ft"]
    rows = {
        "1 GPU": ([py, "-m", "vla_ft"], {"CUDA_VISIBLE_DEVICES": "0"} if not args.smoke else {}, []),
        f"{args.gpus} GPU DDP": (torchrun, {}, ["distributed.strategy=ddp"]),
        f"{args.gpus} GPU FSDP2": (torchrun, {}, ["distributed.strategy=fsdp", "checkpoint.save_optimizer=true"]),
    }
    results: dict[str, dict] = {}
    for name, (launcher, extra_env, extra) in rows.items():
        run_dir = work / name.replace(" ", "_")
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [*launcher, "train", recipe, *common, *extra, f"output_dir={run_dir}"]
        rc, wall = run(cmd, logs / f"{name.replace(' ', '_')}.log", {**env, **extra_env})
        results[name] = {"rc": rc, "wall_s": wall, "cmd": " ".join(cmd[1:])}
        if rc == 0:
            results[name].update(summarise(run_dir))
        print(
            f"{name}: rc={rc} wall {wall:.0f}s {results[name].get('samples_per_s', float('nan')):.1f} samples/s",
            flush=True,
        )
        if args.out:  # after every row: a run cut short by a time limit still leaves what it measured
            args.out.write_text(json.dumps(results, indent=1))

    fsdp_dir = work / f"{args.gpus}_GPU_FSDP2"
    ckpt = fsdp_dir / "checkpoints" / f"step_{steps:06d}"
    if results[f"{args.gpus} GPU FSDP2"]["rc"] == 0:
        rc, wall = run([py, "-m", "vla_ft", "consolidate", str(ckpt)], logs / "consolidate.log", env)
        results["consolidate"] = {
            "rc": rc,
            "wall_s": wall,
            "file_mb": (ckpt / "model.safetensors").stat().st_size / 2**20 if rc == 0 else None,
        }
        # Same global batch on one GPU through accumulation; a resume reads model_dcp/ (the shards) first.
        cmd = [
            py,
            "-m",
            "vla_ft",
            "train",
            recipe,
            *common,
            "distributed.strategy=fsdp",
            f"train.steps={steps + 2}",
            f"optim.accumulation={args.gpus}",
            "checkpoint.save_optimizer=true",
            "train.resume=true",
            f"output_dir={fsdp_dir}",
        ]
        rc, wall = run(cmd, logs / "fsdp_resume_1gpu.log", {**env, "CUDA_VISIBLE_DEVICES": "0"})
        results["fsdp resume on 1"] = {"rc": rc, "wall_s": wall}
        if rc == 0:
            results["fsdp resume on 1"].update(summarise(fsdp_dir, after_step=steps))

    base = results["1 GPU"].get("samples_per_s")
    print(f"\n{'run':<16} {'samples/s':>10} {'ratio':>6} {'data wait':>9} {'GPU mem GB':>10} {'wall s':>7}  rc")
    for name, r in results.items():
        sps = r.get("samples_per_s", float("nan"))
        ratio = sps / base if base else float("nan")
        print(
            f"{name:<16} {sps:>10.1f} {ratio:>6.2f} {r.get('data_wait_frac', float('nan')):>9.3f} "
            f"{r.get('gpu_mem_gb', float('nan')):>10.1f} {r['wall_s']:>7.0f}  {r['rc']}"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
