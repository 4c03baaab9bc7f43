"""Smoke test of benchmarks/bench_distill_step.py: tiny models, checks the output's shape, never timings."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "bench_distill_step.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=240,
                          cwd=ROOT)


def test_smoke_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--smoke", "--steps", "1", "--warmup", "1", "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert "| seq | batch | impl | step ms (median) | tokens/s" in proc.stdout
    assert "loss check" in proc.stdout and "-> OK" in proc.stdout
    data = json.loads(out.read_text())
    assert {"machine", "command", "matmul_peak", "loss_check", "results", "ratios", "targets"} <= set(data)
    assert data["machine"]["threads"] == 1 and data["machine"]["cpu"]
    assert data["loss_check"]["ok"] and data["loss_check"]["rel_diff"] <= 1e-4
    assert [r["impl"] for r in data["results"]] == ["toolkit", "baseline"]
    keys = {"step_s_median", "tokens_per_s", "samples_per_s", "mfu", "peak_growth_mib", "peak_rss_mib",
            "rss_after_setup_mib", "flops_per_step", "phases_s_median", "losses"}
    for r in data["results"]:
        assert keys <= set(r), sorted(keys - set(r))
        assert r["seq"] == 16 and r["batch"] == 2 and r["loss_finite"]
        assert r["tokens_per_s"] == r["samples_per_s"] * 16
        assert r["peak_rss_mib"] >= r["rss_after_setup_mib"]
    (ratio,) = data["ratios"]
    assert {"impl", "seq", "batch", "tokens_per_s_ratio", "peak_growth_ratio"} <= set(ratio)


def test_bad_option_is_one_line_error():
    proc = _run("--smoke", "--seqs", "16,abc")
    assert proc.returncode == 2
    assert "--seqs" in proc.stderr and "Traceback" not in proc.stderr
