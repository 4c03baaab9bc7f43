"""`toolkit launch` / `toolkit slurm` command rendering: exact commands, quoting, errors."""
from __future__ import annotations

import shlex
import subprocess

import pytest
from click.testing import CliRunner

from toolkit.cli import main
from toolkit.errors import ConfigError
from toolkit.launch.commands import LaunchSpec, SlurmSpec, deepspeed_command, render_sbatch


def test_launch_dry_run_prints_the_command():
    r = CliRunner().invoke(main, ["launch", "distill", "--num-gpus", "2", "--master-port", "29555", "--config",
                                  "job.yaml", "--ds-config", "ds_configs/zero2_bf16.json", "--dry-run",
                                  "--no-bind-cores", "max_steps=10"])
    assert r.exit_code == 0, r.output
    argv = shlex.split(r.output.strip().split(" ", 1)[1] if r.output.startswith("OMP") else r.output.strip())
    assert "--num_gpus" in argv and argv[argv.index("--num_gpus") + 1] == "2"
    assert argv[argv.index("--master_port") + 1] == "29555"
    # The job module ships in the package: the same command from a checkout or a wheel.
    assert argv[argv.index("--module") + 1] == "toolkit.launchers.distill"
    tail = argv[argv.index("--module") + 2:]
    assert tail == ["--config", "job.yaml", "--ds_config", "ds_configs/zero2_bf16.json", "max_steps=10"]


def test_multinode_flags_and_errors(tmp_path):
    hf = tmp_path / "hosts"
    hf.write_text("a slots=8\nb slots=8\n")
    cmd = deepspeed_command(LaunchSpec(job="teacher", num_nodes=2, num_gpus=8, hostfile=str(hf), no_ssh=True,
                                       node_rank=1, master_addr="a", config="c.yaml"))
    for flag, val in (("--hostfile", str(hf)), ("--num_nodes", "2"), ("--node_rank", "1"), ("--master_addr", "a")):
        assert cmd[cmd.index(flag) + 1] == val
    assert "--no_ssh" in cmd and cmd[-3:-2] == ["toolkit.launchers.train_teacher"] and cmd[-4] == "--module"
    with pytest.raises(ConfigError, match="hostfile"):
        LaunchSpec(job="distill", num_nodes=2)
    with pytest.raises(ConfigError, match="node_rank"):
        LaunchSpec(job="distill", no_ssh=True, master_addr="x")
    with pytest.raises(ConfigError, match="include"):
        LaunchSpec(job="distill", include="a:0", num_gpus=2)
    with pytest.raises(ConfigError, match="job"):
        LaunchSpec(job="nope")


def test_sbatch_script_quotes_everything(tmp_path):
    evil = "corpus.sources=$(touch /tmp/pwned); rm -rf / `id`"
    spec = SlurmSpec(launch=LaunchSpec(job="distill", config=str(tmp_path / "my job.yaml"), overrides=[evil]),
                     nodes=2, gpus_per_node=8, ntasks_per_node_ranks=8, time="24:00:00", partition="gpu",
                     account="proj-1", mem="64G", cpus_per_task=16)
    text = render_sbatch(spec)
    assert "#SBATCH --nodes=2" in text and "#SBATCH --gpus-per-node=8" in text
    assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text
    srun = next(l for l in text.splitlines() if l.startswith("srun "))
    # The shell sees the hostile override as one literal word.
    assert evil in shlex.split(srun)
    assert "'" + str(tmp_path / "my job.yaml") + "'" in srun
    # bash -n: the script parses; nothing is executed.
    f = tmp_path / "job.sbatch"
    f.write_text(text)
    subprocess.run(["bash", "-n", str(f)], check=True)
    with pytest.raises(ConfigError, match="partition"):
        SlurmSpec(launch=LaunchSpec(job="distill"), partition="gpu\n#SBATCH --uid=0")
    with pytest.raises(ConfigError, match="time"):
        SlurmSpec(launch=LaunchSpec(job="distill"), time="1:00; rm -rf /")
    with pytest.raises(ConfigError, match="sbatch_arg"):
        SlurmSpec(launch=LaunchSpec(job="distill"), extra_sbatch=["--x=1\nrm -rf /"])


