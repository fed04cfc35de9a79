"""Where numbers go: ``metrics.jsonl``, TensorBoard, and a progress display.

Only rank 0 writes. Values arrive as floats (the trainer syncs with the device once per
log interval, never inside a step).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsLogger:
    """One JSON object per logged step in ``metrics.jsonl``; the same scalars in TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the file reads as one run."""
        if not self.enabled or not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(r + "\n" for r in rows))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Progress:
    """tqdm bar with ETA on a TTY; periodic plain lines otherwise (CI logs, nohup)."""

    def __init__(self, total: int, initial: int, mode: str, enabled: bool = True):
        self.mode = "none" if not enabled else mode
        if self.mode == "auto":
            self.mode = "bar" if sys.stderr.isatty() else "plain"
        self.total, self.start_step, self.t0 = total, initial, time.monotonic()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, summary: dict[str, float] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if summary:
                self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in summary.items()}, refresh=False)
        elif self.mode == "plain" and summary:
            done = step - self.start_step
            rate = done / max(1e-9, time.monotonic() - self.t0)
            eta = (self.total - step) / rate if rate > 0 else float("nan")
            text = " ".join(f"{k}={v:.4g}" for k, v in summary.items())
            print(f"step {step}/{self.total} {text} eta {eta:.0f}s", flush=True)

    def write(self, text: str) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
