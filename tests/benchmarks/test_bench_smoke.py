"""Smoke test of benchmarks/bench_distill_step.py: tiny models, checks the output's shape, never timings."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
    assert data["partial"] is False
    assert data["machine"]["threads"] == 1 and data["machine"]["cpu"]
    assert data["loss_check"]["ok"] and data["loss_check"]["rel_diff"] <= 1e-4
    assert [r["impl"] for r in data["results"]] == ["toolkit", "baseline"]
    keys = {"step_s_median", "tokens_per_s", "samples_per_s", "mfu", "peak_growth_mib", "peak_rss_mib",
            "rss_after_setup_mib", "flops_per_step", "phases_s_median", "losses", "minor_faults_per_step",
            "sys_s_per_step", "allocator"}
    for r in data["results"]:
        assert keys <= set(r), sorted(keys - set(r))
        assert r["seq"] == 16 and r["batch"] == 2 and r["loss_finite"]
        assert r["tokens_per_s"] == r["samples_per_s"] * 16
        assert r["peak_rss_mib"] >= r["rss_after_setup_mib"]
    (ratio,) = data["ratios"]
    assert {"impl", "seq", "batch", "tokens_per_s_ratio", "peak_growth_ratio"} <= set(ratio)


def test_paired_peak_reports_a_drift_robust_mfu_next_to_the_best_of_run_one(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--smoke", "--steps", "3", "--warmup", "1", "--threads", "1", "--impls", "toolkit",
                "--paired-peak", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert "| MFU % | MFU % (paired) |" in proc.stdout and "(paired" in proc.stdout
    header = next(line for line in proc.stdout.splitlines() if line.startswith("| seq | batch | impl"))
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| 16 | 2 | toolkit"))
    assert header.count("|") == row.count("|")          # the extra column is a real column
    (r,) = json.loads(out.read_text())["results"]
    assert len(r["paired_peak_gflops"]) == 3 and all(p > 0 for p in r["paired_peak_gflops"])
    per_step = sorted(r["flops_per_step"] / t / (1e9 * p) for t, p in zip(r["step_s_all"], r["paired_peak_gflops"]))
    assert r["mfu_paired"] == pytest.approx(per_step[1], rel=1e-9)   # the median of the per-step ratios
    assert r["mfu"] > 0                                  # the best-of-run figure stays
    # The probes' own time, faults and kernel time are taken out of the step's figures.
    assert r["minor_faults_per_step"] >= 0 and r["sys_s_per_step"] >= 0 and 0 < r["cpu_util"] <= 1.05


def test_matmul_probe_process_keeps_its_matrices_out_of_the_worker():
    # The workers time the matmul peak before their steps (and after each one with --paired-peak).
    # Matrices made in the worker itself would stay resident in the allocator's caches and the step
    # would reuse them (its memory growth would read low). In a sibling process they cost the worker
    # nothing.
    import resource

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import MatmulProbeProcess
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    probe = MatmulProbeProcess(1024, "fp32", "cpu", threads=1)
    try:
        probe.measure(reps=1, warmup=1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        peaks = [probe.measure(reps=3, warmup=0) for _ in range(3)]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    finally:
        probe.close()
    assert all(p.best_flops >= p.median_flops > 0 and p.n == 1024 and p.threads == 1 for p in peaks)
    assert faults < 64, faults       # 3 x 4 MiB of matrices would be ~3000 pages
    assert probe.proc.returncode == 0  # closing the pipe ends the child


def test_matmul_peak_reports_the_gemm_library():
    """The peak MFU divides by is the best repetition of torch.matmul, reported per library, the
    same in this process and through the probe child's JSON."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import MatmulProbeProcess, measure_matmul_peak
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    want = {"torch.matmul"}
    peak = measure_matmul_peak(256, reps=3, warmup=1)
    assert set(peak.by_backend) == want
    assert peak.best_flops / 1e9 == pytest.approx(max(peak.by_backend.values()))
    assert peak.as_dict()["by_backend_gflops"] == peak.by_backend
    with MatmulProbeProcess(256, "fp32", "cpu", threads=1) as probe:   # the same through the child's JSON
        child = probe.measure(reps=2, warmup=1)
    assert set(child.by_backend) == want and child.best_flops / 1e9 == pytest.approx(max(child.by_backend.values()))


