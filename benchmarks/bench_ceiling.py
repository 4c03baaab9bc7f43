"""How fast could the distillation step be with this machine's own kernels? A ceiling, measured.

For one (seq, batch), a fresh worker process times every matmul-class kernel the toolkit's step
runs, at the step's exact shapes and with PyTorch's kernels:

* the linear layers: teacher and student forward, the student's input and weight gradients, each
  with the GEMM the step uses (``F.linear`` / ``mm``: MKL on x86 CPUs, cuBLAS on GPUs);
* attention (``scaled_dot_product_attention``): forward for the teacher's layers, forward +
  backward for the student's;
* the MiniLMv2 relation KL, the three relations forward + backward, with the toolkit's own
  kernel (``impl="auto"``).

Their sum is the step with every non-matmul cost (embeddings, layer norms, residual adds,
dropout, GELU, the optimizer, Python) taken away: no implementation built on these kernels
runs faster. The same worker then times the toolkit's step and the plain baseline's step
(``bench_distill_step.py``'s ``ToolkitStep`` / ``BaselineStep``) on the same batch, so the
report shows in one run:

* ``ceiling MFU``: the useful FLOPs of the step (``_common.step_flops``; the components' FLOPs
  must add up to it, which the worker checks) over the kernel sum, against the matmul peak;
* ``ceiling ratio``: the baseline's measured step time over the kernel sum, i.e. the largest
  tokens/s ratio against this baseline that these kernels allow. Where it is below a target
  ratio, the target cannot be met on this machine without faster kernels;
* ``GEMM bound``: the same ratio if every FLOP ran at the rate the linear layers reach (large
  GEMMs), i.e. with attention and relation kernels as efficient as a large matmul.

Timings only; nothing is asserted about them in the tests. Usage::

    python benchmarks/bench_ceiling.py --seqs 64,128 --batches '64=32;128=32' --json ceiling.json
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from _common import (DTYPES, allocator_env, allocator_in_use, check_counts, cli_main, machine_info, markdown_table,
                     measure_matmul_peak, parse_int_list, relation_loss_flops, step_flops, time_calls, write_json)
from bench_distill_step import (MODEL_PRESETS, RELATIONS, BaselineStep, ToolkitStep, _shape, step_models,
                                bench_models, check_device, make_batch, parse_batches, peak_size,
                                run_worker_process)
from toolkit.errors import ConfigError, ToolkitError

RESULT_PREFIX = "CEILING_RESULT "


def time_median(fn: Callable[[], Any], reps: int, warmup: int, device: Any) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after ``warmup`` runs (GPU synchronized)."""
    return statistics.median(time_calls(fn, device, reps, warmup))


def linear_counts(layers: int, hidden: int, inter: int) -> Dict[tuple, int]:
    """``{(in, out): calls}`` of one encoder forward up to a layer that runs its Q/K/V only."""
    full = layers - 1
    counts: Dict[tuple, int] = {(hidden, hidden): 4 * full + 3}
    if full:
        counts[(hidden, inter)] = counts.get((hidden, inter), 0) + full
        counts[(inter, hidden)] = counts.get((inter, hidden), 0) + full
    return counts


