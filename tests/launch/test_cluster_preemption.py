"""Preemption and end of data on 2 ranks under the real deepspeed launcher, as schedulers deliver them.

* A SIGTERM (and a SIGUSR1) sent to the whole process group of ``toolkit launch distill`` (and of
  ``deepspeed launchers/distill.py`` under ``python -m toolkit.launch.supervise``), with 2 DataLoader
  workers per rank: the ranks agree on a step, write one complete checkpoint and the command exits
  75; the re-run resumes and finishes.
* A finite corpus whose two shards differ tenfold in length, under plain ``deepspeed``: both ranks
  stop at the step where the short shard ends, with one checkpoint, instead of hanging in
  different collectives.

Each launch costs ~20 s of start-up on 2 cores: these tests are few and small, with generous
per-test timeouts (pytest-timeout) so a hang fails instead of blocking the suite.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import subprocess_env

pytestmark = pytest.mark.launcher

REPO = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _needs_launcher() -> None:
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not on PATH")


def _job(tmp_path: Path, teacher: Path, sources, steps: int, **corpus) -> Path:
    y = tmp_path / "job.yaml"
    y.write_text(yaml.safe_dump({
        "teacher": str(teacher), "output_dir": str(tmp_path / "out"), "max_steps": steps, "log_every": 1,
        "corpus": {"sources": sources, "seq_length": 32, "shuffle_buffer": 8, "num_workers": 2, **corpus},
        "student": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64},
        "loss": {"options": {"minilmv2": {"num_relation_heads": 8}}}}))
    return y


def _train_steps(out: Path):
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(l)["step"] for l in f.read_text().splitlines() if '"prefix": "train"' in l]


def _complete_checkpoint(out: Path, world: int = 2) -> Path:
    """The checkpoint ``latest`` names: marked complete, with every rank's client state."""
    ckpt_dir = out / "checkpoints"
    tag = (ckpt_dir / "latest").read_text().strip()
    ckpt = ckpt_dir / tag
    marker = json.loads((ckpt / "COMPLETE").read_text())
    assert marker["world_size"] == world
    states = sorted(ckpt.glob("client_state_rank*.pt"))
    assert len(states) == world, states
    import torch

    steps = {torch.load(s, weights_only=False)["state"]["step"] for s in states}
    assert steps == {marker["step"]}, (steps, marker)   # every rank stopped at the same step
    return ckpt


def _start(cmd, env) -> subprocess.Popen:
    # Its own process group: the test signals the whole group, as Slurm and the launcher do.
    return subprocess.Popen(cmd, env=env, cwd=REPO, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _signal_mid_run(proc: subprocess.Popen, out: Path, sig: int, after_steps: int = 3, timeout: float = 400) -> str:
    deadline = time.time() + timeout
    while len(_train_steps(out)) < after_steps:
        if proc.poll() is not None:
            pytest.fail("the job ended before it could be signalled:\n" + proc.stdout.read()[-4000:])
        assert time.time() < deadline, "no training steps logged in time"
        time.sleep(0.3)
    os.killpg(proc.pid, sig)
    log, _ = proc.communicate(timeout=300)
    return log


def _resume_finishes(cmd, env, out: Path, steps: int) -> None:
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    log = r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "metrics.json").is_file(), log
    assert "resumed from step" in r.stdout + r.stderr, log
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == steps and m["samples"] == steps * 8 * 2, m   # micro 8 x 2 ranks, each counted once
    assert (out / "student" / "config.json").is_file()
    assert r.returncode == 0, log


@pytest.mark.timeout(1500)
def test_group_sigterm_under_toolkit_launch(tiny_bert4_dir, fixture_corpus, tmp_path):
    _needs_launcher()
    steps = 300
    y = _job(tmp_path, tiny_bert4_dir, [str(fixture_corpus / "*.txt")], steps)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "toolkit", "launch", "distill", "--num-gpus", "2", "--master-port", str(_port()),
           "--config", str(y), "--ds-config", "cpu_fp32.json"]
    env = subprocess_env()
    proc = _start(cmd, env)
    log = _signal_mid_run(proc, out, signal.SIGTERM)
    assert proc.returncode == 75, log[-4000:]
    assert "DataLoader worker" not in log, log[-4000:]
    ckpt = _complete_checkpoint(out)
    stopped = int(ckpt.name.replace("step", ""))
    assert 3 <= stopped < steps
    cmd[cmd.index("--master-port") + 1] = str(_port())
    _resume_finishes(cmd, env, out, steps)


@pytest.mark.timeout(1500)
def test_group_sigusr1_under_the_deepspeed_launcher(tiny_bert4_dir, fixture_corpus, tmp_path):
    """``deepspeed launchers/distill.py`` itself, under the signal-forwarding parent."""
    _needs_launcher()
    steps = 300
    y = _job(tmp_path, tiny_bert4_dir, [str(fixture_corpus / "*.txt")], steps)
    out = tmp_path / "out"

    def cmd(port):
        return [sys.executable, "-m", "toolkit.launch.supervise", "--", "deepspeed", "--num_gpus", "2",
                "--master_port", str(port), "launchers/distill.py", "--config", str(y), "--ds_config",
                "cpu_fp32.json"]

    env = subprocess_env(OMP_NUM_THREADS="1")
    proc = _start(cmd(_port()), env)
    log = _signal_mid_run(proc, out, signal.SIGUSR1)
    assert proc.returncode == 75, log[-4000:]
    assert "DataLoader worker" not in log, log[-4000:]
    _complete_checkpoint(out)
    _resume_finishes(cmd(_port()), env, out, steps)


@pytest.mark.timeout(900)
def test_uneven_finite_shards_stop_together(tiny_bert4_dir, tmp_path):
    """Two shards, one ten times longer: each rank reads one (corpus.num_workers 1, W = 2). Both
    stop where the short one ends, with one checkpoint and the student saved."""
    _needs_launcher()
    import random

    from conftest import FILL, NEG, POS

    rng = random.Random(3)
    words = POS + NEG + FILL
    shards = tmp_path / "shards"
    shards.mkdir()
    for name, docs in (("a_short.txt", 6), ("b_long.txt", 60)):
        text = "\n\n".join(" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(docs))
        (shards / name).write_text(text + "\n")
    steps = 1000
    y = _job(tmp_path, tiny_bert4_dir, [str(shards / "*.txt")], steps, epochs=1, num_workers=1)
    out = tmp_path / "out"
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_port()), "launchers/distill.py", "--config", str(y),
           "--ds_config", "cpu_fp32.json"]
    r = subprocess.run(cmd, env=subprocess_env(OMP_NUM_THREADS="1"), cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    log = r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "metrics.json").is_file(), log
    m = json.loads((out / "metrics.json").read_text())
    assert 0 < m["steps"] < 20, m   # where the short shard ended, far before the long one
    assert "the corpus ended" in r.stdout + r.stderr and "on another rank first" in r.stdout + r.stderr, log
    ckpt = _complete_checkpoint(out)
    assert ckpt.name == f"step{m['steps']}"
    assert (out / "student" / "config.json").is_file()
    assert r.returncode == 0, log
