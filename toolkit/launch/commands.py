"""Build the command lines and the sbatch script that start toolkit jobs on many processes/nodes.

Pure functions that return argument lists / text, so ``--dry-run`` prints exactly what would
run and tests can check the quoting. Nothing here imports torch or deepspeed.
"""
from __future__ import annotations

import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from toolkit.errors import ConfigError
from toolkit.launchers import MODULES
from toolkit.resources import python_path_entry

#: job -> script name in a checkout's launchers/ (the names srun's per-node entry takes).
SCRIPTS = {"teacher": "train_teacher.py", "distill": "distill.py", "finetune": "finetune.py", "eval": "evaluate.py",
           "pipeline": "pipeline.py"}
# Exit code a job uses after writing its checkpoint on SIGTERM/SIGUSR1; the sbatch script
# requeues the job when it sees it. Kept in sync with toolkit.engine.signals.
REQUEUE_EXIT_CODE = 75
DEFAULT_MASTER_PORT = 29500
# Rendezvous ports derived from a Slurm job id: below Linux's ephemeral range (32768-60999), so
# an outgoing connection never holds the port a job is about to listen on.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 12000, 20000


def slurm_master_port(job_id: str) -> int:
    """The rendezvous port of Slurm job ``job_id``: the same on every node of the job (and after a
    requeue), different for jobs whose ids differ by less than 20000 (two jobs sharing a node)."""
    digits = "".join(c for c in str(job_id) if c.isdigit())
    return SLURM_PORT_BASE + (int(digits) if digits else 0) % SLURM_PORT_SPAN


def default_master_port(env: Optional[Dict[str, str]] = None) -> int:
    """29500, or inside a Slurm job the port derived from its id (:func:`slurm_master_port`)."""
    import os

    job = (env if env is not None else os.environ).get("SLURM_JOB_ID")
    return slurm_master_port(job) if job else DEFAULT_MASTER_PORT


