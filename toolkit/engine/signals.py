"""Preemption: turn SIGTERM / SIGUSR1 into a flag the training loop checks at a safe point.

Slurm sends SIGUSR1 (``--signal=USR1@120``) or SIGTERM before killing a job. The handler
only sets a flag: doing I/O or collectives inside a signal handler can deadlock. The recipe
checks ``handler.requested`` after an optimizer step, saves a checkpoint on all ranks and
exits with :data:`REQUEUE_EXIT_CODE` so a wrapper script knows to requeue.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional, Sequence

from toolkit.utils.logging import get_logger

# EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry".
REQUEUE_EXIT_CODE = 75
DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionHandler:
    """Context manager that records a preemption request instead of dying.

    Args:
        signals: signals to catch (default SIGTERM and SIGUSR1).

    Attributes:
        requested: True once one of the signals arrived.
        signum: the last signal number received, or None.
    """

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.requested = False
        self.signum: Optional[int] = None
        self._old: Dict[int, Any] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        # No I/O here: only flip the flag.
        self.requested = True
        self.signum = signum

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            # Python only allows handlers in the main thread; say so instead of failing.
            get_logger("engine.signals").warning(
                "PreemptionHandler used outside the main thread: preemption signals are not caught")
            return self
        for s in self.signals:
            self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._old.clear()

    def describe(self) -> str:
        """Human-readable name of the received signal, for the log line."""
        return signal.Signals(self.signum).name if self.signum is not None else "none"
