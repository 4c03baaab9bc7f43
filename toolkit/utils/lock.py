"""One job per output folder: a lock file that names its holder, and stale-lock takeover.

A job holds ``<output_dir>/.lock`` while it writes there (in a multi-rank job, rank 0 holds
it for all ranks). The file is JSON: host, pid, the process's start time, user, job and a
heartbeat time that a background thread refreshes every :data:`HEARTBEAT_S` seconds.

A second job on the same folder stops with :class:`OutputLockedError`, which names the
holder. A lock left by a job that was killed is recognised and taken over:

* same host: the holder's pid is gone, or belongs to a process started at another time
  (the pid was reused);
* another host (a shared filesystem), where the pid cannot be checked: its heartbeat is
  older than :data:`STALE_S` seconds. A live holder refreshes it every :data:`HEARTBEAT_S`
  seconds, so this takes the hosts' clocks to agree within a few minutes (NTP on a
  cluster). Until then the error says how old the heartbeat is and when it counts as stale;
* a Slurm job requeued after a preemption (on any node): the lock names the same
  ``SLURM_JOB_ID`` with a lower ``SLURM_RESTART_COUNT``, i.e. an earlier run of this job.

The same process may take a lock it already holds (in-process nested jobs share a folder).
"""
from __future__ import annotations

import contextlib
import getpass
import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

from toolkit.errors import ToolkitError

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0

_HELD: Dict[str, "OutputLock"] = {}
_HELD_GUARD = threading.Lock()


class OutputLockedError(ToolkitError):
    """Another live job writes to this output folder."""