def affinity_cpus() -> List[int]:
    """The CPUs this process may run on (Slurm's, taskset's or a cgroup's restriction)."""
    import os

    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def cpu_list(cpus: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (numactl / deepspeed ``--bind_core_list`` syntax)."""
    out, run = [], []
    for c in sorted(set(cpus)):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def threads_per_rank(ranks: int, cpus: Optional[Sequence[int]] = None) -> int:
    """OMP threads for each of ``ranks`` processes sharing this process's CPUs (at least 1)."""
    n = len(cpus) if cpus is not None else len(affinity_cpus())
    return max(1, n // max(1, ranks))


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
    master_port: Optional[int] = DEFAULT_MASTER_PORT  # None: the node derives it (Slurm job id)
    node_rank: Optional[int] = None  # with no_ssh: this node's rank
    no_ssh: bool = False
    include: Optional[str] = None
    exclude: Optional[str] = None
    bind_cores: bool = False
    bind_core_list: Optional[str] = None  # with bind_cores: the CPUs to split among the ranks

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


def launcher_module(job: str) -> str:
    """The package module the deepspeed launcher runs for ``job`` (``toolkit.launchers.distill``)."""
    return f"toolkit.launchers.{MODULES[job]}"


def child_env(env: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """``env`` (default ``os.environ``) with this toolkit importable by child processes: the
    checkout root prepended to ``PYTHONPATH`` when the toolkit runs from a checkout."""
    import os

    out = dict(os.environ if env is None else env)
    entry = python_path_entry()
    if entry and entry not in out.get("PYTHONPATH", "").split(os.pathsep):
        out["PYTHONPATH"] = os.pathsep.join(x for x in (entry, out.get("PYTHONPATH", "")) if x)
    return out


def deepspeed_runner(python: Optional[str] = None) -> List[str]:
    """The deepspeed launcher of this interpreter: the ``deepspeed`` script next to it, else
    ``python -m deepspeed.launcher.runner``. (A ``deepspeed`` found elsewhere on PATH may belong
    to another environment, whose ranks would import another toolkit.)"""
    exe = python or sys.executable
    script = Path(exe).parent / "deepspeed"
    return [str(script)] if script.is_file() else [exe, "-m", "deepspeed.launcher.runner"]


def deepspeed_command(spec: LaunchSpec, python: Optional[str] = None) -> List[str]:
    """The ``deepspeed ... --module toolkit.launchers.<job> --config ... --ds_config ... key=value``
    argv. The job module ships in the package, so it runs the same from a checkout and from
    an installed wheel."""
    cmd = deepspeed_runner(python)
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
    cmd += ["--master_port", str(spec.master_port if spec.master_port is not None else default_master_port())]
    if spec.no_ssh:
        cmd += ["--no_ssh", "--node_rank", str(spec.node_rank)]
    if spec.bind_cores:
        cmd += ["--bind_cores_to_rank"]
        if spec.bind_core_list:
            cmd += ["--bind_core_list", spec.bind_core_list]
    cmd += ["--module", launcher_module(spec.job)]
    if spec.config:
        cmd += ["--config", spec.config]
    if spec.ds_config:
        cmd += ["--ds_config", spec.ds_config]
    cmd += list(spec.overrides)
    return cmd


def cpu_launch_env(spec: LaunchSpec, cpus: Optional[Sequence[int]] = None) -> Dict[str, str]:
    """On CPU machines each rank should use one thread per core it owns (PLATFORM_NOTES): without
    core binding, the CPUs of this process's affinity shared out among the node's ranks (with
    binding, the deepspeed launcher sets it from the cores it binds)."""
    env: Dict[str, str] = {}
    if not spec.bind_cores:
        env["OMP_NUM_THREADS"] = str(threads_per_rank(spec.num_gpus, cpus))
    return env


def restricted_core_list(cpus: Optional[Sequence[int]] = None, total: Optional[int] = None) -> Optional[str]:
    """``--bind_core_list`` for the deepspeed launcher when this process may use only some of the
    machine's CPUs (a Slurm task, taskset), else None (the launcher then splits all physical cores)."""
    import os

    cpus = list(cpus) if cpus is not None else affinity_cpus()
    total = total if total is not None else (os.cpu_count() or len(cpus))
    return cpu_list(cpus) if cpus and len(cpus) < total else None


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
    script_dir: str = "slurm"  # where the script lives; the requeue mark is written there too
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


def requeue_mark_dir(spec: SlurmSpec) -> str:
    """Where a node step leaves ``.requeue-<job id>`` when its ranks stopped for a preemption with a
    complete checkpoint: the script folder (absolute)."""
    d = Path(spec.script_dir)
    return str(d if d.is_absolute() else Path(spec.workdir) / d)


def render_sbatch(spec: SlurmSpec) -> str:
    """The sbatch script: #SBATCH headers, then one ``srun`` step that starts the per-node launcher
    (:mod:`toolkit.launch.node`) on every node, then the requeue decision.

    Every value that reaches a shell line is quoted with ``shlex.quote``; #SBATCH values are
    checked against a strict character set, so no option can inject shell.

    The requeue contract: the ranks stop together after SIGUSR1/SIGTERM, write a checkpoint and
    exit 75; each node step turns that 75 into exit 0 plus a mark file, so ``srun
    --kill-on-bad-exit=1`` (which keeps a crashed node from leaving the others hanging) never
    sees a "bad" exit and never turns a clean stop into 128+signal. The script requeues when
    srun returned 0 and the mark exists.
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
        # USR1 to every process of the job step shortly before the time limit: the job writes a
        # checkpoint and exits with REQUEUE_EXIT_CODE, and this script requeues it.
        h.append(f"#SBATCH --signal=USR1@{int(spec.signal_seconds)}")
    for item in spec.extra_sbatch:
        h.append(f"#SBATCH {item}")
    node_cmd = [spec.python, "-m", "toolkit.launch.node", "--num-gpus", str(spec.ntasks_per_node_ranks)]
    if L.master_port is not None:
        node_cmd += ["--master-port", str(L.master_port)]
    if spec.signal_seconds:
        node_cmd += ["--grace-seconds", str(max(10, int(spec.signal_seconds) - 5))]
    if L.bind_cores:
        node_cmd.append("--bind-cores")
    node_cmd += ["--requeue-file", "__MARK__", "--", SCRIPTS[L.job]]
    # Files that exist here are passed as absolute paths; anything else (a shipped name such
    # as zero2_bf16.json) as written, for the job to resolve.
    for flag, value in (("--config", L.config), ("--ds_config", L.ds_config)):
        if value:
            node_cmd += [flag, str(Path(value).resolve()) if Path(value).exists() else str(value)]
    node_cmd += list(L.overrides)
    checkout = python_path_entry()
    srun = " ".join(q(a) if a != "__MARK__" else '"$requeue_mark"' for a in node_cmd)
    mark_dir = requeue_mark_dir(spec)
    if spec.requeue:
        on_stop = ["  echo \"[toolkit] checkpoint written after a preemption signal; requeueing $SLURM_JOB_ID\"",
                   "  scontrol requeue \"$SLURM_JOB_ID\"", "  exit 0"]
    else:
        on_stop = ["  echo \"[toolkit] checkpoint written after a preemption signal (--no-requeue)\"",
                   f"  exit {REQUEUE_EXIT_CODE}"]
    body = [
        "",
        "# Generated by `toolkit slurm`. Re-submitting or requeueing resumes from the latest checkpoint.",
        f"cd {q(spec.workdir)}",
        *([f"export PYTHONPATH={q(checkout)}${{PYTHONPATH:+:$PYTHONPATH}}"] if checkout else []),
        f"mkdir -p {q(mark_dir)}",
        f"requeue_mark={q(mark_dir)}/.requeue-\"$SLURM_JOB_ID\"",
        "rm -f \"$requeue_mark\"",
        "echo \"[toolkit] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST\"",
        # srun (Slurm >= 22.05) does not take --cpus-per-task from the allocation: pass it on.
        "srun --kill-on-bad-exit=1 --ntasks-per-node=1 ${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK} "
        + srun,
        "rc=$?",
        "if [ \"$rc\" -eq 0 ] && [ -e \"$requeue_mark\" ]; then",
        "  rm -f \"$requeue_mark\"",
        *on_stop,
        "fi",
        "exit $rc",
        "",
    ]
    return "\n".join(h + body)
