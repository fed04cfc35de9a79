"""Where numbers go: ``metrics.jsonl``, TensorBoard, and a progress display.

Only rank 0 writes. Values arrive as floats or 0-dim tensors; :class:`Averager` keeps
tensors on the device, so the trainer syncs with the device once per log interval, never
inside a step.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# How our JSON files (``metrics.jsonl``, ``eval/metrics.json``) spell the infinities. Strict JSON has
# no token for them and null is NaN's spelling: a loss that overflowed read back as undefined while
# TensorBoard showed inf. Strings keep the files strict JSON; Python's float(), numpy and
# JavaScript's Number() read these two.
INFINITIES = {"Infinity": math.inf, "-Infinity": -math.inf}


def json_safe(obj: Any) -> Any:
    """``obj`` as strict JSON can hold it, recursively: NaN -> null, +-inf -> "Infinity"/"-Infinity"
    (strict JSON, which other readers than Python's need). :func:`json_numbers` reads it back."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else "Infinity" if obj > 0 else "-Infinity"
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def json_numbers(obj: Any) -> Any:
    """Parsed :func:`json_safe` numbers back, recursively: null -> NaN, "Infinity"/"-Infinity" -> +-inf
    (files written before the infinities were spelled out hold null for them: NaN). For values that
    are all numbers (metrics): a null or a string "Infinity" there is a number's spelling."""
    if obj is None:
        return math.nan
    if isinstance(obj, str):
        return INFINITIES.get(obj, obj)
    if isinstance(obj, dict):
        return {k: json_numbers(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_numbers(v) for v in obj]
    return obj


def row_line(row: dict[str, Any]) -> str:
    """A ``metrics.jsonl`` line (no newline): strict JSON, NaN as null, +-inf as "Infinity"/"-Infinity"."""
    return json.dumps(json_safe(row))


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl`` (:func:`json_numbers`), and a row a crash cut short is skipped.
    ``path``: a str or a Path, as :func:`vla_ft.evaluate.read_report` takes."""
    path, rows = Path(path), []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        rows.append(json_numbers(row))
    return rows


class Averager:
    """Per-key running means of scalars that may arrive on some steps only (e.g. ``gradnorm/*``
    every N steps): each key is divided by its own count, not by the number of steps.

    A ``metric/*`` value that is NaN (undefined for that batch, e.g. transition accuracy without
    a transition) is left out of its mean; any other NaN (a loss) shows in the mean. ``weights``
    may give a key its own 0-dim weight per :meth:`add` (a loss term left out of the steps whose
    batches held none of its elements, ``vla_ft.train.StepResult.defined``).
    """

    def __init__(self) -> None:
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, values: dict[str, Any], weights: dict[str, torch.Tensor] | None = None) -> None:
        for k, v in values.items():
            if v is None:
                continue
            v = v.detach() if isinstance(v, torch.Tensor) else v
            weight: Any = (weights or {}).get(k)  # 0-dim bools stay on the device: no sync
            if weight is None and k.startswith("metric/") and isinstance(v, torch.Tensor):
                weight = torch.isfinite(v)
            if weight is None:
                weight = 1
            else:
                v = torch.where(weight, v, 0.0)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + weight

    def mean_values(self) -> dict[str, Any]:
        """Means as they are (tensors stay on the device: no sync)."""
        return {k: v / self.counts[k] for k, v in self.sums.items()}

    def means(self) -> dict[str, float]:
        """Host floats: the one device sync of a log interval."""
        return {k: float(v) for k, v in self.mean_values().items()}

    def __bool__(self) -> bool:
        return bool(self.sums)

    def state_dict(self) -> dict[str, list[Any]]:
        """``{key: [sum, count, dtype]}`` as JSON values (a host sync). A float32 or bf16 sum is
        exact as a Python float, so a loaded sum adds up to the bits it would have had."""
        return {k: [float(v), _number(self.counts[k]), _dtype_name(v)] for k, v in self.sums.items()}

    def load_state_dict(self, state: dict[str, list[Any]], device: torch.device) -> None:
        self.sums = {
            k: torch.tensor(v, dtype=getattr(torch, t), device=device) if t else v for k, (v, _, t) in state.items()
        }
        self.counts = {k: c for k, (_, c, _) in state.items()}


def _number(value: Any) -> Any:
    return value.item() if isinstance(value, torch.Tensor) else value


def _dtype_name(value: Any) -> str | None:
    return str(value.dtype).removeprefix("torch.") if isinstance(value, torch.Tensor) else None


class TrainWindow:
    """What happened since the last train log line: values, samples, time spent waiting for data.

    Its time is training time: validation and checkpoints run :meth:`paused`, so throughput and
    MFU do not drop in the window after them. A checkpoint keeps the window (:meth:`state_dict`),
    its FLOPs included: the first row after a resume covers every step since the last row (its
    samples, time and FLOPs alike), as without the stop.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.values = Averager()
        self.samples = 0
        self.wait_s = 0.0
        self.carried_s = 0.0  # training seconds of the window before a resume
        self.flops: Any = None  # this process's model FLOPs (vla_ft.flops.FlopMeter adds them; None without one)
        self.start_clock()

    def start_clock(self) -> None:
        """Training starts now: the time since the window opened (building the run) is not training."""
        self.paused_s = 0.0
        self.t0 = time.perf_counter()

    @contextlib.contextmanager
    def paused(self, device: torch.device) -> Iterator[None]:
        """Leave the block's time out of the window. The device first finishes the training work
        already queued, which stays in the window."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            self.paused_s += time.perf_counter() - start

    def perf(self, elapsed: float) -> dict[str, float]:
        """``perf/samples_per_s`` and ``perf/data_wait_frac`` (share of training time spent waiting
        for batches) over ``elapsed`` training seconds (:meth:`elapsed`)."""
        elapsed = max(elapsed, 1e-9)
        return {"perf/samples_per_s": self.samples / elapsed, "perf/data_wait_frac": self.wait_s / elapsed}

    def elapsed(self) -> float:
        """Seconds of training since the window opened."""
        return time.perf_counter() - self.t0 - self.paused_s + self.carried_s

    def state_dict(self) -> dict[str, Any]:
        return {
            "values": self.values.state_dict(),
            "samples": self.samples,
            "wait_s": self.wait_s,
            "elapsed_s": self.elapsed(),
            "flops": None if self.flops is None else float(self.flops),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.reset()
        self.values.load_state_dict(state["values"], device)
        self.samples, self.wait_s, self.carried_s = state["samples"], state["wait_s"], state["elapsed_s"]
        self.flops = state.get("flops")  # older checkpoints lack it


def mean_window(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The saved windows of several ranks as one, for a resume on another number of processes:
    each value's sum and count are the mean over the ranks (samples are global already)."""
    keys = dict.fromkeys(k for s in states for k in s["values"])
    values = {}
    for k in keys:
        have = [s["values"][k] for s in states if k in s["values"]]
        values[k] = [sum(v[0] for v in have) / len(have), sum(v[1] for v in have) / len(have), have[0][2]]
    return {**states[0], "values": values}


class MetricsLogger:
    """One JSON object per logged step in ``metrics.jsonl``; the same scalars in TensorBoard and,
    with ``wandb`` (``logging.wandb``), in a Weights & Biases run whose config is ``config``.

    The TensorBoard writer is opened on first use so that a resumed run can tell it where
    the checkpoint was (``purge_step``): TensorBoard then hides the stale events the crashed
    run wrote after it, as ``truncate_after`` does for ``metrics.jsonl``. The W&B run is opened at
    once (a W&B login or network problem stops the run before it computes anything), with an id kept
    in ``<run_dir>/wandb_id.txt``, so a resume continues the same run (W&B keeps the first value it got
    for a step: rows a crashed attempt logged after its last checkpoint stay there, unlike in the two files).
    """

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool,
        enabled: bool = True,
        wandb: Any = None,
        config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.run_dir = run_dir
        self.path = run_dir / "metrics.jsonl"
        self.tensorboard = enabled and tensorboard
        self.writer = None
        self.purge_step: int | None = None
        self.replay: list[dict[str, Any]] = []  # kept rows at purge_step, written again to a new writer
        self.wandb = wandb if enabled and wandb is not None and wandb.enabled else None
        self.wandb_config = config
        self.wandb_run = None
        if self.wandb is not None:  # before any compute: a W&B login or network problem shows at once
            self._wandb_run()

    def log(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(row_line({"step": step, **values}) + "\n")
        if self.tensorboard:
            writer = self._writer()
            for key, value in values.items():
                writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self._wandb_run().log(values, step=step)

    def _wandb_run(self):
        if self.wandb_run is None:
            import wandb

            cfg, id_file = self.wandb, self.run_dir / "wandb_id.txt"
            if not id_file.exists():
                id_file.write_text(uuid.uuid4().hex[:8] + "\n")  # W&B's id alphabet: [a-z0-9]
            self.wandb_run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name or self.run_dir.resolve().name,
                group=cfg.group,
                tags=list(cfg.tags) or None,
                config=self.wandb_config,
                dir=str(self.run_dir),
                id=id_file.read_text().strip(),
                resume="allow",
            )
        return self.wandb_run

    def _writer(self):
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            log_dir = self.run_dir / "tensorboard"
            _wait_past_the_newest_event_file(log_dir)
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=self.purge_step)
            for row in self.replay:
                for key, value in row.items():
                    if key != "step":
                        self.writer.add_scalar(key, value, row["step"])
        return self.writer

    def start_fresh(self) -> Path | None:
        """A run starting at step 0 in a directory an earlier run logged to before its first
        checkpoint (``setup`` refuses a directory with checkpoints unless resuming): its rows move
        to ``metrics.<time>.jsonl`` (nothing is deleted) and TensorBoard hides its events.
        Returns where the old rows went, or None."""
        self.purge_step = 1
        if not self.enabled or not self.path.exists():
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        old, n = self.path.with_name(f"metrics.{stamp}.jsonl"), 0
        while old.exists():  # two fresh starts in one second: neither log is overwritten
            n += 1
            old = self.path.with_name(f"metrics.{stamp}-{n}.jsonl")
        self.path.rename(old)
        return old

    def truncate_after(self, step: int, skipped: int | None = None) -> None:
        """On resume, drop rows logged after the checkpoint so the file reads as one run.

        A skip is logged at the step of the last update (``signals.record_skip``), so skips right
        after the checkpoint (a halt on consecutive skips, then a resume) have its step; with the
        checkpoint's ``skipped`` count, a row counting more skips than that is dropped too. TensorBoard
        can only hide whole steps: then it hides the checkpoint's step too and is given its kept rows again."""
        self.purge_step = step + 1
        if not self.enabled or not self.path.exists():
            return
        rows, dropped = [], []
        for line in self.path.read_text().splitlines():
            (dropped if _after(line, step, skipped) else rows).append(line)
        if any(_step_of(line) == step for line in dropped):
            self.purge_step = step
            self.replay = [json_numbers(json.loads(line)) for line in rows if _step_of(line) == step]
        from vla_ft.checkpoint import write_atomically

        write_atomically(self.path, "".join(r + "\n" for r in rows))  # a crash here keeps the log

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _wait_past_the_newest_event_file(log_dir: Path) -> None:
    """Sleep (under a second) until the clock is past the second the newest event file was opened in.

    Why: TensorBoard reads a run's event files in name order, ``events.out.tfevents.<second>.<host>.<pid>.<n>``.
    Within one second, pid and the per-process counter n compare as text and need not follow the opening
    order (n 9 then 10, pid 999 then 1000): a writer opened in the second of the one before it (a quick
    resume) could be read first, and its purge of a crashed run's stale steps then hid nothing."""
    names = [p.name.split(".") for p in log_dir.glob("events.out.tfevents.*")]
    newest = max((int(n[3]) for n in names if n[3].isdigit()), default=None)
    if newest is not None:
        time.sleep(max(0.0, newest + 1 - time.time()))


def _after(line: str, step: int, skipped: int | None) -> bool:
    """Whether a metrics row was logged after a checkpoint at ``step`` holding ``skipped`` skips."""
    if _step_of(line) != step or skipped is None:
        return _step_of(line) > step
    return json.loads(line).get("fault/nonfinite_skips", 0) > skipped


def _step_of(line: str) -> float:
    """A metrics row's step; a line a crash cut short (or an empty one) counts as after every step."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class Progress:
    """tqdm bar with ETA on a TTY; plain lines (step, values, ETA) every log interval otherwise
    (CI logs, nohup, Slurm output files, where a bar would print one line per refresh)."""

    def __init__(self, total: int, initial: int, mode: str, enabled: bool = True, stream: Any = None):
        self.stream = stream if stream is not None else sys.stderr
        self.mode = "none" if not enabled else mode
        if self.mode == "auto":
            self.mode = "bar" if self.stream.isatty() else "plain"
        self.total, self.start_step, self.t0 = total, initial, time.monotonic()
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=self.stream)

    def eta_s(self, step: int) -> float:
        """Seconds left at the average rate since this process started (nan before the first step)."""
        rate = (step - self.start_step) / max(1e-9, time.monotonic() - self.t0)
        return (self.total - step) / rate if rate > 0 else math.nan

    def update(self, step: int, summary: dict[str, float] | None = None) -> None:
        """Advance to ``step``; ``summary`` (given at log steps) is shown next to the bar / printed."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if summary:
                self.bar.set_postfix({k.split("/")[-1]: f"{v:.4g}" for k, v in summary.items()}, refresh=False)
        elif self.mode == "plain" and summary:
            text = " ".join(f"{k}={v:.4g}" for k, v in summary.items())
            print(f"step {step}/{self.total} {text} eta {format_eta(self.eta_s(step))}", file=sys.stdout, flush=True)

    def write(self, text: str) -> None:
        if self.mode == "none":
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def format_eta(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s`` or ``?``."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def summary_line(values: dict[str, float], best: float | None, best_metric: str) -> str:
    """The closing line: is the policy better than always predicting the mean action?"""
    if "val/action_l1" not in values:
        return "done (no validation episodes)"
    l1, base = values["val/action_l1"], values["val/baseline_l1"]
    text = f"held-out action L1 {l1:.4g} vs mean-action baseline {base:.4g} ({l1 / max(base, 1e-12):.0%} of baseline)"
    if "val/gripper_acc" in values:
        text += f", gripper accuracy {values['val/gripper_acc']:.1%}"
    if best is not None:
        text += f"; best {best_metric} {best:.4g}"
    return text
