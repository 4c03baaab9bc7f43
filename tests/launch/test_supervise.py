"""The signal-forwarding parent (toolkit/launch/supervise.py) over a stand-in for the deepspeed
launcher: a launcher process that, like ``deepspeed.launcher.launch``, kills its ranks and exits 1
when it gets SIGTERM itself, and propagates a rank's non-zero exit code otherwise; ranks that
checkpoint and exit 75 on SIGTERM/SIGUSR1 through the real PreemptionHandler."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import subprocess_env

LAUNCHER = r'''
import signal, subprocess, sys, time
out, n, delay, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ranks = [subprocess.Popen([sys.executable, sys.argv[5], out, delay, mode]) for _ in range(n)]
def die(signum, frame):            # what deepspeed's launch.py does on SIGTERM / SIGINT
    for r in ranks:
        r.kill()
    sys.exit(1)
signal.signal(signal.SIGTERM, die)
signal.signal(signal.SIGINT, die)
while True:
    for r in ranks:
        if r.poll() not in (None, 0):
            code = r.returncode
            for o in ranks:
                o.kill()
            sys.exit(code)
    if all(r.poll() == 0 for r in ranks):
        sys.exit(0)
    time.sleep(0.05)
'''

RANK = r'''
import os, signal, sys, time
from pathlib import Path
out, delay, mode = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
time.sleep(delay)                  # start-up (imports, model loading) before the handler exists
if mode == "stubborn":             # a rank that never stops: the parent must kill it after the grace
    signal.signal(signal.SIGTERM, signal.SIG_IGN); signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM, signal.SIGUSR1])
    (out / f"ready{os.getpid()}").write_text("")
    while True:
        time.sleep(0.1)
from toolkit.engine.signals import PreemptionHandler
with PreemptionHandler() as h:
    (out / f"ready{os.getpid()}").write_text("")
    while not h.requested:
        time.sleep(0.05)
    (out / f"ckpt{os.getpid()}").write_text(h.describe())
sys.exit(75)
'''


def _start(tmp_path: Path, delay: float = 0.0, mode: str = "ok", grace: float = 120.0, ranks: int = 2):
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "rank.py").write_text(RANK)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "toolkit.launch.supervise", "--grace-seconds", str(grace), "--",
           sys.executable, str(tmp_path / "launcher.py"), str(out), str(ranks), str(delay), mode,
           str(tmp_path / "rank.py")]
    # Its own process group, so the test can signal the group as a scheduler does.
    proc = subprocess.Popen(cmd, env=subprocess_env(), start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    return proc, out


def _wait_ready(proc, out: Path, n: int, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while len(list(out.glob("ready*"))) < n:
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "the ranks never started"
        time.sleep(0.1)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_group_signal_ends_in_the_requeue_code(tmp_path, sig):
    proc, out = _start(tmp_path)
    _wait_ready(proc, out, 2)
    os.killpg(proc.pid, sig)
    log, _ = proc.communicate(timeout=120)
    # Both ranks checkpointed; the launcher never saw the signal (it would have exited 1).
    assert proc.returncode == 75, log
    names = {p.read_text() for p in out.glob("ckpt*")}
    assert len(list(out.glob("ckpt*"))) == 2 and names == {signal.Signals(sig).name}


@pytest.mark.timeout(300)
def test_a_signal_during_start_up_is_not_lost(tmp_path):
    """The ranks are still starting (no handler yet) when the signal comes: it stays pending
    instead of killing them or being dropped, and they stop at their first safe point."""
    proc, out = _start(tmp_path, delay=4.0)
    time.sleep(1.5)
    assert not list(out.glob("ready*"))
    os.killpg(proc.pid, signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, log
    assert len(list(out.glob("ckpt*"))) == 2


@pytest.mark.timeout(300)
def test_a_job_that_ignores_the_signal_is_killed_after_the_grace(tmp_path):
    proc, out = _start(tmp_path, mode="stubborn", grace=2.0, ranks=1)
    _wait_ready(proc, out, 1)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGUSR1)
    log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGKILL, log
    assert "did not exit within 2 s" in log and time.time() - t0 < 30
    time.sleep(0.5)
    # Nothing of the job is left running.
    left = subprocess.run(["pgrep", "-f", str(tmp_path / "rank.py")], capture_output=True, text=True).stdout
    assert left.strip() == ""


def test_exit_codes_pass_through(tmp_path):
    from toolkit.launch.supervise import run_supervised

    assert run_supervised([sys.executable, "-c", "import sys; sys.exit(3)"]) == 3
    assert run_supervised([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]) == 137
