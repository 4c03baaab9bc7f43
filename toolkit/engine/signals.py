"""Preemption: turn SIGTERM / SIGUSR1 into a flag the training loop checks at a safe point.

Slurm sends SIGUSR1 (``--signal=USR1@120``) or SIGTERM before killing a job. The handler
only sets a flag: doing I/O or collectives inside a signal handler can deadlock. The recipe
checks the flag after an optimizer step, *agrees* on it with every rank (one all-reduce: a
signal may reach some ranks only, or reach them a step apart), saves a checkpoint on all ranks
and exits with :data:`REQUEUE_EXIT_CODE` so a wrapper script knows to requeue.

Handlers nest: the job entry points (``launchers/*.py``, the ``toolkit`` CLI) install one for the
whole process as early as they can, so a signal that arrives while the job is still importing
or loading models is remembered; the recipes' own handler inside it sees that request and
stops at its first safe point. The signals are unblocked when a handler is installed: a process
started by ``toolkit launch`` / ``toolkit slurm`` starts with them blocked (see
:mod:`toolkit.utils.stop_signals`), so one that arrived during start-up is delivered then.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Dict, Optional, Sequence

from toolkit.utils.logging import get_logger
from toolkit.utils.stop_signals import STOP_SIGNALS

# EX_TEMPFAIL from sysexits.h: "temporary failure; the user is invited to retry".
REQUEUE_EXIT_CODE = 75
DEFAULT_SIGNALS = STOP_SIGNALS


class PreemptionHandler:
    """Context manager that records a preemption request instead of dying.

    Args:
        signals: signals to catch (default SIGTERM and SIGUSR1).

    Attributes:
        requested: True once one of the signals arrived (here or in an enclosing handler).
        signum: the last signal number received, or None.
    """

    def __init__(self, signals: Sequence[int] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self._requested = False
        self._signum: Optional[int] = None
        self._outer: Optional["PreemptionHandler"] = None
        self._old: Dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self._requested or (self._outer is not None and self._outer.requested)

    @property
    def signum(self) -> Optional[int]:
        if self._signum is not None:
            return self._signum
        return self._outer.signum if self._outer is not None else None

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        # No I/O here: only flip the flag (and the enclosing handler's, which outlives this one).
        self._requested = True
        self._signum = signum
        if self._outer is not None:
            self._outer._handle(signum, frame)

    def __enter__(self) -> "PreemptionHandler":
        if threading.current_thread() is not threading.main_thread():
            # Python only allows handlers in the main thread; say so instead of failing.
            get_logger("engine.signals").warning(
                "PreemptionHandler used outside the main thread: preemption signals are not caught")
            return self
        for s in self.signals:
            old = signal.signal(s, self._handle)
            self._old[s] = old
            owner = getattr(old, "__self__", None)
            if isinstance(owner, PreemptionHandler) and owner is not self:
                self._outer = owner
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old if old is not None else signal.SIG_DFL)
        self._old.clear()

    def describe(self) -> str:
        """Human-readable name of the received signal, for the log line."""
        return signal.Signals(self.signum).name if self.signum is not None else "none"
