"""``toolkit launch`` and ``toolkit slurm``: run any job across processes and nodes."""
from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click

from toolkit.errors import ToolkitError
from toolkit.launch.commands import (SCRIPTS, LaunchSpec, SlurmSpec, child_env, cpu_launch_env, default_master_port,
                                     deepspeed_command, render_sbatch, restricted_core_list, visible_gpu_include)
from toolkit.launch.supervise import DEFAULT_GRACE_S, run_supervised


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / no driver: treat as a CPU machine
        return 0


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("job", type=click.Choice(sorted(SCRIPTS)))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", default=None, help="Job YAML passed to the job.")
@click.option("--ds-config", "ds_config", default=None, help="DeepSpeed JSON passed to the job.")
@click.option("--num-nodes", type=int, default=1, show_default=True, help="Nodes to use (needs --hostfile when > 1).")
@click.option("--num-gpus", type=int, default=None,
              help="Processes per node: GPUs per node, or CPU ranks on a CPU machine (default: all GPUs, or 1).")
@click.option("--hostfile", default=None, help="DeepSpeed hostfile: one 'hostname slots=N' per line.")
@click.option("--master-addr", default=None, help="Address of node 0 (default: inferred by the launcher).")
@click.option("--master-port", type=int, default=None,
              help="Rendezvous port on node 0 (default: 29500, or inside a Slurm job one derived from its id).")
@click.option("--node-rank", type=int, default=None, help="With --no-ssh: the rank of this node.")
@click.option("--no-ssh", is_flag=True, help="Start only this node's ranks (run once per node, e.g. by a scheduler).")
@click.option("--include", default=None, help="Hosts/slots to use, deepspeed syntax (host1@host2:0,2).")
@click.option("--exclude", default=None, help="Hosts/slots to leave out, deepspeed syntax.")
@click.option("--bind-cores/--no-bind-cores", default=None,
              help="Pin each rank to its own cores (default on CPU machines when numactl exists).")
@click.option("--grace-seconds", type=float, default=DEFAULT_GRACE_S, show_default=True,
              help="After SIGTERM/SIGUSR1, kill the ranks if they have not checkpointed and exited within this time.")
@click.option("--dry-run", is_flag=True, help="Print the exact command and exit.")
def launch(job, overrides, config, ds_config, num_nodes, num_gpus, hostfile, master_addr, master_port, node_rank,
           no_ssh, include, exclude, bind_cores, grace_seconds, dry_run):  # noqa: ANN001
    """Run JOB through the deepspeed launcher on one node or many.

    SIGTERM or SIGUSR1 (to this process or its process group) makes the ranks agree on a step,
    write a checkpoint and exit; this command then exits 75, the requeue code.
    """
    gpus = _gpu_count()
    try:
        if gpus and not (include or exclude or hostfile) and num_nodes == 1:
            # Respect CUDA_VISIBLE_DEVICES: the launcher would drop it on --num_gpus.
            visible = visible_gpu_include(num_gpus)
            if visible:
                include, num_gpus = visible, 1
        if num_gpus is None:
            num_gpus = gpus or 1
        if bind_cores is None:
            bind_cores = gpus == 0 and shutil.which("numactl") is not None and num_gpus > 1
        spec = LaunchSpec(job=job, config=config, ds_config=ds_config, overrides=overrides, num_nodes=num_nodes,
                          num_gpus=num_gpus, hostfile=hostfile, master_addr=master_addr,
                          master_port=master_port if master_port is not None else default_master_port(),
                          node_rank=node_rank, no_ssh=no_ssh, include=include, exclude=exclude, bind_cores=bind_cores,
                          bind_core_list=restricted_core_list() if bind_cores else None)
    except ToolkitError as e:
        _fail(e)
    cmd = deepspeed_command(spec)
    env_extra = cpu_launch_env(spec) if gpus == 0 else {}
    shown = " ".join(f"{k}={v}" for k, v in env_extra.items()) + (" " if env_extra else "")
    if dry_run:
        click.echo(shown + " ".join(shlex.quote(c) for c in cmd))
        return
    sys.exit(run_supervised(cmd, {**child_env(), **env_extra}, grace_s=grace_seconds))


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("job", type=click.Choice(sorted(SCRIPTS)))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", default=None, help="Job YAML passed to the job.")
@click.option("--ds-config", "ds_config", default=None, help="DeepSpeed JSON passed to the job.")
@click.option("--nodes", type=int, default=1, show_default=True, help="Nodes (#SBATCH --nodes).")
@click.option("--gpus-per-node", type=int, default=0, show_default=True,
              help="GPUs per node (#SBATCH --gpus-per-node); also the ranks per node when > 0.")
