"""Build the command lines and the sbatch script that start toolkit jobs on many processes/nodes.

Pure functions that return argument lists / text, so ``--dry-run`` prints exactly what would
run and tests can check the quoting. Nothing here imports torch or deepspeed.
"""
from __future__ import annotations

import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from toolkit.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = {"teacher": "train_teacher.py", "distill": "distill.py", "finetune": "finetune.py", "eval": "evaluate.py",
           "pipeline": "pipeline.py"}
# Exit code a job uses after writing its checkpoint on SIGTERM/SIGUSR1; the sbatch script
# requeues the job when it sees it. Kept in sync with toolkit.engine.signals.
REQUEUE_EXIT_CODE = 75


@dataclass
class LaunchSpec:
    """How to start one job under the deepspeed launcher."""

    job: str
    config: Optional[str] = None
    ds_config: Optional[str] = None
    overrides: Sequence[str] = ()
    num_nodes: int = 1
    num_gpus: int = 1  # processes per node (GPUs, or CPU ranks on a CPU machine)
    hostfile: Optional[str] = None
    master_addr: Optional[str] = None
    master_port: int = 29500
    node_rank: Optional[int] = None  # with no_ssh: this node's rank
    no_ssh: bool = False
    include: Optional[str] = None
    exclude: Optional[str] = None
    bind_cores: bool = False

    def __post_init__(self) -> None:
        if self.job not in SCRIPTS:
            raise ConfigError("job", f"unknown job {self.job!r}; one of {', '.join(SCRIPTS)}")
        if self.num_nodes < 1:
            raise ConfigError("num_nodes", "must be >= 1")
        if self.num_gpus < 1:
            raise ConfigError("num_gpus", "must be >= 1")
        if (self.include or self.exclude) and (self.num_nodes > 1 or self.num_gpus > 1):
            raise ConfigError("include", "--include/--exclude can't be combined with --num_nodes/--num_gpus "
                              "(the deepspeed launcher refuses it); pick hosts with one or the other")
        if self.num_nodes > 1 and not self.hostfile:
            raise ConfigError("hostfile", f"--num-nodes {self.num_nodes} needs a --hostfile listing the nodes "
                              "('host slots=N' per line)")
        if self.no_ssh and self.node_rank is None:
            raise ConfigError("node_rank", "--no-ssh launches one node at a time and needs --node-rank")
        if self.no_ssh and not self.master_addr:
            raise ConfigError("master_addr", "--no-ssh needs --master-addr (the address of node 0)")


def visible_gpu_include(num_gpus: Optional[int], env: Optional[Dict[str, str]] = None) -> Optional[str]:
    """``--include localhost:<ids>`` for the GPUs ``CUDA_VISIBLE_DEVICES`` lists (the first
    ``num_gpus`` of them; all when None), or None when it is unset or not plain indices.

    The deepspeed launcher drops ``CUDA_VISIBLE_DEVICES`` whenever ``--num_gpus`` is passed and
    starts ranks on devices ``0..N-1``, which may be another job's GPUs.
    """
    import os

    raw = (env if env is not None else os.environ).get("CUDA_VISIBLE_DEVICES", "").strip()
    ids = [x.strip() for x in raw.split(",") if x.strip()]
    if not ids or not all(x.isdigit() for x in ids):
        return None
    if num_gpus is not None and num_gpus > len(ids):
        raise ConfigError("num_gpus", f"{num_gpus} ranks per node asked for, but CUDA_VISIBLE_DEVICES={raw} "
                          f"lists {len(ids)} GPU(s); ask for at most {len(ids)} or widen CUDA_VISIBLE_DEVICES")
    return "localhost:" + ",".join(ids[:num_gpus] if num_gpus is not None else ids)


def deepspeed_command(spec: LaunchSpec, python: Optional[str] = None) -> List[str]:
    """The ``deepspeed ... launchers/<job>.py --config ... --ds_config ... key=value`` argv."""
    ds = shutil.which("deepspeed")
    cmd = [ds] if ds else [python or sys.executable, "-m", "deepspeed.launcher.runner"]
    if spec.hostfile:
        cmd += ["--hostfile", spec.hostfile]
    if spec.include:
        cmd += ["--include", spec.include]
    if spec.exclude:
        cmd += ["--exclude", spec.exclude]
    if not (spec.include or spec.exclude):
        if spec.hostfile:
            cmd += ["--num_nodes", str(spec.num_nodes)]
        cmd += ["--num_gpus", str(spec.num_gpus)]
    if spec.master_addr:
        cmd += ["--master_addr", spec.master_addr]
    cmd += ["--master_port", str(spec.master_port)]
    if spec.no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(spec.node_rank)]
    if spec.bind_cores:
        cmd += ["--bind_cores_to_rank"]
    cmd.append(str(REPO_ROOT / "launchers" / SCRIPTS[spec.job]))
    if spec.config:
        cmd += ["--config", spec.config]
    if spec.ds_config:
        cmd += ["--ds_config", spec.ds_config]
    cmd += list(spec.overrides)
    return cmd


