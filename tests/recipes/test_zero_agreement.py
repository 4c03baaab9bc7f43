"""ZeRO stages agree: one process and 2 ranks at ZeRO 0, 1, 2 and 3 give the same weights after
a few steps, for the multi-task teacher (a task head idles in every step) and for distillation
(whose last student layer, past the Q/K/V the loss reads, gets no gradient at all).

Two launches: zero_agreement_job.py in one process, then under the deepspeed launcher on 2 ranks;
each runs both recipes at all four stages.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import launcher_excerpt, subprocess_env

pytestmark = pytest.mark.launcher

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
TOL = 2e-5


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def no_dropout_encoder(tiny_bert_dir, tmp_path_factory) -> Path:
    from transformers import AutoModel, AutoTokenizer

    d = tmp_path_factory.mktemp("nodrop_enc")
    model = AutoModel.from_pretrained(tiny_bert_dir, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(d)
    return d


def _args(out: Path, world: int, encoder: Path, tasks, teacher: Path, corpus: Path):
    return [str(HERE / "zero_agreement_job.py"), "--out", str(out), "--world", str(world), "--teacher_model",
            str(encoder), "--tasks", ",".join(str(tasks[k]) for k in ("senti", "topic")),
            "--distill_teacher", str(teacher), "--corpus", str(corpus / "*.txt")]


def _weights(path: Path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.timeout(2400)
def test_zero_stages_and_world_sizes_agree(no_dropout_encoder, fixture_tasks, tiny_bert4_dir, fixture_corpus,
                                           tmp_path):
    if shutil.which("deepspeed") is None:
        pytest.skip("the deepspeed launcher is not on PATH")
    one, two = tmp_path / "one", tmp_path / "two"
    r = subprocess.run([sys.executable, *_args(one, 1, no_dropout_encoder, fixture_tasks, tiny_bert4_dir,
                                               fixture_corpus)],
                       env=subprocess_env(), cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert (one / "distill_z3" / "student" / "model.safetensors").is_file(), launcher_excerpt(r.stdout + r.stderr)
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_port())]
    env = subprocess_env()
    if shutil.which("numactl"):
        cmd.append("--bind_cores_to_rank")
    else:
        env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(cmd + _args(two, 2, no_dropout_encoder, fixture_tasks, tiny_bert4_dir, fixture_corpus),
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert (two / "distill_z3" / "student" / "model.safetensors").is_file(), launcher_excerpt(r.stdout + r.stderr)

    files = (("teacher", "model/model.safetensors"), ("teacher", "model/heads.safetensors"),
             ("distill", "student/model.safetensors"))
    for kind, rel in files:
        ref = _weights(one / f"{kind}_z0" / rel)
        for root in (one, two):
            for stage in (0, 1, 2, 3):
                got = _weights(root / f"{kind}_z{stage}" / rel)
                assert got.keys() == ref.keys()
                worst = max((got[k] - ref[k]).abs().max().item() for k in ref)
                assert worst <= TOL, (kind, rel, root.name, stage, worst)
    # The teacher trained: its encoder moved well beyond the tolerance.
    start = _weights(no_dropout_encoder / "model.safetensors")
    trained = _weights(one / "teacher_z0" / "model" / "model.safetensors")
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 100 * TOL