def measure_components(step: ToolkitStep, batch: int, seq: int, relation_heads: int, reps: int, warmup: int,
                       device: torch.device, dtype: torch.dtype) -> List[Dict[str, Any]]:
    """Seconds and useful FLOPs of every matmul-class kernel of one toolkit step (see the docstring)."""
    tc, sc = step.teacher.config, step.student.config
    t_layers, s_layers = step.teacher_layers_run, sc.num_hidden_layers
    t_dtype = next(step_models(step)[0].parameters()).dtype
    m = batch * seq
    rows: List[Dict[str, Any]] = []

    def add(name: str, calls: int, flops_per_call: float, fn: Callable[[], Any]) -> None:
        if calls:
            s = time_median(fn, reps, warmup, device)
            rows.append({"component": name, "calls": calls, "flops": calls * flops_per_call, "s": calls * s})

    def linears(who: str, counts: Dict[tuple, int], wdtype: torch.dtype, backward: bool) -> None:
        for (k, n), calls in counts.items():
            x = torch.randn(m, k, device=device, dtype=wdtype)
            w = torch.randn(n, k, device=device, dtype=wdtype)
            b = torch.randn(n, device=device, dtype=wdtype)
            add(f"{who} linear {k}->{n} forward", calls, 2.0 * m * k * n, lambda: F.linear(x, w, b))
            if backward:
                go = torch.randn(m, n, device=device, dtype=wdtype)
                add(f"{who} linear {k}->{n} input grad", calls, 2.0 * m * k * n, lambda: go @ w)
                add(f"{who} linear {k}->{n} weight grad", calls, 2.0 * m * k * n, lambda: go.t() @ x)

    with torch.no_grad():
        linears("teacher", linear_counts(t_layers, tc.hidden_size, tc.intermediate_size), t_dtype, False)
    linears("student", linear_counts(s_layers, sc.hidden_size, sc.intermediate_size), dtype, True)

    def attention_inputs(cfg: Any, wdtype: torch.dtype, grad: bool) -> List[torch.Tensor]:
        h = cfg.num_attention_heads
        return [torch.randn(batch, h, seq, cfg.hidden_size // h, device=device, dtype=wdtype, requires_grad=grad)
                for _ in range(3)]

    # Attention FLOPs per layer: scores Q K^T and P V, 4 B L^2 H; the backward counts twice that.
    tq, tk, tv = attention_inputs(tc, t_dtype, False)
    with torch.no_grad():
        add("teacher attention forward (sdpa)", t_layers - 1, 4.0 * batch * seq * seq * tc.hidden_size,
            lambda: F.scaled_dot_product_attention(tq, tk, tv))
    sq, sk, sv = attention_inputs(sc, dtype, True)
    go_att = torch.randn_like(sq)

    def student_attention() -> None:
        F.scaled_dot_product_attention(sq, sk, sv).backward(go_att)
    add("student attention forward + backward (sdpa)", s_layers - 1,
        3 * 4.0 * batch * seq * seq * sc.hidden_size, student_attention)

    # The toolkit's relation loss: its own module, three relations, forward + backward.
    loss_fn = step.module.losses["minilmv2"].relation   # the relation math on explicit tensors
    t_qkv = {p: torch.randn(batch, seq, tc.hidden_size, device=device, dtype=t_dtype) for p in RELATIONS}
    s_qkv = {p: torch.randn(batch, seq, sc.hidden_size, device=device, dtype=dtype, requires_grad=True)
             for p in RELATIONS}
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)

    def relation() -> None:
        loss_fn(s_qkv, t_qkv, mask)["loss"].backward()
    add(f"relation KL forward + backward ({len(RELATIONS)} relations, {relation_heads} heads)", 1,
        relation_loss_flops(batch, seq, tc.hidden_size, sc.hidden_size, len(RELATIONS)), relation)
    return rows


def _time_step(impl: Any, data: Dict[str, torch.Tensor], args: argparse.Namespace, device: torch.device) -> float:
    """Median seconds of one whole optimizer step of ``impl`` (a bench_distill_step step)."""
    phases: Dict[str, float] = {}
    return time_median(lambda: impl.step(data, phases), args.steps, args.warmup, device)


