"""Faults the loop reacts to without dying: SIGTERM/SIGINT, and non-finite steps.

Preemptible clusters send SIGTERM some seconds before killing a job; dying mid-step would
lose everything since the last periodic checkpoint, so a signal becomes a request to
checkpoint at the next step boundary and exit cleanly. A second SIGINT (an impatient
Ctrl-C) interrupts at once.

A step whose loss or gradient is not finite is skipped (no optimizer or scheduler step),
counted and logged; after ``train.max_consecutive_skips`` in a row the run halts with a
message naming the step, the samples and the learning rates.
"""

from __future__ import annotations

import signal
import threading
from typing import TYPE_CHECKING

import torch

from vla_ft import optim

if TYPE_CHECKING:
    from vla_ft.run_setup import Run


class TrainingHalted(RuntimeError):
    """Too many consecutive non-finite steps; the message names step, samples and LR."""


class StopRequest:
    """Context manager: while active, SIGTERM/SIGINT set ``requested`` instead of killing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signame = ""
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: object) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: the user does not want to wait for the step
        self.requested = True
        self.signame = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def record_skip(run: Run, group: list[dict[str, torch.Tensor]]) -> None:
    """Count and log a skipped non-finite step; halt after ``train.max_consecutive_skips`` in a row."""
    st = run.state
    st.skipped += 1
    st.consecutive_skips += 1
    run.logger.log(st.step, {"fault/nonfinite_skips": float(st.skipped)})
    run.progress.write(
        f"step {st.step + 1}: non-finite loss or gradient, step skipped ({st.consecutive_skips} in a row)"
    )
    if st.consecutive_skips >= run.recipe.train.max_consecutive_skips:
        ids = [(int(e), int(f)) for b in group for e, f in zip(b["episode_index"], b["frame_index"], strict=True)]
        shown = ", ".join(f"ep{e}/f{f}" for e, f in ids[:16]) + (" ..." if len(ids) > 16 else "")
        # The LRs of the skipped update (a deferred step is read after the next one's were set).
        lrs = ", ".join(f"{k}={v:.3g}" for k, v in optim.lrs_at(run.recipe, run.optimizer, st.step).items())
        raise TrainingHalted(
            f"halted at step {st.step + 1} after {st.consecutive_skips} consecutive non-finite steps "
            f"(train.max_consecutive_skips); {lrs}; last batch (episode/frame): {shown}"
        )
