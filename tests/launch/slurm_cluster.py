"""A real two-node Slurm cluster on this machine, for the ``slurm`` tests.

Debian's slurm-wlm (22.05) runs several ``slurmd`` on one host in its multiple-slurmd mode: each
node gets its own name, port, spool, pid and log file (``%n``), and all share ``NodeAddr``
127.0.0.1. The fixture starts munged (when it is not running), ``slurmctld`` and ``slurmd -N n1`` /
``slurmd -N n2`` from a configuration in a temporary folder, waits until both nodes are idle, and
stops the daemons by their pid files at the end. It needs root and the packages (``apt-get install
-y slurm-wlm munge``; .ci/run installs them). Without them the tests skip and say why, except
under ``CI=true``, where they fail.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator

import pytest

from conftest import subprocess_env

BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "scancel", "sinfo", "munged")
NODES = ("n1", "n2")


def which(name: str):
    return shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)


def unavailable(reason: str) -> None:
    """Skip, or under CI=true fail: CI installs Slurm, so a cluster that cannot start is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Slurm cluster unavailable under CI: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_munge() -> None:
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode == 0:
        return
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    subprocess.run(["chown", "munge:munge", "/run/munge"], check=False)
    r = subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", which("munged")], capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"munged would not start: {r.stderr.strip() or r.stdout.strip()}")


def write_conf(d: Path) -> Path:
    (d / "spool").mkdir(exist_ok=True)
    (d / "state").mkdir(exist_ok=True)
    lines = [
        "ClusterName=toolkittest", f"SlurmctldHost={socket.gethostname()}", "SlurmctldAddr=127.0.0.1",
        "AuthType=auth/munge", "SlurmUser=root", "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SchedulerType=sched/backfill", "SelectType=select/cons_tres", f"SlurmctldPort={_free_port()}",
        f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmctldLogFile={d}/slurmctld.log", f"StateSaveLocation={d}/state",
        f"SlurmdPidFile={d}/slurmd-%n.pid", f"SlurmdSpoolDir={d}/spool/%n", f"SlurmdLogFile={d}/slurmd-%n.log",
        "ReturnToService=2", "JobRequeue=1", "MinJobAge=3600", "KillWait=30",
    ]
    for n in NODES:
        lines.append(f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={_free_port()} CPUs=1 "
                     "RealMemory=4000 State=UNKNOWN")
    lines += [f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP", ""]
    conf = d / "slurm.conf"
    conf.write_text("\n".join(lines))
    return conf


def _stop(d: Path, env: Dict[str, str]) -> None:
    subprocess.run(["scancel", "--user", "root"], env=env, capture_output=True)
    time.sleep(1)
    for pid_file in [*(d / f"slurmd-{n}.pid" for n in NODES), d / "slurmctld.pid"]:
        if pid_file.is_file():
            try:
                os.kill(int(pid_file.read_text().strip()), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
    time.sleep(1)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[Dict[str, str]]:
    """The environment (``SLURM_CONF``) of a running two-node cluster, nodes n1 and n2."""
    missing = [b for b in BINARIES if not which(b)]
    if missing:
        unavailable(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install -y slurm-wlm munge")
    if os.geteuid() != 0:
        unavailable("starting slurmctld/slurmd for the test needs root")
    d = tmp_path_factory.mktemp("slurm")
    conf = write_conf(d)
    env = subprocess_env(SLURM_CONF=str(conf))
    _start_munge()
    r = subprocess.run([which("slurmctld"), "-f", str(conf)], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        unavailable(f"slurmctld would not start: {r.stderr.strip()}")
    for n in NODES:
        r = subprocess.run([which("slurmd"), "-f", str(conf), "-N", n], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            _stop(d, env)
            unavailable(f"slurmd -N {n} would not start: {r.stderr.strip()}")
    deadline = time.time() + 90
    while time.time() < deadline:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=env, capture_output=True, text=True).stdout
        if sum(1 for line in out.splitlines() if line.split()[-1:] == ["idle"]) == len(NODES):
            break
        time.sleep(1)
    else:
        logs = "\n".join(p.read_text()[-1500:] for p in d.glob("*.log"))
        _stop(d, env)
        unavailable(f"the Slurm nodes never became idle: {out}\n{logs}")
    yield env
    _stop(d, env)


def job_state(env: Dict[str, str], job_id: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], env=env, capture_output=True, text=True).stdout
    m = re.search(r"JobState=(\w+)", out)
    return m.group(1) if m else "UNKNOWN"


FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "PREEMPTED")


def wait_job(env: Dict[str, str], job_id: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        st = job_state(env, job_id)
        if st in FINAL:
            return st
        time.sleep(1)
    return job_state(env, job_id)
