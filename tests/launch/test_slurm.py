"""`toolkit slurm` on a real two-node Slurm cluster on this machine (slurm_cluster.py starts it).

One CPU rank per node, gloo between the nodes:

* ``toolkit slurm distill --nodes 2`` runs to the end;
* the same job, sent the time-limit signal mid-run (``scancel --signal=USR1``: the signal Slurm's
  ``--signal=USR1@N`` delivers, to every process of the job step), writes a checkpoint, is requeued
  by its own script, resumes and finishes with the final student weights of the uninterrupted run.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from slurm_cluster import job_state, slurm_cluster, wait_job  # noqa: F401  (slurm_cluster: the fixture)

pytestmark = pytest.mark.slurm

STEPS = 40


def _distill_job(root: Path, teacher: Path, corpus: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    y = root / "job.yaml"
    y.write_text(yaml.safe_dump({
        "teacher": str(teacher), "output_dir": str(root / "out"), "max_steps": STEPS, "log_every": 1,
        "corpus": {"sources": [str(corpus / "*.txt")], "seq_length": 32, "shuffle_buffer": 8, "num_workers": 2},
        "student": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64},
        "loss": {"options": {"minilmv2": {"num_relation_heads": 8}}}}))
    return y


def _submit(env, root: Path, y: Path) -> str:
    # One thread per rank: the two "nodes" share this machine's cores.
    r = subprocess.run([sys.executable, "-m", "toolkit", "slurm", "distill", "--config", str(y), "--nodes", "2",
                        "--ds-config", "cpu_fp32.json", "--cpus-per-task", "1", "--script-dir", str(root / "slurm"),
                        "--output", str(root / "slurm" / "job-%j.out"), "--time", "30:00"],
                       env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[0]
    assert job_id.isdigit(), r.stdout
    return job_id


def _log(root: Path) -> str:
    return "\n".join(p.read_text() for p in (root / "slurm").glob("job-*.out"))


def _train_steps(out: Path):
    f = out / "metrics.jsonl"
    if not f.is_file():
        return []
    return [json.loads(l)["step"] for l in f.read_text().splitlines() if '"prefix": "train"' in l]


def _student(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "student" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(slurm_cluster, tiny_bert4_dir, fixture_corpus, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("slurm_ref")
    job_id = _submit(slurm_cluster, root, _distill_job(root, tiny_bert4_dir, fixture_corpus))
    state = wait_job(slurm_cluster, job_id, timeout=900)
    return root, job_id, state


@pytest.mark.timeout(1200)
def test_two_node_distillation_runs_to_the_end(uninterrupted):
    root, job_id, state = uninterrupted
    log = _log(root)
    assert state == "COMPLETED", log[-5000:]
    m = json.loads((root / "out" / "metrics.json").read_text())
    assert m["steps"] == STEPS and m["samples"] == STEPS * 8 * 2, m   # micro 8 on each of 2 ranks
    # Both node steps ran, one rank each, on a port derived from the job id.
    from toolkit.launch.commands import slurm_master_port

    assert "[toolkit.launch.node] node 0:" in log and "[toolkit.launch.node] node 1:" in log
    assert f"--master_port {slurm_master_port(job_id)}" in log and "--node_rank 1" in log
    assert (root / "out" / "logs" / "rank1.log").is_file()


@pytest.mark.timeout(2400)
def test_time_limit_signal_checkpoints_requeues_and_finishes_alike(slurm_cluster, uninterrupted,  # noqa: F811
                                                                     tiny_bert4_dir, fixture_corpus, tmp_path):
    ref_root, _, ref_state = uninterrupted
    assert ref_state == "COMPLETED", _log(ref_root)[-3000:]
    root = tmp_path / "job"
    out = root / "out"
    job_id = _submit(slurm_cluster, root, _distill_job(root, tiny_bert4_dir, fixture_corpus))
    deadline = time.time() + 600
    while len(_train_steps(out)) < 5:
        assert job_state(slurm_cluster, job_id) in ("PENDING", "RUNNING", "CONFIGURING"), _log(root)[-4000:]
        assert time.time() < deadline, "no training steps logged in time:\n" + _log(root)[-4000:]
        time.sleep(0.5)
    r = subprocess.run(["scancel", "--signal=USR1", job_id], env=slurm_cluster, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    state = wait_job(slurm_cluster, job_id, timeout=1500)
    log = _log(root)
    assert state == "COMPLETED", log[-6000:]
    assert "requeueing" in log and "restart 1" in log and "resumed from step" in log, log[-6000:]
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == STEPS and m["samples"] == STEPS * 8 * 2, m
    # The stop came mid-run, and resuming from it gives the uninterrupted run's student.
    stopped = [int(l.split("stopping at step ")[1].split()[0]) for l in log.splitlines() if "stopping at step" in l]
    assert stopped and 5 <= stopped[0] < STEPS, log[-4000:]
    ref, got = _student(ref_root / "out"), _student(out)
    assert ref.keys() == got.keys()
    for k in ref:
        assert (ref[k] - got[k]).abs().max().item() <= 1e-6, k
