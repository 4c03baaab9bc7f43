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


def test_nested_handlers_share_one_request():
    """The job entry point's handler (outer) catches a signal that comes before the recipe's own;
    the recipe's handler (inner) sees it, and a signal caught inside reaches the outer one too."""
    with PreemptionHandler() as outer:
        os.kill(os.getpid(), signal.SIGTERM)
        assert _wait_for(lambda: outer.requested)
        with PreemptionHandler() as inner:
            assert inner.requested and inner.signum == signal.SIGTERM
    with PreemptionHandler() as outer:
        with PreemptionHandler() as inner:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert _wait_for(lambda: inner.requested)
        assert outer.requested and outer.signum == signal.SIGUSR1
        assert signal.getsignal(signal.SIGUSR1) == outer._handle


def test_a_blocked_signal_is_delivered_when_the_handler_is_installed(tmp_path):
    """Processes started by toolkit launch / toolkit slurm begin with the stop signals blocked (the
    mask is inherited across exec); one sent before the handler exists is pending, not lost. In a
    fresh process: blocking in one thread of pytest would not keep the signal from its other threads."""
    import subprocess
    import sys

    from conftest import subprocess_env

    code = (
        "import os, signal, sys, time\n"
        "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGUSR1])\n"
        "os.kill(os.getpid(), signal.SIGUSR1)\n"
        "time.sleep(0.2)\n"   # pending: the default action would end the process here
        "from toolkit.engine.signals import PreemptionHandler\n"
        "with PreemptionHandler() as h:\n"
        "    for _ in range(100):\n"
        "        if h.requested: break\n"
        "        time.sleep(0.01)\n"
        "sys.exit(0 if h.requested and h.describe() == 'SIGUSR1' else 3)\n")
    r = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dataloader_workers_survive_a_stop_signal(fixture_corpus, tok):
    """Schedulers signal every process of a job, the rank's DataLoader workers included: they ignore
    it, so the rank keeps its batches and can checkpoint."""
    import psutil

    from toolkit.data import build_loader
    from toolkit.data.corpus import CorpusConfig

    cfg = CorpusConfig(sources=[str(fixture_corpus / "*.txt")], seq_length=32, shuffle_buffer=8, num_workers=2,
                       epochs=1)
    loader = build_loader(cfg, tok, batch_size=4)
    with PreemptionHandler() as h:
        it = iter(loader)
        first = next(it)
        workers = [c for c in psutil.Process().children() if c.is_running()]
        assert len(workers) >= 2
        for w in workers:
            w.send_signal(signal.SIGTERM)
            w.send_signal(signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)   # the rank itself only records it
        rest = list(it)
        assert h.requested
    assert first["input_ids"].shape[0] == 4 and len(rest) > 5
