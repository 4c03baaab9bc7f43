"""scripts/gpu_acceptance.sh: on a machine without a GPU only its refusals can be checked here;
`pytest -m gpu` and the GPU benchmarks it runs are what it tests on a GPU host."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_acceptance.sh"


def _run(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OUT=str(tmp_path / "out"), **env))


def test_unknown_phase_and_bad_limit_are_refused(tmp_path):
    proc = _run(tmp_path, "env", "bench-large")
    assert proc.returncode == 2 and "unknown phase 'bench-large'" in proc.stderr and "env tests bench" in proc.stderr
    proc = _run(tmp_path, "env", GPU_ACCEPTANCE_PHASE_SECONDS="9m")
    assert proc.returncode == 2 and "GPU_ACCEPTANCE_PHASE_SECONDS" in proc.stderr and "'9m'" in proc.stderr


def test_without_a_gpu_it_says_so(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU: run the script itself")
    proc = _run(tmp_path, "env")
    assert proc.returncode == 3 and "no CUDA GPU is visible to torch" in proc.stderr
