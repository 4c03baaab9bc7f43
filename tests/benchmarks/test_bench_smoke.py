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
    # Matrices made in the worker itself stayed resident in tcmalloc's caches and the step reused
    # them: its memory growth read ~45 MiB low at seq 512 batch 4. In a sibling process they cost
    # the worker nothing.
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


def test_matmul_peak_is_the_faster_gemm_library():
    """On CPUs in fp32 the teacher runs oneDNN's GEMM (toolkit/models/onednn.py), ~20% faster than
    torch.matmul's MKL on the AMD hosts measured: the peak MFU divides by is the faster of the two,
    each reported, so MFU never credits the step with beating a slower reference GEMM."""
    from toolkit.models.onednn import onednn_unavailable_reason

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import MatmulProbeProcess, measure_matmul_peak
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    want = {"torch.matmul"} if onednn_unavailable_reason() else {"torch.matmul", "oneDNN"}
    peak = measure_matmul_peak(256, reps=3, warmup=1)
    assert set(peak.by_backend) == want
    assert peak.best_flops / 1e9 == pytest.approx(max(peak.by_backend.values()))
    assert peak.as_dict()["by_backend_gflops"] == peak.by_backend
    with MatmulProbeProcess(256, "fp32", "cpu", threads=1) as probe:   # the same through the child's JSON
        child = probe.measure(reps=2, warmup=1)
    assert set(child.by_backend) == want and child.best_flops / 1e9 == pytest.approx(max(child.by_backend.values()))


