"""Data-loading throughput of robot_data: samples/s through a DataLoader, per dataset kind.

    python benchmarks/data_throughput.py                      # defaults below, prints a table
    python benchmarks/data_throughput.py --workers 4 --size 224 --episodes 40
    python benchmarks/data_throughput.py --root DIR --tokenize --json   # one existing LeRobot dir


The synthetic task is written to disk as LeRobot v3.0 (PNG images in parquet, and H.264 MP4)
and as RLDS (PNG frames in tfrecords) at ``--size`` pixels, then read back through RobotDataset +
DataLoader (workers, persistent workers, pinned memory off: CPU). "first epoch" includes worker
start-up and cold caches; "steady" is a second pass. The video dataset is also timed with the decoded-frame cache. The
last column is the CPU cost of one sample in one process, which other load does not change.

With ``--root DIR`` it reads that LeRobot directory (e.g. from ``vla-ft data synth``) instead,
and times ``--warmup`` then ``--batches`` batches of one persistent-worker loader, as
``benchmarks/lerobot_peer.py`` does for LeRobot's own ``LeRobotDataset`` on the same files
(that script runs from another venv and imports the timing functions below, so ``robot_data``
is imported inside functions, not at the top).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader


def _epoch(loader: DataLoader) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["index"])
    return n, time.perf_counter() - start


def fixed_batch_rate(loader: DataLoader, warmup: int, batches: int) -> float:
    """samples/s over ``batches`` batches after ``warmup`` batches (worker start-up, cold caches);
    the loader is re-iterated across epoch ends (persistent workers stay up)."""

    def forever():
        while True:
            yield from loader

    it = forever()
    for _ in range(warmup):
        next(it)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        n += len(next(it)["index"])
    return n / (time.perf_counter() - start)


def cpu_ms_per_sample(ds, n: int = 200) -> float:
    """CPU time of __getitem__ in this process (warm caches): unlike samples/s, it does not
    depend on what else runs on the machine."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    for i in order:  # warm: file caches, open containers, frame cache entries
        ds[i]
    start = time.process_time()
    for i in order:
        ds[i]
    return (time.process_time() - start) / len(order) * 1e3


def make_loader(ds, args: argparse.Namespace, collate_fn=None) -> DataLoader:
    """The loader every row uses: shuffled, persistent workers, prefetch 4, no pinned memory."""
    return DataLoader(
        ds,
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=collate_fn,
        persistent_workers=args.workers > 0,
        pin_memory=False,
        prefetch_factor=4 if args.workers > 0 else None,
    )


def make_dataset(reader, args: argparse.Namespace, tokenizer=None):
    """RobotDataset as training builds it: chunk 8, history 1, mean/std (gripper dim raw)."""
    from robot_data import Normalizer, RobotDataset, compute_stats

    episodes = [e.index for e in reader.episodes()]
    stats = compute_stats(reader, episodes)
    augment = {"crop_scale": [0.8, 1.0], "color_jitter": 0.1} if args.augment else None
    ds = RobotDataset(
        reader,
        episodes,
        chunk=8,
        history=1,
        normalizer=Normalizer(stats, "mean_std", [2]),
        image_size=args.size,
        prompt_tokenizer=tokenizer,
        augment=augment,
        train=True,
    )
    return ds


def prompt_tokenizer():
    """The recipe defaults: builtin:tiny tokenizer, default prompt template, language_target text."""
    from robot_data import PromptTokenizer
    from vla_ft.tokenizer import BUILTIN_TINY, load_tokenizer

    return PromptTokenizer(load_tokenizer(BUILTIN_TINY), "what should the robot do to {instruction} ?", "text")


def measure(reader, args: argparse.Namespace) -> tuple[float, float, float]:
    """(first-epoch samples/s, steady-state samples/s, CPU ms per sample)."""
    from robot_data import collate

    ds = make_dataset(reader, args)
    loader = make_loader(ds, args, collate)
    n, first = _epoch(loader)
    n2, steady = _epoch(loader)
    return n / first, n2 / steady, cpu_ms_per_sample(ds)


def measure_root(args: argparse.Namespace) -> None:
    """samples/s (fixed batches) and CPU ms/sample of RobotDataset over an existing LeRobot dir."""
    from robot_data import build_reader, collate

    reader = build_reader("lerobot", path=args.root, text_key="narration" if args.tokenize else None)
    ds = make_dataset(reader, args, prompt_tokenizer() if args.tokenize else None)
    rate = fixed_batch_rate(make_loader(ds, args, collate), args.warmup, args.batches)
    result = {
        "reader": "robot_data.RobotDataset",
        "root": args.root,
        "samples_per_s": rate,
        "cpu_ms_per_sample": cpu_ms_per_sample(ds),
        "image": f"{tuple(ds[0]['images'].shape)} {ds[0]['images'].dtype}",
        "load": os.getloadavg()[0],
    }
    print(json.dumps(result) if args.json else result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--size", type=int, default=224, help="stored and model image size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--augment", action="store_true", help="random resized crop + colour jitter")
    parser.add_argument("--root", default=None, help="time this LeRobot directory only (fixed batch count)")
    parser.add_argument("--warmup", type=int, default=3, help="--root: batches before timing")
    parser.add_argument("--batches", type=int, default=50, help="--root: timed batches")
    parser.add_argument("--tokenize", action="store_true", help="--root: prompt + narration target (builtin:tiny)")
    parser.add_argument("--json", action="store_true", help="--root: print one JSON line")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.root:
        measure_root(args)
        return
    from robot_data import SyntheticReader, build_reader
    from robot_data.lerobot_writer import write_lerobot
    from robot_data.rlds_writer import write_rlds

    source = SyntheticReader(episodes=args.episodes, episode_length=args.length, image_size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_lerobot(source, root / "images", video=False)
        write_lerobot(source, root / "video", video=True, codec="h264")
        write_rlds(source, root / "rlds" / "1.0.0")
        rows = [
            ("synthetic, rendered in memory", source),
            ("LeRobot v3.0, PNG in parquet", build_reader("lerobot", path=str(root / "images"))),
            ("LeRobot v3.0, H.264 MP4", build_reader("lerobot", path=str(root / "video"))),
            (
                "LeRobot v3.0, H.264 + frame_cache",
                build_reader("lerobot", path=str(root / "video"), frame_cache=str(root / "cache")),
            ),
            ("RLDS, PNG in tfrecords", build_reader("rlds", path=str(root / "rlds"), fps=source.fps)),
            (
                "RLDS + frame_cache",
                build_reader("rlds", path=str(root / "rlds"), fps=source.fps, frame_cache=str(root / "rlds_cache")),
            ),
        ]
        frames = args.episodes * args.length
        print(
            f"{frames} frames of {args.size}x{args.size}, batch {args.batch}, {args.workers} workers, "
            f"augment={args.augment}, torch threads 1\n"
        )
        print("| dataset | first epoch (samples/s) | steady (samples/s) | CPU ms/sample, 1 process |")
        print("|---|---:|---:|---:|")
        for name, reader in rows:
            first, steady, cpu_ms = measure(reader, args)
            print(f"| {name} | {first:.0f} | {steady:.0f} | {cpu_ms:.2f} |")
        print(f"\nload average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} (other processes share the cores)")


if __name__ == "__main__":
    main()
