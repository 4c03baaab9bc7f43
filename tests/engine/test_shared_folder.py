"""Rank agreement helpers and the start-up check that every rank sees one output folder, on a real
2-process gloo group (no launcher)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env
from toolkit.engine.dist import free_port

JOB = Path(__file__).resolve().parent / "shared_folder_job.py"


def _run_two(*folders: Path):
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(JOB), *map(str, folders)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=subprocess_env(RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                 MASTER_PORT=port))
             for r in (0, 1)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, so + se
    return sorted((json.loads(so.strip().splitlines()[-1]) for so, _ in outs), key=lambda d: d["rank"])


@pytest.mark.timeout(600)
def test_shared_folder_passes_and_agreement(tmp_path):
    shared = tmp_path / "out"
    got = _run_two(shared)
    assert [g["error"] for g in got] == [None, None]
    assert [g["all"] for g in got] == [False, False] and [g["any"] for g in got] == [True, True]
    assert [g["all_true"] for g in got] == [True, True]
    assert got[0]["leftover"] == []   # the probe file is removed


@pytest.mark.timeout(600)
def test_a_folder_rank_1_does_not_share_is_a_named_error(tmp_path):
    a, b = tmp_path / "node0_out", tmp_path / "node1_out"
    b.mkdir()
    got = _run_two(a, b)
    # Both ranks raise, with the same message naming the rank that cannot see rank 0's file.
    assert got[0]["error"] and got[0]["error"] == got[1]["error"]
    assert "not one folder shared by every rank" in got[0]["error"] and "rank 1 on" in got[0]["error"]
    assert "rank 0 on" not in got[0]["error"].split("cannot see")[0]