def test_slurm_dry_run_cli():
    r = CliRunner().invoke(main, ["slurm", "teacher", "--nodes", "3", "--gpus-per-node", "4", "--time", "2:00:00",
                                  "--dry-run", "--config", "c.yaml"])
    assert r.exit_code == 0, r.output
    assert r.output.startswith("#!/bin/bash") and "#SBATCH --nodes=3" in r.output
    assert "--num-gpus 4" in r.output and "train_teacher.py" in r.output


def test_visible_gpu_include():
    from toolkit.launch.commands import visible_gpu_include

    assert visible_gpu_include(None, {"CUDA_VISIBLE_DEVICES": "2,3"}) == "localhost:2,3"
    assert visible_gpu_include(1, {"CUDA_VISIBLE_DEVICES": "2, 3"}) == "localhost:2"
    assert visible_gpu_include(2, {}) is None and visible_gpu_include(2, {"CUDA_VISIBLE_DEVICES": ""}) is None
    assert visible_gpu_include(1, {"CUDA_VISIBLE_DEVICES": "GPU-5c0e"}) is None   # UUIDs: left to the launcher
    with pytest.raises(ConfigError, match="num_gpus.*CUDA_VISIBLE_DEVICES=2,3"):
        visible_gpu_include(4, {"CUDA_VISIBLE_DEVICES": "2,3"})


