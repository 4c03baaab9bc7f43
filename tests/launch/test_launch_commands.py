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