def _proc_start(pid: int) -> Optional[str]:
    """The start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(")") + 2:].split()
    return fields[19] if len(fields) > 19 else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # exists, owned by someone else
    return True


def _restart_count() -> int:
    v = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(v) if v.isdigit() else 0


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


class OutputLock:
    """The lock of one output folder (see the module docstring).

    Args:
        folder: the output folder; created if missing (see :attr:`created`).
        job: the job's name, shown to a second job.
    """

    def __init__(self, folder: Union[str, Path], job: str):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.job = job
        self.created = False
        self._depth = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._info: Dict[str, Any] = {}

    # -- the lock file ------------------------------------------------------------------
    def _mine(self) -> Dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "start": _proc_start(os.getpid()),
                "user": _user(), "job": self.job, "since": time.time(), "heartbeat": time.time(),
                "slurm_job": os.environ.get("SLURM_JOB_ID"), "slurm_restart": _restart_count()}

    def _read(self) -> Optional[Dict[str, Any]]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}   # unreadable or half-written: judged by the file's age below

    def _write_new(self) -> bool:
        """Create the lock file if there is none (O_EXCL); False when one exists."""
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self._info, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._info["heartbeat"] = time.time()
            tmp = self.path.with_name(f"{LOCK_NAME}.beat{os.getpid()}")
            try:
                cur = self._read()
                if cur is not None and cur.get("pid") == self._info["pid"] and cur.get("host") == self._info["host"]:
                    tmp.write_text(json.dumps(self._info), encoding="utf-8")
                    os.replace(tmp, self.path)
            except OSError:
                pass

    def stale_reason(self, info: Dict[str, Any]) -> Optional[str]:
        """Why the lock described by ``info`` is stale, or None while its holder may be alive."""
        host, pid = info.get("host"), info.get("pid")
        slurm_job = os.environ.get("SLURM_JOB_ID")
        if info and slurm_job and info.get("slurm_job") == slurm_job \
                and int(info.get("slurm_restart") or 0) < _restart_count():
            return f"it was taken by an earlier run of this Slurm job ({slurm_job}, requeued since)"
        if not info:
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return "it disappeared"
            return f"it is unreadable and {age:.0f} s old" if age > STALE_S else None
        if host == socket.gethostname() and isinstance(pid, int):
            if not _pid_alive(pid):
                return f"process {pid} on this host is gone"
            start = _proc_start(pid)
            if info.get("start") is not None and start is not None and start != info.get("start"):
                return f"process {pid} on this host is another process now (the pid was reused)"
            return None
        age = time.time() - float(info.get("heartbeat") or 0.0)
        if age > STALE_S:
            return f"its holder on host {host} has not refreshed it for {age:.0f} s (> {STALE_S:.0f} s)"
        return None

    def _describe(self, info: Dict[str, Any]) -> str:
        if not info:
            return "an unreadable lock file"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("since") or 0)))
        return (f"job '{info.get('job')}' (pid {info.get('pid')} on host {info.get('host')}, user {info.get('user')}, "
                f"since {since})")

    def _take_over(self, info: Dict[str, Any], reason: str) -> bool:
        """Move the stale lock aside and create ours; False when another job got there first."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._write_new()
        try:
            moved = json.loads(aside.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            moved = {}
        if moved != info:
            # Someone replaced the stale lock with a live one between our read and the rename:
            # put theirs back (link never overwrites) and report it as held.
            try:
                os.link(aside, self.path)
            except OSError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        from toolkit.utils.logging import get_logger

        get_logger(__name__).warning("%s: taking over a stale lock of %s: %s", self.folder, self._describe(info),
                                     reason)
        return self._write_new()

    # -- public -------------------------------------------------------------------------
    def acquire(self) -> "OutputLock":
        """Take the lock, or raise :class:`OutputLockedError` naming the live holder."""
        key = str(self.folder.resolve())
        with _HELD_GUARD:
            held = _HELD.get(key)
            if held is not None:
                held._depth += 1
                return held
        if self.folder.exists() and not self.folder.is_dir():
            raise ToolkitError(f"{self.folder}: the output folder is a file; give a folder path as output_dir")
        if not self.folder.exists():
            try:
                self.folder.mkdir(parents=True)
            except FileExistsError:
                pass
            except OSError as e:
                raise ToolkitError(f"{self.folder}: cannot create the output folder: {e.strerror}") from None
            else:
                self.created = True
        self._info = self._mine()
        for _ in range(5):
            if self._write_new():
                break
            info = self._read()
            if info is None:
                continue
            reason = self.stale_reason(info)
            if reason is None:
                self._cleanup_created()
                raise OutputLockedError(
                    f"{self.folder}: the output folder is in use by {self._describe(info)}; wait for it to end, "
                    f"or give another output_dir (if that job is dead, delete {self.path}; a lock from this host "
                    f"is taken over once its process is gone, one from another host once its heartbeat is "
                    f"{STALE_S:.0f} s old)")
            if self._take_over(info, reason):
                break
        else:
            self._cleanup_created()
            raise OutputLockedError(f"{self.folder}: could not take the lock {self.path} (other jobs keep taking it)")
        self._depth = 1
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
        self._thread.start()
        with _HELD_GUARD:
            _HELD[key] = self
        return self

    def _cleanup_created(self) -> None:
        if self.created:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.created = False

    def release(self) -> None:
        """Drop one hold; the last one stops the heartbeat and removes the lock file."""
        self._depth -= 1
        if self._depth > 0:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with _HELD_GUARD:
            _HELD.pop(str(self.folder.resolve()), None)
        cur = self._read()
        if cur is not None and cur.get("pid") == os.getpid() and cur.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)


def _worth_keeping(folder: Path) -> bool:
    """True when ``folder`` holds something a re-run can use: a complete checkpoint, a published
    folder or a finished pipeline stage."""
    for _, _, files in os.walk(folder):
        if {"COMPLETE", "COMPLETE.json", "STAGE_COMPLETE.json"} & set(files):
            return True
    return False


@contextlib.contextmanager
def locked_output(folder: Union[str, Path], job: str, is_main: bool = True) -> Iterator[Optional[OutputLock]]:
    """Hold ``folder``'s lock for the block (rank 0 only: other ranks get None).

    When the block fails on bad input (a :class:`ToolkitError`) and this job created the folder,
    the folder is removed unless it already holds something complete: a job refused for its
    input leaves no half-made output folder behind.
    """
    if not is_main:
        yield None
        return
    lock = OutputLock(folder, job).acquire()
    outermost = lock._depth == 1
    try:
        yield lock
    except ToolkitError:
        if outermost and lock.created and not _worth_keeping(lock.folder):
            lock.release()
            shutil.rmtree(lock.folder, ignore_errors=True)
            raise
        lock.release()
        raise
    except BaseException:
        lock.release()
        raise
    else:
        lock.release()
