"""Atomic checkpoint layout, discovery, pruning, and survival of SIGKILL at random moments."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from toolkit.engine.checkpoint import (find_checkpoint, is_complete, list_complete, read_client_state,
                                       read_marker, write_atomic)
from toolkit.errors import ToolkitError

HERE = Path(__file__).resolve().parent


def _save(root: Path, step: int, keep_last=None) -> Path:
    return write_atomic(root, f"step{step}", lambda d: torch.save({"step": step}, d / "model.pt"),
                        {"step": step}, keep_last=keep_last)


def test_layout_latest_and_client_state(tmp_path):
    path = _save(tmp_path, 5)
    assert path == tmp_path / "step5" and is_complete(path)
    assert (tmp_path / "latest").read_text() == "step5"
    assert read_marker(path)["step"] == 5
    assert read_client_state(path, 0) == {"step": 5}
    assert read_client_state(path, 3) == {"step": 5}  # other world size: falls back to rank 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_no_checkpoint_returns_none(tmp_path):
    assert find_checkpoint(tmp_path / "missing") is None
    (tmp_path / "step3").mkdir()  # no COMPLETE marker: not a checkpoint
    assert find_checkpoint(tmp_path) is None


def test_ignores_incomplete_and_tmp_and_falls_back_by_step(tmp_path):
    _save(tmp_path, 2)
    _save(tmp_path, 10)
    (tmp_path / ".tmp-step11").mkdir()
    (tmp_path / "step12").mkdir()  # incomplete
    (tmp_path / "latest").write_text("step12")  # points at an incomplete one
    assert find_checkpoint(tmp_path) == tmp_path / "step10"
    (tmp_path / "latest").unlink()
    assert find_checkpoint(tmp_path) == tmp_path / "step10"  # step order, not name order
    _save(tmp_path, 13)
    assert not (tmp_path / ".tmp-step11").exists()  # leftovers cleaned on the next save


def test_explicit_tag_and_checkpoint_folder(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    assert find_checkpoint(tmp_path, "step1") == tmp_path / "step1"
    assert find_checkpoint(tmp_path / "step1") == tmp_path / "step1"
    with pytest.raises(ToolkitError, match="step7"):
        find_checkpoint(tmp_path, "step7")


def test_keep_last_prunes_oldest(tmp_path):
    for s in range(1, 6):
        _save(tmp_path, s, keep_last=2)
    assert [p.name for p in list_complete(tmp_path)] == ["step4", "step5"]


def test_resaving_same_tag_replaces_it(tmp_path):
    _save(tmp_path, 4)
    write_atomic(tmp_path, "step4", lambda d: torch.save({"step": 44}, d / "model.pt"), {"step": 44})
    assert torch.load(tmp_path / "step4" / "model.pt") == {"step": 44}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step4"]


def test_bad_tag(tmp_path):
    with pytest.raises(ToolkitError, match="tag"):
        write_atomic(tmp_path, "../x", lambda d: None, {})


def _check_loadable(root: Path) -> int:
    found = find_checkpoint(root)
    assert found is not None, f"no complete checkpoint in {sorted(p.name for p in root.iterdir())}"
    step = read_client_state(found, 0)["step"]
    payload = torch.load(found / "model.pt")
    assert read_marker(found)["step"] == step
    assert torch.all(payload["w"] == step) and torch.all(payload["b"] == step)
    assert (found / "extra.txt").read_text() == str(step) * 1000
    return step


def test_sigkill_at_random_moments_leaves_a_loadable_checkpoint(tmp_path):
    rng = random.Random(1234)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    last = 0
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(HERE / "ckpt_writer.py"), str(tmp_path)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            # Wait until this process has saved at least once past what it resumed from,
            # then kill it at a random moment of its save loop.
            deadline = time.time() + 60
            while time.time() < deadline:
                f = find_checkpoint(tmp_path)
                if f is not None and read_marker(f)["step"] > last:
                    break
                assert proc.poll() is None, proc.stderr.read().decode()
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        step = _check_loadable(tmp_path)
        assert step > last  # resumed from the previous checkpoint and made progress
        last = step
        assert len(list_complete(tmp_path)) <= 3  # keep_last=2, plus at most one mid-prune