def test_json_is_written_after_every_row(tmp_path):
    """A run stopped early (a lent GPU's time limit) keeps the rows it finished: the JSON is
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
    from toolkit.kernels import cpu_rows

    # On CPUs the chunked path's block math is named: for bf16 inputs the blocks (the fused kernel
    # takes fp32 only), with the compiled row kernel where a C compiler is.
    want = "chunked, compiled CPU rows" if cpu_rows.find_compiler() else "chunked, torch rows ("
    assert tk["relation_kl_kernel"].startswith(want) and bl["relation_kl_kernel"] == "naive (baseline)"
    assert data["targets"] == []      # the issue sets no target for bf16 on a CPU


def test_toolkit_torchrows_runs_the_torch_block_math(tmp_path):
    out = tmp_path / "bench.json"
    proc = _run("--smoke", "--impls", "toolkit_torchrows,toolkit", "--steps", "1", "--warmup", "0", "--threads", "1",
                "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    rows = {r["impl"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["toolkit_torchrows"]["relation_kl_kernel"] == "chunked, torch rows (turned off by TOOLKIT_CPU_KERNEL=0)"
    assert rows["toolkit_torchrows"]["loss_finite"] and rows["toolkit"]["loss_finite"]
    # Same seeds, same batch: the same loss to fp32 rounding. The tiny random models' KL is
    # ~4e-4, a difference of O(1e-2) terms, where the torch block math's fp32 row sums leave
    # ~1e-4 relative error (the compiled rows avoid that cancellation; docs/KERNELS.md).
    assert rows["toolkit_torchrows"]["losses"] == pytest.approx(rows["toolkit"]["losses"], rel=1e-3)


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


def test_relation_kl_bench_compares_the_cpu_implementations():
    script = ROOT / "benchmarks" / "bench_relation_kl.py"
    proc = subprocess.run([sys.executable, str(script), "--shapes", "2x16", "--reps", "1", "--threads", "1",
                           "--impls", "chunked,chunked_blocks,chunked_torchrows", "--pad-frac", "0.25"],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "chunked block math: " in proc.stdout and "chunked on this CPU: " in proc.stdout
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line[2:3].isdigit()]
    assert [r[1].strip() for r in rows] == ["chunked", "chunked_blocks", "chunked_torchrows"]
    assert float(rows[1][5]) < 1e-4 and float(rows[2][5]) < 1e-4


def test_row_kernel_ab_alternates_both_arms_and_names_bad_input(tmp_path):
    from toolkit.kernels import cpu_rows

    script = ROOT / "benchmarks" / "bench_row_kernel_ab.py"
    out = tmp_path / "ab.json"
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--shapes", "16x2", "--rounds", "2", "--per-arm", "1",
                           "--warmup", "0", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    if cpu_rows.load() is None:   # nothing to compare: a one-line error naming why
        assert proc.returncode == 2 and "TOOLKIT_CPU_KERNEL" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| seq | batch | step ms, compiled rows | step ms, torch rows |" in proc.stdout
    data = json.loads(out.read_text())
    assert data["partial"] is False and len(data["results"]) == 1
    r = data["results"][0]
    assert (r["seq"], r["batch"]) == (16, 2)
    assert r["switch"] == "cpu-rows"
    assert len(r["on_ms_all"]) == len(r["off_ms_all"]) == 2 and len(r["round_speedups"]) == 2
    assert r["speedup_of_medians"] == pytest.approx(r["off_ms"] / r["on_ms"])
    # Every other switch, each where its fast path runs here, else a one-line error naming its
    # variable; the step is left as the recipe runs it.
    from toolkit.kernels import cpu_attention, cpu_dropout, cpu_linear, cpu_relation, cpu_wgrad
    from toolkit.models import onednn

    onednn_ok = onednn.onednn_unavailable_reason() is None
    switches = [  # (switch, runs here, arm names in the header, the variable named when it cannot run)
        ("teacher-onednn", onednn_ok, ("teacher oneDNN", "teacher MKL"), "TOOLKIT_ONEDNN_LINEAR"),
        ("student-onednn", onednn_ok, ("student oneDNN", "student MKL"), "TOOLKIT_ONEDNN_LINEAR"),
        ("cpu-attention", cpu_attention.load() is not None, ("attention kernel", "sdpa"), "TOOLKIT_CPU_ATTENTION"),
        ("cpu-dropout", cpu_dropout.load() is not None, ("compiled masks", "torch masks"), "TOOLKIT_CPU_DROPOUT"),
        ("cpu-wgrad", onednn_ok and cpu_wgrad.load() is not None, ("wgrad kernel", "mm + sum"), "TOOLKIT_CPU_WGRAD"),
        ("cpu-linear", onednn_ok and cpu_linear.load() is not None, ("GEMM kernel", "oneDNN"), "TOOLKIT_CPU_LINEAR"),
        ("cpu-relation", cpu_relation.load() is not None, ("fused relation KL", "chunked blocks"),
         "TOOLKIT_CPU_RELATION"),
        ("teacher-gelu", onednn_ok and onednn._gelu_postop_reason() is None, ("fused GELU", "separate GELU"),
         "TOOLKIT_ONEDNN_LINEAR"),
        ("ffn-recompute", onednn_ok and cpu_linear.load() is not None, ("recomputed", "kept"), "TOOLKIT_CPU_LINEAR"),
    ]
    for switch, runs, (on, off), variable in switches:
        proc = subprocess.run([sys.executable, str(script), "--smoke", "--shapes", "16x2", "--rounds", "1", "--per-arm",
                               "1", "--warmup", "0", "--threads", "1", "--switch", switch],
                              capture_output=True, text=True, timeout=240, cwd=ROOT)
        if runs:
            assert proc.returncode == 0, (switch, proc.stderr[-2000:])
            assert f"| seq | batch | step ms, {on} | step ms, {off} |" in proc.stdout, switch
        else:
            assert proc.returncode == 2 and variable in proc.stderr, switch
    bad = subprocess.run([sys.executable, str(script), "--shapes", "16by2"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--shapes" in bad.stderr and "16by2" in bad.stderr
    bad = subprocess.run([sys.executable, str(script), "--rounds", "0"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--rounds" in bad.stderr


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


@pytest.mark.slow   # the real teacher and corpus, one whole job per allocator: `make test-slow`
def test_job_allocator_bench_runs_the_real_job_under_each_allocator(tmp_path):
    from toolkit.demo import resources as res
    from toolkit.errors import ToolkitError
    from toolkit.launch import allocator

    try:
        res.teacher_dir()
    except ToolkitError as e:
        pytest.skip(f"not fetched; run `bash scripts/fetch_resources.sh` ({e})")
    allocs = ["system"] + (["tcmalloc"] if allocator.find_library("tcmalloc", allocator.search_dirs()) else [])
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_job_allocator.py"), "--allocators",
                           ",".join(allocs), "--reps", "1", "--steps", "2", "--batch", "2", "--seq", "32",
                           "--student-layers", "1", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    rows = json.loads(out.read_text())
    # Each job reports the allocator it really ran on (from its own metrics.json).
    assert [(r["allocator_asked"], r["allocator"]) for r in rows] == [(a, a) for a in allocs]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in rows)
    assert "| allocator | ran on | tokens/s" in proc.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_job_allocator.py"), "--allocators",
                          "mimalloc"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "mimalloc" in bad.stderr and "Traceback" not in bad.stderr


def test_dropout_bench_compares_both_and_rejects_bad_input():
    script = ROOT / "benchmarks" / "bench_dropout.py"
    proc = subprocess.run([sys.executable, str(script), "--shapes", "2x16x8", "--reps", "2", "--threads", "1"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [line.split("|")[1:-1] for line in proc.stdout.splitlines() if line.startswith("| 2x16x8")]
    assert [r[1].strip() for r in rows] == ["torch F.dropout", "toolkit fast_dropout",
                                            "toolkit fast_dropout, torch random_() masks"]
    assert all(0.5 < float(r[4]) <= 1.0 for r in rows)   # p = 0.1 keeps most of 256 elements
    for bad, opt in ((["--shapes", "2x16"], "--shapes"), (["--p", "1.5"], "--p")):
        out = subprocess.run([sys.executable, str(script), *bad], capture_output=True, text=True, timeout=120,
                             cwd=ROOT)
        assert out.returncode == 2 and opt in out.stderr and "Traceback" not in out.stderr


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


def test_attention_bench_times_both_and_checks_both_against_float64(tmp_path):
    from toolkit.kernels import cpu_attention

    script = ROOT / "benchmarks" / "bench_attention.py"
    out = tmp_path / "attn.json"
    proc = subprocess.run([sys.executable, str(script), "--shapes", "2x24", "--heads", "2", "--head-dim", "26",
                           "--reps", "2", "--warmup", "1", "--threads", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    if cpu_attention.load() is None:   # nothing to compare: a one-line error naming why
        assert proc.returncode == 2 and "TOOLKIT_CPU_ATTENTION" in proc.stderr
        return
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())["results"][0]
    assert (r["batch"], r["seq"], r["heads"], r["head_dim"]) == (2, 24, 2, 26)
    for arm in ("kernel fwd", "sdpa fwd", "kernel fwd+bwd", "sdpa fwd+bwd"):
        assert len(r[arm]["all_ms"]) == 2 and r[arm]["ms"] > 0
    assert r["max_abs_err_vs_fp64"]["kernel"] < 1e-5 and r["max_abs_err_vs_fp64"]["sdpa"] < 1e-5
    bad = subprocess.run([sys.executable, str(script), "--shapes", "2by24"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--shapes" in bad.stderr


def test_gemm_bench_times_every_gemm_library_and_checks_each_against_float64(tmp_path):
    from toolkit.kernels import cpu_linear, cpu_wgrad
    from toolkit.models.onednn import onednn_unavailable_reason

    script = ROOT / "benchmarks" / "bench_gemm.py"
    out = tmp_path / "gemm.json"
    proc = subprocess.run([sys.executable, str(script), "--tokens", "37", "--layers", "40x70", "--rounds", "2",
                           "--warmup", "1", "--threads", "1", "--peak-n", "64", "--all-gelu", "--json", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["partial"] is False and len(data["matmul_peaks"]) == 2
    rows = {(r["op"], r["impl"]): r for r in data["results"]}
    expect = {"MKL", "kernel"} | ({"oneDNN"} if onednn_unavailable_reason() is None else set())
    for op in ("fwd", "fwd_gelu", "dgrad"):
        assert {impl for o, impl in rows if o == op} == expect
    assert {impl for o, impl in rows if o == "wgrad"} == {"MKL", "kernel"}
    for (op, impl), r in rows.items():
        assert (r["tokens"], r["in"], r["out"]) == (37, 40, 70)
        kernel_off = {"fwd": cpu_linear, "fwd_gelu": cpu_linear, "dgrad": cpu_linear, "wgrad": cpu_wgrad}[op]
        if "unavailable" in r:   # a kernel that did not build here is a row that says why
            assert impl == "kernel" and kernel_off.load() is None and r["unavailable"]
            continue
        assert r["median_gflops"] > 0 and r["best_gflops"] >= r["median_gflops"]
        assert r["max_rel_err"] < 1e-5, (op, impl, r["max_rel_err"])
    assert rows[("fwd", "MKL")]["speedup_vs_mkl"] == 1.0
    bad = subprocess.run([sys.executable, str(script), "--ops", "fwd,matmul"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "--ops" in bad.stderr
