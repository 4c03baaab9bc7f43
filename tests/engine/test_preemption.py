"""PreemptionHandler turns SIGUSR1/SIGTERM into a flag and restores the old handlers."""
from __future__ import annotations

import os
import signal
import time

from toolkit.engine.signals import REQUEUE_EXIT_CODE, PreemptionHandler


def _wait_for(pred, timeout=2.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_sigusr1_sets_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as h:
        assert not h.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert _wait_for(lambda: h.requested)
        assert h.signum == signal.SIGUSR1 and h.describe() == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) == before


def test_sigterm_does_not_kill_inside_handler():
    with PreemptionHandler() as h:
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: h.requested)
        assert h.signum == signal.SIGTERM


def test_requeue_exit_code_is_distinct():
    assert REQUEUE_EXIT_CODE not in (0, 1, 2) and 0 < REQUEUE_EXIT_CODE < 128
