"""tests/ci_skips.py: under CI=true a skip for a dependency .ci/run installs fails; others stay skips."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ci_skips import CI_DEPENDENCIES, ci_dependency

HERE = Path(__file__).resolve().parent

_PROBE = '''
import pytest

def test_tcmalloc():
    pytest.skip("tcmalloc is not installed here (.ci/run installs it)")

def test_slurm():
    pytest.skip("Slurm is not installed (slurmctld, slurmd missing): apt-get install slurm-wlm munge")

def test_resources():
    pytest.skip("not fetched; run `bash scripts/fetch_resources.sh` (no package)")

def test_gpu():
    pytest.skip("needs a CUDA GPU")

def test_passes():
    pass
'''


def _run(tmp_path: Path, ci: str) -> str:
    (tmp_path / "test_probe.py").write_text(_PROBE)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(HERE), "CI": ci, "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rA", "-p", "ci_skips", "-p", "no:cacheprovider",
                          "-c", "/dev/null", "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
                         capture_output=True, text=True, env=env, timeout=120)
    return out.stdout + out.stderr


def test_ci_turns_skips_for_installed_dependencies_into_failures(tmp_path):
    text = _run(tmp_path, "true")
    assert "3 failed, 1 passed, 1 skipped" in text, text
    for name in ("test_tcmalloc", "test_slurm", "test_resources"):
        assert f"test_probe.py::{name}" in text
    assert "which .ci/run installs" in text
    assert "SKIPPED" in text and "needs a CUDA GPU" in text


def test_without_ci_they_stay_skips(tmp_path):
    text = _run(tmp_path, "")
    assert "1 passed, 4 skipped" in text, text


@pytest.mark.parametrize("reason,dep", [
    ("numactl is not installed", "numactl"), ("munged would not start: x", "munge"),
    ("jemalloc is not installed here", "libjemalloc2"),
    ("triton is not installed (pip install -c constraints.txt triton)", "triton"),
    ("the deepspeed launcher is not on PATH", "the deepspeed launcher"),
    ("needs a CUDA GPU", None), ("needs Linux and a C compiler", None),
    ("TRITON_INTERPRET is not 1 (CUDA present or set otherwise)", None)])
def test_reasons_are_matched_to_the_listed_dependencies(reason, dep):
    assert ci_dependency(reason) == dep
    assert dep is None or dep in CI_DEPENDENCIES
