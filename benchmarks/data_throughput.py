"""Data-loading throughput of robot_data: samples/s through a DataLoader, per dataset kind.

    python benchmarks/data_throughput.py                      # defaults below, prints a table
    python benchmarks/data_throughput.py --workers 4 --size 224 --episodes 40

The synthetic task is written to disk as LeRobot v3.0 (PNG images in parquet, and H.264 MP4)
at ``--size`` pixels, then read back through RobotDataset + DataLoader (workers, persistent
workers, pinned memory off: CPU). "first epoch" includes worker start-up and cold caches;
"steady" is a second pass. The video dataset is also timed with the decoded-frame cache. The
last column is the CPU cost of one sample in one process, which other load does not change.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from robot_data import Normalizer, RobotDataset, SyntheticReader, build_reader, collate, compute_stats
from robot_data.lerobot_writer import write_lerobot


def _epoch(loader: DataLoader) -> tuple[int, float]:
    start, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["index"])
    return n, time.perf_counter() - start


def cpu_ms_per_sample(ds: RobotDataset, n: int = 200) -> float:
    """CPU time of __getitem__ in this process (warm caches): unlike samples/s, it does not
    depend on what else runs on the machine."""
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].tolist()
    for i in order:  # warm: file caches, open containers, frame cache entries
        ds[i]
    start = time.process_time()
    for i in order:
        ds[i]
    return (time.process_time() - start) / len(order) * 1e3


def measure(reader, args: argparse.Namespace) -> tuple[float, float, float]:
    """(first-epoch samples/s, steady-state samples/s, CPU ms per sample)."""
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
        prompt_tokenizer=None,
        augment=augment,
        train=True,
    )
    loader = DataLoader(
        ds,
        batch_size=args.batch,
        shuffle=True,
        num_workers=args.workers,
        collate_fn=collate,
        persistent_workers=args.workers > 0,
        pin_memory=False,
        prefetch_factor=4 if args.workers > 0 else None,
    )
    n, first = _epoch(loader)
    n2, steady = _epoch(loader)
    return n / first, n2 / steady, cpu_ms_per_sample(ds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--size", type=int, default=224, help="stored and model image size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--augment", action="store_true", help="random resized crop + colour jitter")
    args = parser.parse_args()
    torch.set_num_threads(1)
    source = SyntheticReader(episodes=args.episodes, episode_length=args.length, image_size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_lerobot(source, root / "images", video=False)
        write_lerobot(source, root / "video", video=True, codec="h264")
        rows = [
            ("synthetic, rendered in memory", source),
            ("LeRobot v3.0, PNG in parquet", build_reader("lerobot", path=str(root / "images"))),
            ("LeRobot v3.0, H.264 MP4", build_reader("lerobot", path=str(root / "video"))),
            (
                "LeRobot v3.0, H.264 + frame_cache",
                build_reader("lerobot", path=str(root / "video"), frame_cache=str(root / "cache")),
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
