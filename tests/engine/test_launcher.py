"""Two CPU ranks under the ``deepspeed`` launcher at ZeRO-2 and ZeRO-3 match one process.

Judged by the files rank 0 wrote: rank 1 occasionally aborts at exit after finishing
(see PLATFORM_NOTES), which is reported but not a failure when the outputs are complete.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from toolkit.engine.dist import free_port

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
STEPS = 5
MICRO = 4


def _load_script():
    spec = importlib.util.spec_from_file_location("launch_train", HERE / "launch_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, micro batch 2*MICRO: the same global batch as 2 ranks x MICRO."""
    cfg = json.loads((REPO / "ds_configs" / "cpu_fp32.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = 2 * MICRO
    out = tmp_path_factory.mktemp("ref")
    result = _load_script().train(cfg, STEPS, out)
    return result, torch.load(out / "weights.pt")


@pytest.mark.launcher
@pytest.mark.parametrize("config", ["cpu_zero2_fp32.json", "cpu_zero3_fp32.json"])
def test_two_ranks_match_one_process(tmp_path, reference, config):
    if shutil.which("deepspeed") is None:
        pytest.skip("deepspeed launcher not on PATH")
    env = dict(os.environ)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # set by an in-process Engine earlier in this session
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port())]
    if shutil.which("numactl"):
        cmd.append("--bind_cores_to_rank")
    else:
        env["OMP_NUM_THREADS"] = "1"
    cmd += [str(HERE / "launch_train.py"), "--ds_config", str(REPO / "ds_configs" / config),
            "--micro_batch", str(MICRO), "--steps", str(STEPS), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    result_file = tmp_path / "result.json"
    assert result_file.is_file(), f"launcher exit {proc.returncode}; no result written:\n{proc.stdout[-3000:]}" \
                                  f"\n{proc.stderr[-3000:]}"
    if proc.returncode != 0:
        warnings.warn(f"deepspeed launcher exited {proc.returncode} after writing its outputs "
                      f"(rank abort at exit; see PLATFORM_NOTES): {proc.stderr[-500:]}")
    got = json.loads(result_file.read_text())
    ref, ref_weights = reference
    assert got["world_size"] == 2 and got["global_batch"] == ref["global_batch"] == 2 * MICRO
    assert got["zero_stage"] == int(config.split("zero")[1][0])
    assert got["losses"] == pytest.approx(ref["losses"], rel=1e-4, abs=1e-5)
    assert got["checksum"] == pytest.approx(ref["checksum"], rel=1e-5)
    weights = torch.load(tmp_path / "weights.pt")
    for k, v in ref_weights.items():
        assert torch.allclose(weights[k], v, atol=1e-5), k
