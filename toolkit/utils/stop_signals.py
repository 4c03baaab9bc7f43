"""The signals a scheduler uses to ask a job to stop, and how helper processes treat them.

Slurm (``--signal=USR1@N``, preemption, ``scancel``), the deepspeed launcher and most batch
systems deliver SIGTERM or SIGUSR1 to *every* process of a job: the launcher processes, the
ranks and each rank's DataLoader workers. Only the ranks may act on them (checkpoint, then
exit with the requeue code); every helper process must survive them, or a rank loses its data
workers or its launcher before the checkpoint is written.

Two tools do that without losing a signal:

* :func:`blocked` blocks the signals while a process forks helpers. A child inherits the blocked
  mask across ``fork`` and ``exec``, so a signal that arrives before the child has set up its
  own disposition stays pending instead of killing it (or being dropped, as with SIG_IGN).
* :func:`ignore_in_child` is what a helper runs first: ignore the signals, then unblock.

Nothing here imports torch; the data loader and the launch wrapper both use it.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Iterator, Sequence

#: SIGTERM: Slurm's preemption / time limit, the deepspeed launcher's stop, Kubernetes.
#: SIGUSR1: Slurm's ``--signal=USR1@seconds`` warning before the time limit.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@contextmanager
def blocked(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Block ``signals`` in the calling thread for the ``with`` body, then restore the mask.

    Signals that arrive meanwhile stay pending and are delivered when the mask is restored.
    Processes forked inside the body start with them blocked.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_in_child(*_: object, signals: Sequence[int] = STOP_SIGNALS) -> None:
    """Ignore ``signals`` in this (helper) process and unblock them; pending ones are discarded.

    Usable as a DataLoader ``worker_init_fn`` (it accepts and ignores the worker id).
    """
    for s in signals:
        signal.signal(s, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, signals)