def cpu_launch_env(spec: LaunchSpec) -> Dict[str, str]:
    """On CPU machines each rank should use one thread per core it owns (more oversubscribes the cores)."""
    env: Dict[str, str] = {}
    if not spec.bind_cores:
        env["OMP_NUM_THREADS"] = "1"
    return env


# -- Slurm -----------------------------------------------------------------------------------
_SAFE_HEADER = re.compile(r"^[A-Za-z0-9_.:@%/+,=\-]+$")


@dataclass
class SlurmSpec:
    """Resources and paths of one sbatch submission."""

    launch: LaunchSpec
    nodes: int = 1
    gpus_per_node: int = 0
    ntasks_per_node_ranks: int = 1  # processes (ranks) per node started by the deepspeed launcher
    cpus_per_task: Optional[int] = None
    mem: Optional[str] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None
    job_name: str = "toolkit"
    output: str = "slurm-%j.out"
    error: Optional[str] = None
    signal_seconds: int = 120
    requeue: bool = True
    extra_sbatch: Sequence[str] = field(default_factory=list)
    python: str = field(default_factory=lambda: sys.executable)
    workdir: str = field(default_factory=lambda: str(Path.cwd()))

    def __post_init__(self) -> None:
        for name in ("mem", "partition", "account", "time", "job_name", "output", "error"):
            val = getattr(self, name)
            if val is not None and not _SAFE_HEADER.match(str(val)):
                raise ConfigError(name, f"{val!r} has characters Slurm does not accept in #SBATCH {name} "
                                  "(letters, digits and _.:@%/+,=- only)")
        for item in self.extra_sbatch:
            if "\n" in item or "\r" in item or not item.startswith("--"):
                raise ConfigError("sbatch_arg", f"{item!r}: give one --option=value per --sbatch-arg")
        if self.nodes < 1:
            raise ConfigError("nodes", "must be >= 1")


def render_sbatch(spec: SlurmSpec) -> str:
    """The sbatch script: #SBATCH headers, node discovery, one launch line per node via srun.

    Every value that reaches a shell line is quoted with ``shlex.quote``; #SBATCH values are
    checked against a strict character set, so no option can inject shell.
    """
    q = shlex.quote
    L = spec.launch
    h = ["#!/bin/bash", f"#SBATCH --job-name={spec.job_name}", f"#SBATCH --nodes={spec.nodes}",
         "#SBATCH --ntasks-per-node=1"]
    if spec.gpus_per_node:
        h.append(f"#SBATCH --gpus-per-node={int(spec.gpus_per_node)}")
    if spec.cpus_per_task:
        h.append(f"#SBATCH --cpus-per-task={int(spec.cpus_per_task)}")
    for name, flag in (("mem", "mem"), ("partition", "partition"), ("account", "account"), ("time", "time")):
        val = getattr(spec, name)
        if val:
            h.append(f"#SBATCH --{flag}={val}")
    h.append(f"#SBATCH --output={spec.output}")
    if spec.error:
        h.append(f"#SBATCH --error={spec.error}")
    h.append("#SBATCH --open-mode=append")
    if spec.requeue:
        h.append("#SBATCH --requeue")
    if spec.signal_seconds:
        # USR1 to every task of the job step shortly before the time limit: the job writes a
        # checkpoint and exits with REQUEUE_EXIT_CODE, and this script requeues it.
        h.append(f"#SBATCH --signal=USR1@{int(spec.signal_seconds)}")
    for item in spec.extra_sbatch:
        h.append(f"#SBATCH {item}")
    node_cmd = [spec.python, "-m", "toolkit.launch.node", "--num-gpus", str(spec.ntasks_per_node_ranks),
                "--master-port", str(L.master_port)]
    if L.bind_cores:
        node_cmd.append("--bind-cores")
    node_cmd += ["--", SCRIPTS[L.job]]
    if L.config:
        node_cmd += ["--config", str(Path(L.config).resolve())]
    if L.ds_config:
        ds = Path(L.ds_config)
        node_cmd += ["--ds_config", str(ds.resolve()) if ds.exists() else str(L.ds_config)]
    node_cmd += list(L.overrides)
    body = [
        "",
        "# Generated by `toolkit slurm`. Re-submitting or requeueing resumes from the latest checkpoint.",
        f"cd {q(spec.workdir)}",
        f"export PYTHONPATH={q(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
        "echo \"[toolkit] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST\"",
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 " + " ".join(q(a) for a in node_cmd),
        "rc=$?",
        f"if [ \"$rc\" -eq {REQUEUE_EXIT_CODE} ]; then",
        "  echo \"[toolkit] checkpoint written after a preemption signal; requeueing $SLURM_JOB_ID\"",
        "  scontrol requeue \"$SLURM_JOB_ID\"",
        "  exit 0",
        "fi",
        "exit $rc",
        "",
    ]
    return "\n".join(h + body)