def run_worker(seq: int, batch: int, args: argparse.Namespace) -> Dict[str, Any]:
    """Components, then the toolkit step, then the baseline step, all in this process."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    models = bench_models(args.smoke, args.models)
    peak = measure_matmul_peak(peak_size(args.smoke, args.device), dtype=args.dtype, device=args.device)
    tk = ToolkitStep(models, device=args.device, dtype=args.dtype)
    comps = measure_components(tk, batch, seq, models.relation_heads, args.reps, args.warmup, device, dtype)
    flops = step_flops(_shape(tk.teacher.config, tk.teacher_layers_run),
                       _shape(tk.student.config, tk.student.config.num_hidden_layers), batch, seq,
                       relations=len(RELATIONS))
    comp_flops = sum(c["flops"] for c in comps)
    if abs(comp_flops - flops) > 1e-9 * flops:
        raise ToolkitError(f"the components' FLOPs ({comp_flops:.6e}) differ from the step's FLOP count "
                           f"({flops:.6e}): the component list and _common.step_flops disagree")
    data = {k: v.to(device) for k, v in make_batch(models, batch, seq).items()}
    steps = {"toolkit": _time_step(tk, data, args, device)}
    del tk   # the toolkit's models go before the baseline's are built
    steps["baseline"] = _time_step(BaselineStep(models, device=args.device, dtype=args.dtype), data, args, device)
    return {"seq": seq, "batch": batch, "threads": torch.get_num_threads(), "allocator": allocator_in_use(),
            "matmul_peak": peak.as_dict(), "components": comps, "flops_per_step": flops,
            "kernel_sum_s": sum(c["s"] for c in comps), "toolkit_step_s": steps["toolkit"],
            "baseline_step_s": steps["baseline"]}


def summarize(r: Dict[str, Any], peak_flops: float) -> Dict[str, Any]:
    """MFU of the measured steps and of the kernel sum; speed-up measured and at the ceiling."""
    f, ks, tk, bl = r["flops_per_step"], r["kernel_sum_s"], r["toolkit_step_s"], r["baseline_step_s"]
    lin = [c for c in r["components"] if " linear " in c["component"]]
    # All of the step's FLOPs at the linear layers' own rate: attention and relation kernels as
    # efficient as large GEMMs, and nothing else costing anything.
    gemm_rate = sum(c["flops"] for c in lin) / sum(c["s"] for c in lin)
    return {"toolkit_mfu": f / tk / peak_flops, "ceiling_mfu": f / ks / peak_flops, "baseline_mfu": f / bl / peak_flops,
            "overhead_s": tk - ks, "measured_ratio": bl / tk, "ceiling_ratio": bl / ks,
            "gemm_rate_gflops": gemm_rate / 1e9, "gemm_bound_ratio": bl / (f / gemm_rate)}


def spawn(seq: int, batch: int, args: argparse.Namespace) -> Dict[str, Any]:
    """:func:`run_worker` in a fresh interpreter under the asked allocator; errors become a row."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--seqs", str(seq), "--batches", str(batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--reps", str(args.reps),
           "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype, "--models", args.models]
    if args.smoke:
        cmd.append("--smoke")
    return run_worker_process(cmd, args.allocator, args.threads, args.worker_timeout, RESULT_PREFIX,
                              {"seq": seq, "batch": batch})


def render(r: Dict[str, Any], peak_flops: float) -> str:
    """One (seq, batch): the component table and the summary lines, Markdown."""
    rows = [[c["component"], c["calls"], f"{c['flops'] / 1e9:.2f}", f"{1e3 * c['s']:.1f}",
             f"{c['flops'] / c['s'] / 1e9:.0f}", f"{100 * c['flops'] / c['s'] / peak_flops:.0f}"]
            for c in r["components"]]
    s = r["summary"]
    rows.append(["**kernel sum**", "", f"{r['flops_per_step'] / 1e9:.2f}", f"{1e3 * r['kernel_sum_s']:.1f}",
                 f"{r['flops_per_step'] / r['kernel_sum_s'] / 1e9:.0f}", f"{100 * s['ceiling_mfu']:.1f}"])
    table = markdown_table(["component", "calls", "GFLOP", "ms", "GFLOP/s", "% of peak"], rows)
    return (f"### seq {r['seq']}, batch {r['batch']} ({r['allocator']} allocator)\n\n{table}\n\n"
            f"- toolkit step {1e3 * r['toolkit_step_s']:.0f} ms (MFU {100 * s['toolkit_mfu']:.1f}%): "
            f"{1e3 * s['overhead_s']:.0f} ms above the kernel sum (non-matmul work)\n"
            f"- ceiling MFU (kernel sum only): {100 * s['ceiling_mfu']:.1f}%\n"
            f"- baseline step {1e3 * r['baseline_step_s']:.0f} ms (MFU {100 * s['baseline_mfu']:.1f}%): "
            f"toolkit/baseline tokens/s measured {s['measured_ratio']:.2f}x, at most {s['ceiling_ratio']:.2f}x "
            f"with these kernels, {s['gemm_bound_ratio']:.2f}x if all of it ran at the linear layers' "
            f"{s['gemm_rate_gflops']:.0f} GFLOP/s")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default=None, help="comma-separated sequence lengths (default 128,512)")
    p.add_argument("--batches", default=None, help="'128=32;512=4' per seq, or one list for all")
    p.add_argument("--allocator", default="system", help="system, tcmalloc or jemalloc (the worker's malloc)")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each whole step")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before each timing")
    p.add_argument("--reps", type=int, default=5, help="timed runs of each component")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--models", default="minilm", choices=MODEL_PRESETS)
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    p.add_argument("--smoke", action="store_true", help="tiny random models: checks the plumbing")
    p.add_argument("--worker-timeout", type=int, default=900, help="seconds before a run is abandoned")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli_main(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    check_counts(args, ("steps", "reps", "threads"))
    if args.allocator not in ("system", "tcmalloc", "jemalloc"):
        raise ConfigError("--allocator", f"unknown allocator {args.allocator!r}; choose system, tcmalloc or jemalloc")
    allocator_env(args.allocator, {})   # a missing library fails here, with how to install it
    check_device(argparse.Namespace(**vars(args), profile=False))   # no GPU, or emulated bf16 on this CPU
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    seqs = parse_int_list(args.seqs or ("16" if args.smoke else "128,512"), "--seqs")
    if args.worker:
        batch = parse_int_list(args.batches or "2", "--batches")[0]
        print(RESULT_PREFIX + json.dumps(run_worker(seqs[0], batch, args)), flush=True)
        return 0
    batches = parse_batches(args.batches, seqs, args.smoke)
    info = machine_info(args.threads)
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    where = info.get("gpu", info["cpu"])
    print(f"# distillation step ceiling\n\nmachine: {where}, {args.threads} threads, torch {info['torch']}, "
          f"{info['date']}, loadavg {info['loadavg']}; {args.dtype} on {args.device}, models {args.models}\n")
    command = "python benchmarks/bench_ceiling.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    results: List[Dict[str, Any]] = []
    for seq in seqs:
        for b in batches[seq]:
            results.append(spawn(seq, b, args))
            if args.json:   # after every row: a run stopped by a time limit keeps what it finished
                write_json(args.json, {"machine": info, "command": command, "partial": True, "results": results})
    ok = [r for r in results if "error" not in r]
    # As bench_distill_step: MFU divides by the best matmul rate seen in the run.
    peak_flops = max([1e9 * r["matmul_peak"]["best_gflops"] for r in ok], default=float("nan"))
    for r in results:
        if "error" in r:
            print(f"### seq {r['seq']}, batch {r['batch']}: ERROR {r['error']}\n")
            continue
        r["summary"] = summarize(r, peak_flops)
        print(render(r, peak_flops) + "\n")
    print(f"MFU peak (best {args.dtype} matmul seen in the run): {peak_flops / 1e9:.1f} GFLOP/s")
    if args.json:
        write_json(args.json, {"machine": info, "command": command, "partial": False,
                               "peak_gflops": peak_flops / 1e9, "results": results})
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
