"""Peer benchmark: LeRobot's own ``LeRobotDataset`` against robot_data on the same files.

``lerobot`` is not a dependency of vla-ft (it pins its own torch, av and huggingface-hub), so
this script runs from a venv of its own; our side runs in the project's environment::

    python3 -m venv /tmp/lerobot_venv && /tmp/lerobot_venv/bin/pip install lerobot
    vla-ft data synth /tmp/peer/images --episodes 40 --length 50 --image-size 224
    vla-ft data synth /tmp/peer/video  --episodes 40 --length 50 --image-size 224 --video
    /tmp/lerobot_venv/bin/python benchmarks/lerobot_peer.py /tmp/peer/images /tmp/peer/video \\
        --ours-python "$(python -c 'import sys; print(sys.executable)')" --repeats 5

Every measurement is a fresh process, and the readers alternate (ours first on even repeats,
LeRobot first on odd ones), so load from other jobs on the machine hits both alike; the table
gives medians. Both sides use the same DataLoader (``data_throughput.make_loader``: batch 32,
2 workers, persistent workers, prefetch 4, shuffled, no pinned memory), the same timing
(``data_throughput.fixed_batch_rate``: warm-up batches, then timed batches) and the same
load-independent CPU cost of one ``__getitem__`` (``data_throughput.cpu_ms_per_sample``).

Per sample, LeRobot: one parquet row through HF ``datasets`` (PNG -> PIL -> float32 CHW in
[0, 1]), an 8-step action chunk by ``delta_timestamps`` with ``action_is_pad``, and for video
one frame decoded at its timestamp (``video_backend``); no resize (frames come at their stored
size), no normalisation (LeRobot normalises in the policy's processor), no tokenisation.
Ours (``--tokenize``): uint8 CHW image (resized only when the stored size differs), 8-step
chunk with mask, mean/std normalisation, prompt and narration target tokenised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def measure_lerobot(args: argparse.Namespace) -> dict:
    """samples/s and CPU ms/sample of LeRobotDataset over ``args.one`` (in this process)."""
    import torch

    sys.path.insert(0, str(HERE))
    from data_throughput import cpu_ms_per_sample, fixed_batch_rate, make_loader

    try:
        from lerobot.datasets.lerobot_dataset import LeRobotDataset  # lerobot >= 0.4 (dataset v3.0)
    except ImportError:
        from lerobot.common.datasets.lerobot_dataset import LeRobotDataset  # older layout

    torch.set_num_threads(1)
    fps = json.loads((Path(args.one) / "meta/info.json").read_text())["fps"]
    start = time.perf_counter()
    ds = LeRobotDataset(
        repo_id="local/synth",
        root=args.one,
        delta_timestamps={"action": [i / fps for i in range(8)]},
        video_backend=args.backend,
    )
    open_s = time.perf_counter() - start
    rate = fixed_batch_rate(make_loader(ds, args), args.warmup, args.batches)
    cpu_ms = cpu_ms_per_sample(ds)  # after the workers forked: LeRobot warns against decoding before
    image = ds[0][ds.meta.camera_keys[0]]
    return {
        "reader": f"LeRobotDataset ({args.backend})",
        "root": args.one,
        "samples_per_s": rate,
        "cpu_ms_per_sample": cpu_ms,
        "image": f"{tuple(image.shape)} {image.dtype}",
        "open_s": open_s,
        "load": os.getloadavg()[0],
    }


def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def drive(args: argparse.Namespace) -> None:
    import importlib.metadata as md

    check = subprocess.run([args.ours_python, "-c", "import robot_data"], capture_output=True, text=True)
    if check.returncode != 0:
        sys.exit(f"--ours-python {args.ours_python} cannot import robot_data:\n{check.stderr}")
    common = ["--warmup", str(args.warmup), "--batches", str(args.batches)]
    common += ["--batch", str(args.batch), "--workers", str(args.workers)]
    ours = [args.ours_python, str(HERE / "data_throughput.py"), *common, "--json"]
    if not args.no_tokenize:
        ours.append("--tokenize")
    peer = [sys.executable, str(Path(__file__).resolve()), *common]
    runs: dict[tuple[str, str], list[dict]] = {}
    for rep in range(args.repeats):
        for root in args.roots:
            cmds = [("ours", [*ours, "--root", root])]
            is_video = json.loads((Path(root) / "meta/info.json").read_text()).get("video_path")
            backends = args.backends if is_video else args.backends[:1]  # images: no video backend
            cmds += [(f"lerobot-{b}", [*peer, "--one", root, "--backend", b]) for b in backends]
            if rep % 2:
                cmds.reverse()
            for name, cmd in cmds:
                result = _run(cmd)
                runs.setdefault((Path(root).name, name), []).append(result)
                print(
                    f"repeat {rep} {Path(root).name:8s} {name:16s} {result['samples_per_s']:7.0f} samples/s "
                    f"{result['cpu_ms_per_sample']:6.2f} CPU ms/sample  load {result['load']:.1f}",
                    flush=True,
                )
    print(
        f"\nlerobot {md.version('lerobot')}, torch {md.version('torch')}, av {md.version('av')}, "
        f"datasets {md.version('datasets')} (LeRobot venv); batch {args.batch}, {args.workers} workers, "
        f"{args.warmup} warm-up + {args.batches} timed batches, medians of {args.repeats}\n"
    )
    print("| dataset | reader | samples/s (median) | samples/s (runs) | CPU ms/sample (median) | sample image |")
    print("|---|---|---:|---|---:|---|")
    for (kind, _name), results in runs.items():
        rates = [r["samples_per_s"] for r in results]
        cpu = statistics.median(r["cpu_ms_per_sample"] for r in results)
        print(
            f"| {kind} | {results[0]['reader']} | {statistics.median(rates):.0f} | "
            f"{' '.join(f'{x:.0f}' for x in rates)} | {cpu:.2f} | {results[0]['image']} |"
        )
    loads = [r["load"] for rs in runs.values() for r in rs]
    print(f"\n1-min load average during the runs: {min(loads):.1f}-{max(loads):.1f} on {os.cpu_count()} cores")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("roots", nargs="*", help="LeRobot v3.0 directories written by `vla-ft data synth`")
    parser.add_argument("--ours-python", default="python", help="interpreter of the vla-ft environment")
    parser.add_argument("--backends", nargs="+", default=["pyav"], help="LeRobot video backends (pyav, torchcodec)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-tokenize", action="store_true", help="ours without prompt/target tokenisation")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--one", default=None, help="(internal) time LeRobotDataset on this directory once")
    parser.add_argument("--backend", default="pyav", help="(internal) video backend for --one")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure_lerobot(args)))
    elif args.roots:
        drive(args)
    else:
        parser.error("give one or more dataset directories")


if __name__ == "__main__":
    main()
