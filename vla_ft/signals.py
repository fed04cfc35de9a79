"""SIGTERM / SIGINT become a request to checkpoint at the next step boundary and exit.

Preemptible clusters send SIGTERM some seconds before killing a job; dying mid-step would
lose everything since the last periodic checkpoint.
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager: while active, SIGTERM/SIGINT set ``requested`` instead of killing."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signame = ""
        self._previous: dict[int, object] = {}

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        self.signame = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
