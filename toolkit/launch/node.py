"""Per-node step of an sbatch script: ``srun python -m toolkit.launch.node ... -- SCRIPT ARGS``.

Slurm starts one copy on every node. Each copy discovers the node list, picks node 0 as the
master (at its ``NodeAddr``), writes a hostfile and runs the deepspeed launcher for its own node
(``--no_ssh --node_rank $SLURM_NODEID``), which starts the ranks of that node. Ranks are
therefore global (node rank x processes per node + local rank), and the data stream and the task
sampler shard by that global rank.

What it takes from the Slurm task:

* the rendezvous port: ``--master-port``, else derived from ``SLURM_JOB_ID`` (the same on every
  node and after a requeue; two jobs on one node do not collide);
* the CPUs: the task's affinity mask (``--cpus-per-task``) is shared out among the node's ranks:
  ``OMP_NUM_THREADS`` = CPUs / ranks, and with ``--bind-cores`` each rank is pinned inside the mask;
* the GPUs: the ranks use the devices ``CUDA_VISIBLE_DEVICES`` lists (Slurm's ``--gpus-per-node``),
  not devices ``0..N-1``, which the deepspeed launcher would pick otherwise.

The launcher runs under :func:`toolkit.launch.supervise.run_supervised`, so a preemption signal
ends in exit 75 with a checkpoint. That 75 becomes exit 0 plus the ``--requeue-file`` mark: under
``srun --kill-on-bad-exit=1`` the first node to exit 75 would otherwise get the other nodes killed
and srun would return 128+signal instead of 75.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from toolkit.launch.commands import (REQUEUE_EXIT_CODE, SCRIPTS, LaunchSpec, affinity_cpus, child_env, cpu_list,
                                     deepspeed_command, slurm_master_port, threads_per_rank)
from toolkit.launch.supervise import DEFAULT_GRACE_S, run_supervised


def slurm_hosts(env: Optional[Dict[str, str]] = None) -> List[str]:
    env = env if env is not None else dict(os.environ)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return ["localhost"]
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return [h for h in out.stdout.split() if h]


def node_address(host: str) -> str:
    """The address Slurm reaches ``host`` at (its ``NodeAddr``; the name itself when unknown)."""
    try:
        out = subprocess.run(["scontrol", "show", "node", host], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return host
    m = re.search(r"\bNodeAddr=(\S+)", out.stdout)
    return m.group(1) if m and out.returncode == 0 else host


def visible_gpus(env: Dict[str, str]) -> Optional[List[str]]:
    """The device ids in ``CUDA_VISIBLE_DEVICES`` when it lists plain indices, else None."""
    raw = env.get("CUDA_VISIBLE_DEVICES", "").strip()
    ids = [x.strip() for x in raw.split(",") if x.strip()]
    return ids if ids and all(x.isdigit() for x in ids) else None


def hosts_and_include(hosts: Sequence[str], node_rank: int, ranks: int,
                      gpus: Optional[Sequence[str]]) -> Tuple[str, Optional[str]]:
    """The hostfile text and the deepspeed ``--include`` that put this node's ranks on ``gpus``.

    Without visible GPUs: every host gets ``ranks`` slots and no include. With them: this node's
    first ``ranks`` visible ids (its slots go up to the largest id); the other nodes' ids only count
    (each node's launcher starts its own ranks on its own devices).
    """
    if gpus is None:
        return "".join(f"{h} slots={ranks}\n" for h in hosts), None
    if len(gpus) < ranks:
        from toolkit.errors import ConfigError

        raise ConfigError("gpus_per_node", f"{ranks} ranks per node asked for, but this node's task sees "
                          f"{len(gpus)} GPU(s) (CUDA_VISIBLE_DEVICES={','.join(gpus)})")
    mine = list(gpus[:ranks])
    lines, parts = [], []
    for i, h in enumerate(hosts):
        ids = mine if i == node_rank else [str(k) for k in range(ranks)]
        lines.append(f"{h} slots={max(int(x) for x in ids) + 1}\n")
        parts.append(f"{h}:{','.join(ids)}")
    return "".join(lines), "@".join(parts)


def build(a: argparse.Namespace, env: Dict[str, str]) -> Tuple[List[str], Dict[str, str]]:
    """The deepspeed command and its environment for this node."""
    hosts = slurm_hosts(env)
    node_rank = int(env.get("SLURM_NODEID", "0"))
    job = {v: k for k, v in SCRIPTS.items()}[a.script]
    args = [x for x in a.args if x != "--"]
    config = ds = None
    rest = []
    i = 0
    while i < len(args):
        if args[i] == "--config":
            config, i = args[i + 1], i + 2
        elif args[i] == "--ds_config":
            ds, i = args[i + 1], i + 2
        else:
            rest.append(args[i])
            i += 1
    port = a.master_port if a.master_port is not None else (
        slurm_master_port(env["SLURM_JOB_ID"]) if env.get("SLURM_JOB_ID") else 29500)
    cpus = affinity_cpus()
    bind_list = cpu_list(cpus) if a.bind_cores else None
    gpus = visible_gpus(env)
    common = dict(job=job, config=config, ds_config=ds, overrides=rest, master_port=port, bind_cores=a.bind_cores,
                  bind_core_list=bind_list)
    if len(hosts) > 1:
        text, include = hosts_and_include(hosts, node_rank, a.num_gpus, gpus)
        fd, hostfile = tempfile.mkstemp(prefix="toolkit-hostfile-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        spec = LaunchSpec(**common, num_nodes=1 if include else len(hosts), num_gpus=1 if include else a.num_gpus,
                          hostfile=hostfile, include=include, master_addr=node_address(hosts[0]),
                          node_rank=node_rank, no_ssh=True)
    elif gpus is not None:
        _, include = hosts_and_include(["localhost"], 0, a.num_gpus, gpus)
        spec = LaunchSpec(**common, include=include, num_gpus=1)
    else:
        spec = LaunchSpec(**common, num_gpus=a.num_gpus)
    cmd = deepspeed_command(spec)
    out = child_env(env)
    if not a.bind_cores and "OMP_NUM_THREADS" not in env:
        out["OMP_NUM_THREADS"] = str(threads_per_rank(a.num_gpus, cpus))
    return cmd, out


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m toolkit.launch.node", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-gpus", type=int, default=1, help="ranks on this node")
    p.add_argument("--master-port", type=int, default=None, help="rendezvous port (default: from SLURM_JOB_ID)")
    p.add_argument("--bind-cores", action="store_true", help="pin each rank to its share of the task's CPUs")
    p.add_argument("--grace-seconds", type=float, default=DEFAULT_GRACE_S,
                   help="after a stop signal, kill the ranks if they have not exited within this time")
    p.add_argument("--requeue-file", default=None,
                   help="on a preemption stop (exit 75) write this file and exit 0 instead")
    p.add_argument("script", help="launcher script name in launchers/ (e.g. distill.py)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    a = parse_args(argv)
    try:
        cmd, env = build(a, dict(os.environ))
    except Exception as e:  # noqa: BLE001 - one line in the job log, not a traceback
        print(f"[toolkit.launch.node] error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    node = env.get("SLURM_NODEID", "0")
    print(f"[toolkit.launch.node] node {node}: OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', '')} "
          f"{' '.join(cmd)}", flush=True)
    try:
        rc = run_supervised(cmd, env, grace_s=a.grace_seconds)
    finally:
        if "--hostfile" in cmd:
            Path(cmd[cmd.index("--hostfile") + 1]).unlink(missing_ok=True)
    if rc == REQUEUE_EXIT_CODE and a.requeue_file:
        Path(a.requeue_file).parent.mkdir(parents=True, exist_ok=True)
        Path(a.requeue_file).write_text(f"node {node}\n", encoding="utf-8")
        print(f"[toolkit.launch.node] node {node}: the ranks stopped with a checkpoint for a requeue", flush=True)
        rc = 0
    sys.exit(rc)


if __name__ == "__main__":
    main(sys.argv[1:])