def test_launch_on_a_gpu_host_keeps_cuda_visible_devices(monkeypatch):
    # deepspeed drops CUDA_VISIBLE_DEVICES when given --num_gpus: name the devices instead.
    import toolkit.launch.cli as launch_cli

    monkeypatch.setattr(launch_cli, "_gpu_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    for extra, include in (([], "localhost:2,3"), (["--num-gpus", "1"], "localhost:2")):
        r = CliRunner().invoke(main, ["launch", "distill", "--dry-run", *extra])
        assert r.exit_code == 0, r.output
        argv = shlex.split(r.output.strip())
        assert argv[argv.index("--include") + 1] == include and "--num_gpus" not in argv
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    argv = shlex.split(CliRunner().invoke(main, ["launch", "distill", "--dry-run"]).output.strip())
    assert argv[argv.index("--num_gpus") + 1] == "2" and "--include" not in argv


# ----- the Slurm path: the node step and the requeue contract of the sbatch script -------------

def _fake_slurm(tmp_path, srun_body: str):
    """A PATH with fake ``srun`` and ``scontrol``: srun runs ``srun_body`` with the node step's
    ``--requeue-file`` in $MARK; scontrol records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text("#!/bin/bash\n"
                                  "MARK=$(printf '%s\\n' \"$@\" | grep -A1 -x -- --requeue-file | tail -1)\n"
                                  f"echo \"$@\" > {tmp_path}/srun_args\n{srun_body}\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/bash\necho \"$@\" >> {tmp_path}/scontrol_calls\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


@pytest.mark.parametrize("srun_body,requeue,rc,requeued", [
    ('echo node0 > "$MARK"; exit 0', True, 0, True),     # ranks stopped for a preemption with a checkpoint
    ("exit 0", True, 0, False),                          # the job finished
    ("exit 143", True, 143, False),                      # a node failed: srun killed the rest
    ('echo node0 > "$MARK"; exit 0', False, 75, False),  # --no-requeue: the stop is reported, not requeued
])
def test_sbatch_requeues_on_the_mark_only(tmp_path, srun_body, requeue, rc, requeued):
    import os

    spec = SlurmSpec(launch=LaunchSpec(job="distill", config="c.yaml", master_port=None), nodes=2,
                     cpus_per_task=4, requeue=requeue, script_dir=str(tmp_path / "scripts"), workdir=str(tmp_path))
    text = render_sbatch(spec)
    srun = next(l for l in text.splitlines() if l.startswith("srun "))
    # A clean stop never travels through srun as 75: --kill-on-bad-exit stays for real failures.
    assert "--kill-on-bad-exit=1" in srun and "--requeue-file" in srun
    assert "${SLURM_CPUS_PER_TASK:+--cpus-per-task=$SLURM_CPUS_PER_TASK}" in srun   # srun >= 22.05 needs it
    assert "--master-port" not in srun   # each node derives it from the job id
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    bin_dir = _fake_slurm(tmp_path, srun_body)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_CPUS_PER_TASK": "4", "SLURM_JOB_NODELIST": "n[1-2]"}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == rc, r.stdout + r.stderr
    assert "--cpus-per-task=4" in (tmp_path / "srun_args").read_text()
    calls = (tmp_path / "scontrol_calls").read_text() if (tmp_path / "scontrol_calls").exists() else ""
    assert ("requeue 4242" in calls) == requeued
    assert not list((tmp_path / "scripts").glob(".requeue-*"))   # consumed


def test_slurm_master_port_comes_from_the_job_id():
    from toolkit.launch.commands import default_master_port, slurm_master_port

    ports = {slurm_master_port(str(j)) for j in range(1000, 1100)}
    assert len(ports) == 100 and all(12000 <= p < 32000 for p in ports)   # below the ephemeral range
    assert slurm_master_port("1234") == slurm_master_port("1234")
    assert default_master_port({}) == 29500 and default_master_port({"SLURM_JOB_ID": "77"}) == slurm_master_port("77")


def test_node_step_follows_the_slurm_task(monkeypatch, tmp_path):
    """Two nodes, this one node 1: port from the job id, master at node 0's NodeAddr, the ranks on
    the GPUs Slurm made visible and on the task's CPUs."""
    from toolkit.launch import node
    from toolkit.launch.commands import slurm_master_port

    monkeypatch.setattr(node, "slurm_hosts", lambda env=None: ["n1", "n2"])
    monkeypatch.setattr(node, "node_address", lambda host: {"n1": "10.0.0.1"}.get(host, host))
    monkeypatch.setattr(node, "affinity_cpus", lambda: [4, 5, 6, 7])
    env = {"SLURM_JOB_ID": "98765", "SLURM_NODEID": "1", "CUDA_VISIBLE_DEVICES": "2,3", "PATH": "/usr/bin"}
    cmd, out = node.build(node.parse_args(["--num-gpus", "2", "--", "distill.py", "--config", "c.yaml", "a=1"]), env)
    val = lambda flag: cmd[cmd.index(flag) + 1]  # noqa: E731
    assert val("--master_port") == str(slurm_master_port("98765"))
    assert val("--master_addr") == "10.0.0.1" and val("--node_rank") == "1" and "--no_ssh" in cmd
    assert val("--include") == "n1:0,1@n2:2,3" and "--num_gpus" not in cmd
    from pathlib import Path

    assert Path(val("--hostfile")).read_text() == "n1 slots=2\nn2 slots=4\n"
    assert out["OMP_NUM_THREADS"] == "2"   # 4 CPUs in the task's mask, 2 ranks
    assert cmd[-3:] == ["--config", "c.yaml", "a=1"]
    # Pinned: each rank gets its share of the task's CPUs, not of the whole machine.
    cmd, out = node.build(node.parse_args(["--num-gpus", "2", "--bind-cores", "--", "distill.py"]),
                          {**env, "CUDA_VISIBLE_DEVICES": ""})
    assert cmd[cmd.index("--bind_core_list") + 1] == "4-7" and "--bind_cores_to_rank" in cmd
    assert cmd[cmd.index("--num_gpus") + 1] == "2" and "--include" not in cmd
    # One node: no hostfile, the visible GPUs by name.
    monkeypatch.setattr(node, "slurm_hosts", lambda env=None: ["n1"])
    cmd, _ = node.build(node.parse_args(["--num-gpus", "1", "--master-port", "23456", "--", "finetune.py"]),
                        {**env, "SLURM_NODEID": "0"})
    assert val("--include") == "localhost:2" and val("--master_port") == "23456" and "--hostfile" not in cmd
    with pytest.raises(ConfigError, match="CUDA_VISIBLE_DEVICES=2,3"):
        node.build(node.parse_args(["--num-gpus", "4", "--", "distill.py"]), env)


def test_cpu_list_and_threads():
    from toolkit.launch.commands import cpu_list, restricted_core_list, threads_per_rank

    assert cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8" and cpu_list([3]) == "3"
    assert threads_per_rank(2, [0, 1, 2, 3, 4]) == 2 and threads_per_rank(8, [0, 1]) == 1
    assert restricted_core_list([0, 1], total=2) is None and restricted_core_list([2, 3], total=8) == "2-3"