@click.option("--ranks-per-node", type=int, default=None, help="Ranks per node on CPU nodes (default: GPUs or 1).")
@click.option("--cpus-per-task", type=int, default=None,
              help="CPUs of each node's task (#SBATCH --cpus-per-task, passed on to srun); the node's ranks share them.")
@click.option("--mem", default=None, help="#SBATCH --mem (e.g. 64G).")
@click.option("--partition", default=None, help="#SBATCH --partition.")
@click.option("--account", default=None, help="#SBATCH --account.")
@click.option("--time", "time_limit", default=None, help="#SBATCH --time (e.g. 24:00:00).")
@click.option("--job-name", default=None, help="#SBATCH --job-name (default: toolkit-JOB).")
@click.option("--output", default=None, help="#SBATCH --output (default: slurm/JOB-%j.out).")
@click.option("--error", default=None, help="#SBATCH --error (default: with --output).")
@click.option("--signal-seconds", type=int, default=120, show_default=True,
              help="Send USR1 this long before the time limit; the job checkpoints and is requeued.")
@click.option("--no-requeue", is_flag=True, help="Do not requeue after a preemption signal.")
@click.option("--master-port", type=int, default=None,
              help="Rendezvous port on node 0 (default: derived from the job id, so jobs sharing a node differ).")
@click.option("--sbatch-arg", multiple=True, help="Extra #SBATCH line, e.g. --sbatch-arg=--constraint=a100.")
@click.option("--script-dir", default="slurm", show_default=True, help="Where the rendered script is written.")
@click.option("--dry-run", is_flag=True, help="Print the sbatch script instead of submitting it.")
def slurm(job, overrides, config, ds_config, nodes, gpus_per_node, ranks_per_node, cpus_per_task, mem, partition,
          account, time_limit, job_name, output, error, signal_seconds, no_requeue, master_port, sbatch_arg,
          script_dir, dry_run):  # noqa: ANN001
    """Render an sbatch script for JOB and submit it (prints the job id)."""
    try:
        launch_spec = LaunchSpec(job=job, config=config, ds_config=ds_config, overrides=overrides,
                                 num_gpus=ranks_per_node or gpus_per_node or 1, master_port=master_port,
                                 bind_cores=False)
        spec = SlurmSpec(launch=launch_spec, nodes=nodes, gpus_per_node=gpus_per_node,
                         ntasks_per_node_ranks=ranks_per_node or gpus_per_node or 1, cpus_per_task=cpus_per_task,
                         mem=mem, partition=partition, account=account, time=time_limit,
                         job_name=job_name or f"toolkit-{job}", output=output or f"{script_dir}/{job}-%j.out",
                         error=error, signal_seconds=signal_seconds, requeue=not no_requeue,
                         extra_sbatch=list(sbatch_arg), script_dir=script_dir)
    except ToolkitError as e:
        _fail(e)
    text = render_sbatch(spec)
    if dry_run:
        click.echo(text, nl=False)
        return
    if shutil.which("sbatch") is None:
        _fail(ToolkitError("sbatch is not on PATH: run this on a Slurm login node, or use --dry-run to get the script"))
    d = Path(script_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{job}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
    path.write_text(text, encoding="utf-8")
    res = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        _fail(ToolkitError(f"sbatch refused {path}: {res.stderr.strip() or res.stdout.strip()}"))
    job_id = res.stdout.strip().split(";")[0]
    click.echo(job_id)
    click.echo(f"submitted {path} as job {job_id}", err=True)
