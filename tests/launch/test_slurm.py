"""`toolkit slurm` against a real Slurm on localhost (Debian's slurm-wlm + munge).

The fixture starts munged, slurmctld and slurmd with a one-node configuration in a temporary
folder and stops them afterwards. Where Slurm cannot start (packages missing, not root), the
tests skip and say why. CI installs the packages (.ci/run).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import subprocess_env
import yaml

pytestmark = pytest.mark.slurm

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "munged")


def _which(name: str):
    return shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [b for b in BINARIES if not _which(b)]
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if os.geteuid() != 0:
        pytest.skip("starting slurmctld/slurmd for the test needs root")
    d = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname()
    for sub in ("spool", "state"):
        (d / sub).mkdir()
    conf = d / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=toolkittest", f"SlurmctldHost={host}", "AuthType=auth/munge", "SlurmUser=root",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SchedulerType=sched/backfill",
        "SelectType=select/cons_tres", f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
        f"SlurmdSpoolDir={d}/spool", f"StateSaveLocation={d}/state", f"SlurmctldLogFile={d}/slurmctld.log",
        f"SlurmdLogFile={d}/slurmd.log", f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        "ReturnToService=2", "JobRequeue=1", "MinJobAge=3600", "KillWait=10",
        f"NodeName={host} CPUs={os.cpu_count()} RealMemory=4000 State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""]))
    env = subprocess_env(SLURM_CONF=str(conf))
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        subprocess.run(["chown", "munge:munge", "/run/munge"], check=False)
        r = subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", _which("munged")], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"munged would not start: {r.stderr.strip()}")
    for daemon in ("slurmctld", "slurmd"):
        r = subprocess.run([_which(daemon), "-f", str(conf)], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"{daemon} would not start: {r.stderr.strip()}")
    deadline = time.time() + 60
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True).stdout
        if "idle" in out:
            break
        time.sleep(1)
    else:
        log = (d / "slurmctld.log").read_text()[-2000:] if (d / "slurmctld.log").exists() else ""
        _stop(d)
        pytest.skip(f"the Slurm node never became idle: {log}")
    yield env
    _stop(d)


def _stop(d: Path) -> None:
    for pid_file in ("slurmd.pid", "slurmctld.pid"):
        p = d / pid_file
        if p.is_file():
            try:
                os.kill(int(p.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
    time.sleep(1)


def _job_state(env, job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    m = re.search(r"JobState=(\w+)", out)
    return m.group(1) if m else "UNKNOWN"


def _wait(env, job_id: str, states=("COMPLETED",), timeout=300) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = _job_state(env, job_id)
        if st in states or st in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
            return st
        time.sleep(1)
    return _job_state(env, job_id)


def _distill_job(tmp_path: Path, teacher: Path, corpus: Path, steps: int, save_every: int) -> Path:
    y = tmp_path / "job.yaml"
    y.write_text(yaml.safe_dump({
        "teacher": str(teacher), "output_dir": str(tmp_path / "out"), "max_steps": steps, "log_every": 1,
        "save_every": save_every, "cpu_accel": "off",
        "corpus": {"sources": [str(corpus / "*.txt")], "seq_length": 32, "shuffle_buffer": 8, "num_workers": 0},
        "student": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64},
        "loss": {"num_relation_heads": 8}}))
    return y


def _submit(env, tmp_path: Path, y: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "toolkit", "slurm", "distill", "--config", str(y),
                        "--ds-config", "cpu_fp32.json", "--ranks-per-node", "1", "--cpus-per-task", "1",
                        "--script-dir", str(tmp_path / "slurm"), "--output", str(tmp_path / "slurm" / "job-%j.out"),
                        "--master-port", str(_free_port()), "--time", "10:00"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[0]
    assert job_id.isdigit(), r.stdout
    return job_id


def _train_steps(out: Path):
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(l)["step"] for l in f.read_text().splitlines() if '"prefix": "train"' in l]


def test_sbatch_distillation_runs_to_completion(slurm, tiny_bert4_dir, fixture_corpus, tmp_path):
    y = _distill_job(tmp_path, tiny_bert4_dir, fixture_corpus, steps=5, save_every=0)
    job_id = _submit(slurm, tmp_path, y)
    state = _wait(slurm, job_id)
    log = "\n".join(p.read_text() for p in (tmp_path / "slurm").glob("job-*.out"))
    assert state == "COMPLETED", log[-4000:]
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert m["steps"] == 5
    assert (tmp_path / "out" / "student" / "config.json").is_file()


def test_requeued_job_resumes_and_finishes(slurm, tiny_bert4_dir, fixture_corpus, tmp_path):
    steps = 300
    y = _distill_job(tmp_path, tiny_bert4_dir, fixture_corpus, steps=steps, save_every=10)
    out = tmp_path / "out"
    job_id = _submit(slurm, tmp_path, y)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoints" / "latest").is_file():
        if _job_state(slurm, job_id) in ("COMPLETED", "FAILED"):
            break
        time.sleep(0.5)
    seen = _train_steps(out)
    assert seen and max(seen) < steps, "the job finished before it could be requeued"
    r = subprocess.run(["scontrol", "requeue", job_id], env=slurm, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    state = _wait(slurm, job_id, timeout=400)
    log = "\n".join(p.read_text() for p in (tmp_path / "slurm").glob("job-*.out"))
    assert state == "COMPLETED", log[-4000:]
    assert "restart 1" in log and "resumed from step" in log
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == steps and m["samples"] == steps * 8
    assert (out / "student" / "config.json").is_file()
