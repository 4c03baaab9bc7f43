"""A job that gets SIGUSR1/SIGTERM (as Slurm sends before a time limit or a preemption)
writes a checkpoint at a safe point, exits with the requeue code, and the re-run resumes."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import subprocess_env
import yaml


def _job(tmp_path: Path, teacher: Path, corpus: Path, steps: int) -> Path:
    y = tmp_path / "job.yaml"
    y.write_text(yaml.safe_dump({
        "teacher": str(teacher), "output_dir": str(tmp_path / "out"), "max_steps": steps, "log_every": 1,
        "corpus": {"sources": [str(corpus / "*.txt")], "seq_length": 32, "shuffle_buffer": 8, "num_workers": 0},
        "student": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64},
        "loss": {"options": {"minilmv2": {"num_relation_heads": 8}}}}))
    return y


def _rows(out: Path):
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(l) for l in f.read_text().splitlines() if l.strip()]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_signal_checkpoints_and_resume_finishes(sig, tiny_bert4_dir, fixture_corpus, tmp_path):
    from toolkit.engine.signals import REQUEUE_EXIT_CODE

    steps = 400
    y = _job(tmp_path, tiny_bert4_dir, fixture_corpus, steps)
    out = tmp_path / "out"
    env = subprocess_env()
    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "distill", "--config", str(y)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len([r for r in _rows(out) if r.get("prefix") == "train"]) < 3:
        if proc.poll() is not None:
            pytest.fail("the job ended before it could be signalled:\n" + proc.stdout.read()[-3000:])
        time.sleep(0.2)
    proc.send_signal(sig)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE_EXIT_CODE, log[-3000:]
    stopped = max(r["step"] for r in _rows(out) if r.get("prefix") == "train")
    assert 3 <= stopped < steps
    assert (out / "checkpoints" / "latest").is_file()
    # The re-run (what Slurm's requeue does) resumes from the checkpoint and finishes.
    res = subprocess.run([sys.executable, "-m", "toolkit", "distill", "--config", str(y)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "resumed from step" in res.stdout + res.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == steps
    # Counters continue from the checkpoint: every step's samples counted exactly once.
    assert m["samples"] == steps * 8
    assert (out / "student" / "config.json").is_file()
