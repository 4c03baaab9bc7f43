"""Output-folder locks: one job per folder, named holders, stale locks taken over."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from toolkit.errors import ToolkitError
from toolkit.utils import lock as L


def _write_lock(folder, **info):
    folder.mkdir(parents=True, exist_ok=True)
    base = {"host": socket.gethostname(), "pid": os.getpid(), "start": L._proc_start(os.getpid()), "user": "u",
            "job": "other", "since": time.time(), "heartbeat": time.time()}
    (folder / L.LOCK_NAME).write_text(json.dumps({**base, **info}))


def test_acquire_release_and_cleanup_of_a_created_folder(tmp_path):
    out = tmp_path / "run"
    lk = L.OutputLock(out, "distill").acquire()
    info = json.loads((out / L.LOCK_NAME).read_text())
    assert info["pid"] == os.getpid() and info["job"] == "distill" and lk.created
    lk.release()
    assert not (out / L.LOCK_NAME).exists() and out.is_dir()


def test_a_live_holder_on_this_host_refuses_with_its_name(tmp_path):
    out = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(out, pid=child.pid, start=L._proc_start(child.pid), job="teacher")
        with pytest.raises(L.OutputLockedError, match=rf"in use by job 'teacher' \(pid {child.pid} on host"):
            L.OutputLock(out, "distill").acquire()
        assert (out / L.LOCK_NAME).is_file()          # the holder's lock stays
    finally:
        child.kill()
        child.wait()
    # Killed: the lock is stale now and taken over.
    lk = L.OutputLock(out, "distill").acquire()
    assert json.loads((out / L.LOCK_NAME).read_text())["pid"] == os.getpid()
    lk.release()


def test_a_reused_pid_is_stale(tmp_path):
    out = tmp_path / "run"
    _write_lock(out, pid=1, start="not-the-start-time-of-pid-1")
    L.OutputLock(out, "x").acquire().release()


def test_another_hosts_lock_is_stale_only_once_its_heartbeat_is_old(tmp_path):
    out = tmp_path / "run"
    _write_lock(out, host="node-17", pid=4242, heartbeat=time.time() - 30)
    with pytest.raises(L.OutputLockedError, match="node-17"):
        L.OutputLock(out, "x").acquire()
    _write_lock(out, host="node-17", pid=4242, heartbeat=time.time() - L.STALE_S - 60)
    lk = L.OutputLock(out, "x").acquire()
    assert json.loads((out / L.LOCK_NAME).read_text())["host"] == socket.gethostname()
    lk.release()


def test_the_same_process_may_nest(tmp_path):
    out = tmp_path / "run"
    outer = L.OutputLock(out, "pipeline").acquire()
    inner = L.OutputLock(out, "eval").acquire()
    assert inner is outer
    inner.release()
    assert (out / L.LOCK_NAME).is_file()
    outer.release()
    assert not (out / L.LOCK_NAME).exists()


def test_heartbeat_refreshes_the_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(L, "HEARTBEAT_S", 0.05)
    out = tmp_path / "run"
    lk = L.OutputLock(out, "x").acquire()
    first = json.loads((out / L.LOCK_NAME).read_text())["heartbeat"]
    deadline = time.time() + 10
    while json.loads((out / L.LOCK_NAME).read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.05)
    assert json.loads((out / L.LOCK_NAME).read_text())["heartbeat"] > first
    lk.release()


def test_locked_output_removes_a_folder_it_made_for_a_refused_job(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ToolkitError):
        with L.locked_output(out, "x"):
            (out / "config.json").write_text("{}")
            raise ToolkitError("bad input")
    assert not out.exists()
    # ...but keeps one that already holds something complete, and any folder it did not make.
    with pytest.raises(ToolkitError):
        with L.locked_output(out, "x"):
            (out / "checkpoints" / "step2").mkdir(parents=True)
            (out / "checkpoints" / "step2" / "COMPLETE").write_text("{}")
            raise ToolkitError("later failure")
    assert (out / "checkpoints" / "step2" / "COMPLETE").is_file() and not (out / L.LOCK_NAME).exists()
    with pytest.raises(ToolkitError):
        with L.locked_output(out, "x"):
            raise ToolkitError("bad input")
    assert out.is_dir()


def test_other_ranks_do_not_lock(tmp_path):
    with L.locked_output(tmp_path / "run", "x", is_main=False) as lk:
        assert lk is None
    assert not (tmp_path / "run").exists()


def test_a_requeued_slurm_job_takes_over_its_earlier_runs_lock(tmp_path, monkeypatch):
    out = tmp_path / "run"
    _write_lock(out, host="node-3", pid=777, slurm_job="4242", slurm_restart=0)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(L.OutputLockedError):     # same run: a live holder on another node
        L.OutputLock(out, "x").acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    lk = L.OutputLock(out, "x").acquire()
    assert json.loads((out / L.LOCK_NAME).read_text())["slurm_restart"] == 1
    lk.release()
