"""scripts/gpu_session.sh: the one-call GPU kit. Here (no GPU) only its plumbing is checked:
argument errors, the shared deadline that skips phases which no longer fit, and the summary
with the command for a second call. Its GPU phases run on a lent machine (docs/DEVELOPING.md)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_session.sh"


def _run(tmp_path: Path, *args: str, seconds: str = "540") -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_SESSION_SECONDS=seconds)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env=env)


def test_unknown_phase_and_bad_budget_are_refused(tmp_path):
    proc = _run(tmp_path, "env", "bench-large")
    assert proc.returncode == 2
    assert "unknown phase 'bench-large'" in proc.stderr and "tests bench recipes" in proc.stderr
    proc = _run(tmp_path, "env", seconds="9m")
    assert proc.returncode == 2 and "GPU_SESSION_SECONDS" in proc.stderr and "'9m'" in proc.stderr


def test_phases_that_do_not_fit_are_skipped_and_named_for_the_next_call(tmp_path):
    # 30 s: env (needs 5) runs; tests (60) and bench (120) no longer fit.
    proc = _run(tmp_path, "env", "tests", "bench", seconds="30")
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["session.log", "summary.txt"]
    log = (out / "session.log").read_text()
    assert "torch" in log and "gpu: none visible to torch" in log   # env ran (on this CPU)
    summary = (out / "summary.txt").read_text()
    assert "[gpu] env: ok" in summary
    assert "[gpu] tests: skipped" in summary and "needs 60 s" in summary
    assert "[gpu] bench: skipped" in summary
    assert 'scripts/gpu_session.sh tests bench' in summary and 'carry=[".whl"]' in summary
    assert "failed: none" in summary


def test_all_expands_in_order_of_importance(tmp_path):
    proc = _run(tmp_path, seconds="0")
    assert proc.returncode == 3
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "budget 0 s for: env tests bench recipes optimizer ceiling" in summary
    assert "scripts/gpu_session.sh env tests bench recipes optimizer ceiling" in summary
