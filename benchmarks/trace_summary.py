"""Where a profiled training step's GPU time goes, read from a Chrome trace
(``train_throughput.py --diagnose --trace trace.json`` writes one of three steps).

Prints the kernel time per step by kind, inductor's largest fused kernels, the largest
kernels of any kind (calls per step, time per call), how many GPU operations a step runs,
host-to-device copies from pageable memory (each one waits for all queued GPU work), and the
GPU's idle gaps grouped by the kernels on either side:

    python benchmarks/trace_summary.py benchmarks/raw/s4_call7_vla_full_trace.json.gz --steps 3
"""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from pathlib import Path

KINDS = (  # first match wins
    ("matmul (cuBLAS)", ("nvjet", "gemm", "cutlass", "splitK")),
    ("attention (cuDNN)", ("sdpa", "cudnn")),
    ("MasterAdamW update", ("_adamw_kernel",)),
    ("MasterAdamW norm", ("_sumsq_kernel",)),
    ("inductor fused kernels", ("triton_",)),
)


def kind(name: str) -> str:
    return next((label for label, keys in KINDS if any(k in name for k in keys)), "other")


def load_gpu_events(path: Path) -> list[dict]:
    """Kernels, copies and memsets of the trace, by start time."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    return sorted(gpu, key=lambda e: e["ts"])


def idle_gaps(gpu: list[dict], min_us: float) -> Counter:
    """Idle time (us) between the end of the GPU's work so far and the next event, keyed by
    (the event that ended last, the next event), for gaps of at least ``min_us``."""
    gaps: Counter = Counter()
    end, last = gpu[0]["ts"] + gpu[0]["dur"], gpu[0]
    for e in gpu[1:]:
        if e["ts"] - end >= min_us:
            gaps[(last["name"][:50], e["name"][:50])] += e["ts"] - end
        if e["ts"] + e["dur"] > end:
            end, last = e["ts"] + e["dur"], e
    return gaps


def summary(path: Path, steps: int, top: int = 8) -> str:
    gpu = load_gpu_events(path)
    by_kind, fused, by_name, calls = Counter(), Counter(), Counter(), Counter()
    for e in gpu:
        by_kind[kind(e["name"])] += e["dur"]
        by_name[e["name"]] += e["dur"]
        calls[e["name"]] += 1
        if e["name"].startswith("triton_"):
            fused[e["name"]] += e["dur"]
    per_step = {k: v / 1e3 / steps for k, v in by_kind.items()}
    lines = [f"GPU time per step (ms), {steps} steps of {path.name}:"]
    lines += [f"  {v:7.2f}  {k}" for k, v in sorted(per_step.items(), key=lambda kv: -kv[1])]
    lines.append(f"  {sum(per_step.values()):7.2f}  total")
    lines.append("largest inductor kernels (ms per step):")
    lines += [f"  {v / 1e3 / steps:7.2f}  {k[:100]}" for k, v in fused.most_common(top)]
    lines.append("largest kernels of any kind (ms per step, calls per step, us per call):")
    lines += [
        f"  {v / 1e3 / steps:7.2f}  {calls[k] / steps:6.1f}  {v / calls[k]:7.1f}  {k[:90]}"
        for k, v in by_name.most_common(top)
    ]
    memsets = sum(1 for e in gpu if e.get("cat") == "gpu_memset")
    lines.append(
        f"GPU operations per step: {len(gpu) / steps:g} (kernels, copies, memsets; memsets {memsets / steps:g})"
    )
    pageable = sum(1 for e in gpu if "Pageable" in e["name"])
    lines.append(f"host-to-device copies from pageable memory: {pageable / steps:g} per step")
    gaps = idle_gaps(gpu, 10.0)
    lines.append(f"GPU idle in gaps >= 10 us: {sum(gaps.values()) / 1e3 / steps:.2f} ms per step; largest:")
    lines += [f"  {v / 1e3 / steps:7.2f}  {a} -> {b}" for (a, b), v in gaps.most_common(top)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path, help="Chrome trace (.json or .json.gz)")
    p.add_argument("--steps", type=int, default=3, help="training steps the trace holds")
    p.add_argument("--top", type=int, default=8, help="rows of each largest-first list")
    args = p.parse_args(argv)
    text = summary(args.trace, args.steps, args.top)
    print(text)
    return text


if __name__ == "__main__":
    main()
