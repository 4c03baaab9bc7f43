"""Per-node entry used inside an sbatch script: ``srun python -m toolkit.launch.node ... -- SCRIPT ARGS``.

Slurm starts one copy on every node. Each copy discovers the node list, picks node 0 as the
master, writes a hostfile, and execs the deepspeed launcher for its own node (``--no_ssh
--node_rank $SLURM_NODEID``), which starts the ranks of that node. Ranks are therefore
global (node_rank x processes per node + local rank), and the data stream and the task
sampler shard by that global rank.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
from typing import List

from toolkit.launch.commands import SCRIPTS, LaunchSpec, child_env, deepspeed_command


def slurm_hosts() -> List[str]:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        return ["localhost"]
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True)
    return [h for h in out.stdout.split() if h]


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--num-gpus", type=int, default=1, help="ranks on this node")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--bind-cores", action="store_true")
    p.add_argument("script", help="the job's launcher script name (e.g. distill.py: toolkit.launchers.distill)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    a = p.parse_args(argv)
    hosts = slurm_hosts()
    node_rank = int(os.environ.get("SLURM_NODEID", "0"))
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
    if len(hosts) > 1:
        fd, hostfile = tempfile.mkstemp(prefix="toolkit-hostfile-", suffix=".txt")
        with os.fdopen(fd, "w") as f:
            f.write("".join(f"{h} slots={a.num_gpus}\n" for h in hosts))
        spec = LaunchSpec(job=job, config=config, ds_config=ds, overrides=rest, num_nodes=len(hosts),
                          num_gpus=a.num_gpus, hostfile=hostfile, master_addr=hosts[0], master_port=a.master_port,
                          node_rank=node_rank, no_ssh=True, bind_cores=a.bind_cores)
    else:
        spec = LaunchSpec(job=job, config=config, ds_config=ds, overrides=rest, num_gpus=a.num_gpus,
                          master_port=a.master_port, bind_cores=a.bind_cores)
    cmd = deepspeed_command(spec)
    env = child_env()
    if not a.bind_cores and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, a.num_gpus)))
    # Slurm's --signal=USR1 reaches every process of the step. The launcher processes must
    # ignore it (the default action would kill them); the ranks install their own handler.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    print(f"[toolkit.launch.node] node {node_rank}/{len(hosts)}: {' '.join(cmd)}", flush=True)
    os.execvpe(cmd[0], cmd, env)


if __name__ == "__main__":
    main(sys.argv[1:])
