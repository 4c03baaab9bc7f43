"""A signal-forwarding parent for the deepspeed launcher: the requeue exit code survives a preemption.

``python -m toolkit.launch.supervise [--grace-seconds N] -- deepspeed launchers/distill.py ...``
(``toolkit launch`` and the per-node step of ``toolkit slurm`` run their deepspeed command this way).

Why it is needed. A scheduler delivers SIGTERM or SIGUSR1 to the whole process group (or, under
Slurm, to every process of the job step). The deepspeed launcher then does the wrong thing for a
job that can checkpoint: ``deepspeed`` itself dies at once of the signal; its per-node
``deepspeed.launcher.launch`` sends SIGTERM to the ranks, kills them 30 s later and exits 1,
whatever the ranks did. Yet it does propagate a rank's own exit code when the ranks exit first.

What this parent does:

* it starts the command in a session of its own with SIGTERM and SIGUSR1 *blocked*: the
  launcher processes inherit the mask and never act on those signals (they stay pending),
  while the ranks unblock them when they install their handler
  (:class:`toolkit.engine.signals.PreemptionHandler`), so a signal that arrives during their
  start-up is delivered then instead of being lost, and their DataLoader workers ignore them
  (:mod:`toolkit.utils.stop_signals`);
* on SIGTERM or SIGUSR1 it forwards that signal to the command's process group. The ranks agree
  on a step, write a checkpoint and exit with the requeue code 75; the launcher passes it up, and
  this parent exits with it;
* if the command is still running ``grace`` seconds after the first such signal, or on a second
  SIGINT, it kills the process group. A first SIGINT (Ctrl-C) is forwarded as SIGINT, which the
  deepspeed launcher turns into stopping its ranks, as without this parent.

It imports neither torch nor deepspeed.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import List, Mapping, Optional, Sequence

from toolkit.utils.stop_signals import STOP_SIGNALS, blocked

#: Seconds the ranks get to checkpoint and exit after a forwarded stop signal.
DEFAULT_GRACE_S = 300.0


def _exit_code(returncode: int) -> int:
    """A Popen return code as a shell reports it (killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_supervised(cmd: Sequence[str], env: Optional[Mapping[str, str]] = None,
                   grace_s: float = DEFAULT_GRACE_S, poll_s: float = 0.2) -> int:
    """Run ``cmd`` as described in the module docstring; returns its exit code (75 after a
    preemption the ranks handled)."""
    received: List[int] = []
    handlers = {s: signal.getsignal(s) for s in (*STOP_SIGNALS, signal.SIGINT)}

    def on_signal(signum: int, frame: object) -> None:
        received.append(signum)

    with blocked(STOP_SIGNALS):
        # The child (and everything it starts) inherits the blocked mask; signals that reach this
        # process before the handlers below exist stay pending and are forwarded afterwards.
        child = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None, start_new_session=True)
        for s in handlers:
            signal.signal(s, on_signal)
    pgid = child.pid
    forwarded = 0
    deadline: Optional[float] = None
    interrupts = 0
    try:
        while True:
            try:
                child.wait(timeout=poll_s)
                break
            except subprocess.TimeoutExpired:
                pass
            while forwarded < len(received):
                sig = received[forwarded]
                forwarded += 1
                if sig == signal.SIGINT:
                    interrupts += 1
                    _killpg(pgid, signal.SIGKILL if interrupts > 1 else signal.SIGINT)
                else:
                    _killpg(pgid, sig)
                if deadline is None:
                    deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                print(f"[toolkit.launch.supervise] the job did not exit within {grace_s:g} s of the stop signal; "
                      "killing it", file=sys.stderr, flush=True)
                _killpg(pgid, signal.SIGKILL)
                child.wait()
                break
    finally:
        # Helpers of a rank that outlived it (DataLoader workers exit on their own a few seconds
        # after their rank) are not left behind.
        _killpg(pgid, signal.SIGKILL)
        for s, h in handlers.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
    return _exit_code(child.returncode)


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="python -m toolkit.launch.supervise", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grace-seconds", type=float, default=DEFAULT_GRACE_S,
                   help="kill the job this long after a stop signal if it has not exited")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="the command, after --")
    a = p.parse_args(argv)
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    if not cmd:
        p.error("give the command to run after --")
    sys.exit(run_supervised(cmd, grace_s=a.grace_seconds))


if __name__ == "__main__":
    main(sys.argv[1:])