def test_json_is_written_after_every_row(tmp_path):
    """A benchmark stopped early (a time limit) keeps the rows it finished: the JSON is
    rewritten after each row, marked partial, and completed at the end."""
    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--smoke", "--steps", "1", "--warmup", "0", "--threads",
                             "1", "--batches", "2,3,4", "--json", str(out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    deadline = time.monotonic() + 240
    while first is None and proc.poll() is None and time.monotonic() < deadline:
        if out.exists():
            first = json.loads(out.read_text())
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert first is not None, "no JSON appeared while the run was going"
    assert first["partial"] is True and 1 <= len(first["results"]) < 6
    assert first["loss_check"]["ok"] and first["matmul_peak"]
    final = json.loads(out.read_text())
    assert final["partial"] is False and len(final["results"]) == 6 and final["ratios"]
    assert [r["batch"] for r in final["results"][:len(first["results"])]] == [r["batch"] for r in first["results"]]
    assert not (tmp_path / "bench.json.tmp").exists()


def test_smoke_bf16_large_preset_reads_an_inner_teacher_layer(tmp_path):
    # The GPU table's settings (bf16, a teacher read below its top layer), at tiny size on the CPU.
    out = tmp_path / "bench.json"
    proc = _run("--smoke", "--steps", "1", "--warmup", "1", "--threads", "1", "--dtype", "bf16",
                "--models", "bert-large", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    data = json.loads(out.read_text())
    assert data["dtype"] == "bf16" and data["models"] == "bert-large" and data["device"] == "cpu"
    assert data["matmul_peak"]["dtype"] == "bf16"
    assert data["loss_check"]["ok"]   # fp32, teacher read at layer 2 of 3 by both implementations
    tk, bl = data["results"]
    assert tk["teacher_layers_run"] == 2 and bl["teacher_layers_run"] == 3
    assert tk["dtype"] == "bf16" and tk["loss_finite"] and bl["loss_finite"]
    # On a CPU: the registry's chunked path.
    assert tk["relation_kl_kernel"] == "chunked" and bl["relation_kl_kernel"] == "naive (baseline)"
    assert data["targets"] == []      # no target for bf16 on a CPU


def test_cuda_without_a_gpu_is_refused():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has a GPU: --device cuda is valid here")
    proc = _run("--smoke", "--device", "cuda")
    assert proc.returncode == 2 and "--device" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_option_is_one_line_error():
    proc = _run("--smoke", "--seqs", "16,abc")
    assert proc.returncode == 2
    assert "--seqs" in proc.stderr and "Traceback" not in proc.stderr


def test_relation_kl_bench_rows_agree_and_bad_shape_is_named():
    script = ROOT / "benchmarks" / "bench_relation_kl.py"
    proc = subprocess.run([sys.executable, str(script), "--shapes", "2x16,1x40", "--reps", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line[2:3].isdigit()]
    assert [(r[0].strip(), r[1].strip()) for r in rows] == [("2 x 16", "chunked"), ("2 x 16", "naive"),
                                                            ("1 x 40", "chunked"), ("1 x 40", "naive")]
    # The naive rows report their largest relative difference to the chunked path.
    assert all(float(r[5]) < 1e-4 for r in rows if r[1].strip() == "naive")
    bad = subprocess.run([sys.executable, str(script), "--shapes", "2by16"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--shapes" in bad.stderr and "2by16" in bad.stderr


def test_memory_probe_reports_every_phase():
    script = ROOT / "benchmarks" / "probe_step_memory.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--seq", "16", "--batch", "2", "--steps", "2",
                           "--threads", "1"], capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| step")]
    assert [r[0].strip() for r in rows] == [f"step {i}: {p}" for i in (1, 2) for p in
                                            ("teacher forward", "student forward + loss", "backward", "optimizer")]
    for _, live, held, rss in rows:
        assert min(int(live), int(held), int(rss)) >= 0   # peaks above the set-up level, in MiB


def test_loader_bench_compares_state_every_and_rejects_bad_input():
    script = ROOT / "benchmarks" / "bench_loader.py"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--buffers", "8", "--seq", "48", "--batch", "4",
                           "--batches", "3", "--workers", "1", "--state-every", "1,4"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| 8 |")]
    assert [int(r[1]) for r in rows] == [1, 4]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)
    for bad, opt in ((["--state-every", "0"], "--state-every"), (["--buffers", "x"], "--buffers")):
        out = subprocess.run([sys.executable, str(script), "--smoke", *bad], capture_output=True, text=True,
                             timeout=120, cwd=ROOT)
        assert out.returncode == 2 and opt in out.stderr and "Traceback" not in out.stderr


def test_optimizer_bench_rows_match_the_plain_loop_and_bad_input_is_named(tmp_path):
    script = ROOT / "benchmarks" / "bench_optimizer.py"
    out = tmp_path / "opt.json"
    proc = subprocess.run([sys.executable, str(script), "--models", "tiny", "--steps", "2", "--warmup", "1",
                           "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    data = json.loads(out.read_text())
    assert data["partial"] is False
    rows = data["rows"]
    assert [r["impl"] for r in rows] == ["torch_loop", "torch_foreach", "torch_fused", "ds_cpu_adam"]
    assert sum(r["fastest"] for r in rows) == 1
    for r in rows:   # every implementation took the same 3 steps as torch's plain loop
        assert r["max_abs_diff_vs_torch_loop"] < 1e-5 and r["step_ms"] > 0 and r["state_mib"] > 0
    for bad, opt in ((["--models", "gpt"], "--models"), (["--impls", "sgd"], "--impls"),
                     (["--impls", "ds_fused_adam", "--models", "tiny"], "--impls")):
        res = subprocess.run([sys.executable, str(script), *bad], capture_output=True, text=True, timeout=300,
                             cwd=ROOT)
        assert res.returncode == 2 and opt in res.stderr and "Traceback" not in res.stderr


@pytest.mark.gpu
def test_gpu_optimizer_bench(tmp_path):
    # torch fused AdamW against DeepSpeed's FusedAdam on the GPU (compiles fused_adam once).
    out = tmp_path / "opt.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_optimizer.py"), "--device", "cuda",
                           "--models", "tiny", "--steps", "2", "--warmup", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"torch_loop", "torch_foreach", "torch_fused", "ds_fused_adam"}
    assert all(r["max_abs_diff_vs_torch_loop"] < 1e-5 for r in rows)


@pytest.mark.gpu
def test_gpu_smoke_bf16_table(tmp_path):
    # Run with `pytest -m gpu tests/benchmarks` on a GPU host before taking the GPU table.
    import torch

    if not torch.cuda.is_available():
        pytest.fail("the gpu marker was selected on a host where torch sees no GPU")
    out = tmp_path / "bench.json"
    proc = _run("--smoke", "--steps", "2", "--warmup", "1", "--device", "cuda", "--dtype", "bf16",
                "--models", "bert-large", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    data = json.loads(out.read_text())
    assert data["machine"]["gpu"] and data["matmul_peak"]["device"] == "cuda"
    for r in data["results"]:
        assert r["memory_kind"] == "cuda_allocated" and r["peak_growth_mib"] > 0 and r["loss_finite"]
    assert data["results"][0]["relation_kl_kernel"] == "triton"   # the recipe's GPU path, not the CPU one
    assert [t["target"].split(":")[1].strip() for t in data["targets"]] == ["MFU >= 45% of the bf16 matmul peak"]


def test_ceiling_bench_components_add_up_to_the_step(tmp_path):
    # The worker itself raises if the components' FLOPs differ from _common.step_flops.
    out = tmp_path / "ceiling.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ceiling.py"), "--smoke", "--threads", "1",
                           "--steps", "1", "--warmup", "1", "--reps", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    assert "| component | calls | GFLOP | ms | GFLOP/s | % of peak |" in proc.stdout
    data = json.loads(out.read_text())
    assert data["partial"] is False and not (tmp_path / "ceiling.json.tmp").exists()
    (r,) = data["results"]
    names = [c["component"] for c in r["components"]]
    assert any("teacher linear" in n for n in names) and any("weight grad" in n for n in names)
    assert any("relation KL" in n for n in names) and any("student attention" in n for n in names)
    assert abs(sum(c["flops"] for c in r["components"]) - r["flops_per_step"]) <= 1e-9 * r["flops_per_step"]
    s = r["summary"]
    assert s["ceiling_mfu"] > s["toolkit_mfu"] > 0          # the kernel sum is part of the step
    assert s["gemm_bound_ratio"] > 0 and s["ceiling_ratio"] > 0
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ceiling.py"), "--allocator", "hoard"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--allocator" in bad.stderr


@pytest.mark.gpu
def test_gpu_ceiling_bench_bf16(tmp_path):
    # The ceiling on a GPU: bf16 kernels, the Triton relation KL (impl auto), CUDA timing.
    import torch

    if not torch.cuda.is_available():
        pytest.fail("the gpu marker was selected on a host where torch sees no GPU")
    out = tmp_path / "ceiling.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_ceiling.py"), "--smoke", "--device", "cuda",
                           "--dtype", "bf16", "--models", "bert-large", "--steps", "2", "--warmup", "1", "--reps", "2",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    data = json.loads(out.read_text())
    assert data["machine"]["gpu"]
    (r,) = data["results"]
    assert r["matmul_peak"]["device"] == "cuda" and r["matmul_peak"]["dtype"] == "bf16"
    assert r["summary"]["ceiling_mfu"] > 0


def test_exp_bench_rows_and_bad_shape():
    script = str(ROOT / "benchmarks" / "bench_exp.py")
    proc = subprocess.run([sys.executable, script, "--shape", "1x2x4x48", "--reps", "1", "--threads", "1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| fill | exp ms | softmax ms | log_softmax ms |" in proc.stdout and "finfo.min" in proc.stdout
    bad = subprocess.run([sys.executable, script, "--shape", "2x3"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT)
    assert bad.returncode == 2 and "--shape" in bad.stderr
