"""The linear layers' GEMMs alone: MKL, oneDNN and the toolkit's compiled CPU kernels, side by side.

The distillation step at seq 128 spends ~80% of its time in these products
(``benchmarks/results_profile_cpu_*.json``). This script times each of them outside the step, at
the step's shapes, so a change to a GEMM kernel (``toolkit/kernels/csrc/linear.c``,
``wgrad.c``) can be judged in seconds and kept as a JSON:

* ``fwd``: ``y = x Wᵀ + b`` (``F.linear`` on MKL, ``torch.ops.mkldnn._linear_pointwise`` on
  oneDNN, the compiled kernel);
* ``fwd_gelu``: ``gelu(x Wᵀ + b)`` (MKL then ``F.gelu``, oneDNN's GELU post-op, the kernel's
  epilogue);
* ``dgrad``: the input gradient ``dY W`` (MKL's ``mm``, oneDNN and the kernel on ``Wᵀ``);
* ``wgrad``: ``dW = dYᵀ X`` and ``db = Σ dY`` (MKL's ``mm`` + ``sum``, the compiled kernel).

For every shape the implementations run interleaved (one call each per round, the order rotated
each round) so the host's drift lands on all of them alike; the median and best GFLOP/s over
the rounds are reported, with the fp32 matmul peak (``2048²``, MKL and oneDNN, the peak the
step's MFU divides by) timed at the start and the end of the same run. Every result is also
checked against float64 once (``max_rel_err``). Nothing is asserted on time.

Usage::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
        python benchmarks/bench_gemm.py --tokens 4096,2048 --layers 384x384,384x1536,1536x384 \\
        --rounds 15 --json benchmarks/results_gemm_cpu.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import (MatmulProbe, check_counts, cli_main, machine_info, markdown_table,  # noqa: E402
                     parse_dims, parse_int_list, write_json)

from toolkit.errors import ConfigError  # noqa: E402
from toolkit.kernels import cpu_linear, cpu_wgrad  # noqa: E402
from toolkit.models.onednn import _gelu_postop_reason, onednn_gemm, onednn_unavailable_reason  # noqa: E402

OPS = ("fwd", "fwd_gelu", "dgrad", "wgrad")

Impl = Tuple[str, Callable[[], Any]]


def _max_rel_err(got: Any, want: Any) -> float:
    if isinstance(want, tuple):
        return max(_max_rel_err(g, w) for g, w in zip(got, want))
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _impls(op: str, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, dy: torch.Tensor) -> Tuple[
        List[Impl], Any, Dict[str, str]]:
    """The implementations of ``op`` at this shape, its float64 result, and why any is missing."""
    lin, wg = cpu_linear.load(), cpu_wgrad.load()
    onednn_off = onednn_unavailable_reason()
    missing: Dict[str, str] = {}
    impls: List[Impl] = []
    if op in ("fwd", "fwd_gelu"):
        gelu = op == "fwd_gelu"
        want = F.linear(x.double(), w.double(), b.double())
        want = F.gelu(want) if gelu else want
        impls.append(("MKL", (lambda: F.gelu(F.linear(x, w, b))) if gelu else (lambda: F.linear(x, w, b))))
        if onednn_off is None and not (gelu and _gelu_postop_reason()):
            impls.append(("oneDNN", (lambda: torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none"))
                          if gelu else (lambda: onednn_gemm(x, w, b))))
        else:
            missing["oneDNN"] = onednn_off or str(_gelu_postop_reason())
        if lin is not None:
            impls.append(("kernel", lambda: lin.linear(x, w, b, gelu=gelu)))
        else:
            missing["kernel"] = str(cpu_linear.unavailable_reason())
    elif op == "dgrad":
        want = dy.double() @ w.double()
        impls.append(("MKL", lambda: dy.mm(w)))
        if onednn_off is None:
            impls.append(("oneDNN", lambda: onednn_gemm(dy, w.t(), None)))
        else:
            missing["oneDNN"] = onednn_off
        if lin is not None:
            impls.append(("kernel", lambda: lin.linear(dy, w.t(), None)))
        else:
            missing["kernel"] = str(cpu_linear.unavailable_reason())
    else:
        want = (dy.double().t() @ x.double(), dy.double().sum(0))
        impls.append(("MKL", lambda: (dy.t().mm(x), dy.sum(0))))
        if wg is not None:
            impls.append(("kernel", lambda: wg.weight_grad(dy, x, True)))
        else:
            missing["kernel"] = str(cpu_wgrad.unavailable_reason())
    return impls, want, missing


def _time_interleaved(impls: Sequence[Impl], rounds: int, warmup: int) -> Dict[str, List[float]]:
    for _ in range(warmup):
        for _, fn in impls:
            fn()
    times: Dict[str, List[float]] = {name: [] for name, _ in impls}
    for r in range(rounds):
        for i in range(len(impls)):
            name, fn = impls[(i + r) % len(impls)]
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def run(args: argparse.Namespace) -> int:
    check_counts(args, ("rounds", "threads", "peak_n"))
    tokens_list = parse_int_list(args.tokens, "--tokens")
    layers = parse_dims(args.layers, "--layers", ("in", "out"), "384x1536")
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise ConfigError("--ops", f"expected a comma-separated list of {', '.join(OPS)}, got {args.ops!r}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    probe = MatmulProbe(args.peak_n)
    peaks = [probe.measure(reps=5, warmup=1).as_dict()]
    print(f"torch {torch.__version__}, {args.threads} threads, fp32; matmul peak ({args.peak_n}^2, best of "
          f"MKL/oneDNN) at the start: {peaks[0]['best_gflops']:.1f} GFLOP/s "
          f"({', '.join(f'{k} {v:.1f}' for k, v in (peaks[0]['by_backend_gflops'] or {}).items())})", flush=True)
    payload: Dict[str, Any] = {"machine": machine_info(args.threads), "command": sys.argv, "rounds": args.rounds,
                               "matmul_peaks": peaks, "results": [], "partial": True,
                               "kernels": {"cpu_linear": cpu_linear.unavailable_reason() or "loaded",
                                           "cpu_wgrad": cpu_wgrad.unavailable_reason() or "loaded"}}
    rows = []
    with torch.inference_mode(False), torch.no_grad():
        for tokens in tokens_list:
            for n_in, n_out in layers:
                x = torch.randn(tokens, n_in)
                w = torch.randn(n_out, n_in) / n_in ** 0.5
                b = torch.randn(n_out)
                dy = torch.randn(tokens, n_out)
                for op in ops:
                    if op == "fwd_gelu" and args.gelu_only_up and n_out <= n_in:
                        continue
                    impls, want, missing = _impls(op, x, w, b, dy)
                    flops = 2.0 * tokens * n_in * n_out
                    times = _time_interleaved(impls, args.rounds, args.warmup)
                    base = statistics.median(times["MKL"])
                    for name, fn in impls:
                        med, best = statistics.median(times[name]), min(times[name])
                        entry = {"op": op, "tokens": tokens, "in": n_in, "out": n_out, "impl": name,
                                 "median_ms": 1e3 * med, "best_ms": 1e3 * best, "median_gflops": flops / med / 1e9,
                                 "best_gflops": flops / best / 1e9, "speedup_vs_mkl": base / med,
                                 "max_rel_err": _max_rel_err(fn(), want)}
                        payload["results"].append(entry)
                        rows.append([op, tokens, f"{n_in}->{n_out}", name, f"{entry['median_ms']:.2f}",
                                     f"{entry['median_gflops']:.1f}", f"{entry['best_gflops']:.1f}",
                                     f"{100 * entry['median_gflops'] / peaks[0]['best_gflops']:.1f}",
                                     f"{entry['speedup_vs_mkl']:.3f}", f"{entry['max_rel_err']:.1e}"])
                    for name, why in missing.items():
                        payload["results"].append({"op": op, "tokens": tokens, "in": n_in, "out": n_out,
                                                   "impl": name, "unavailable": why})
                        rows.append([op, tokens, f"{n_in}->{n_out}", name, "-", "-", "-", "-", "-", f"({why})"])
                    if args.json:
                        write_json(args.json, payload)
    peaks.append(probe.measure(reps=5, warmup=1).as_dict())
    payload["partial"] = False
    print(markdown_table(["op", "tokens", "in->out", "impl", "median ms", "median GFLOP/s", "best GFLOP/s",
                          "% of peak (median)", "x MKL", "max rel err vs float64"], rows))
    print(f"\nmatmul peak at the end: {peaks[1]['best_gflops']:.1f} GFLOP/s (start {peaks[0]['best_gflops']:.1f}); "
          f"'% of peak' divides by the start's")
    if args.json:
        write_json(args.json, payload)
        print(f"wrote {args.json}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="4096,2048",
                    help="rows (batch x seq) per product, comma-separated (default 4096,2048: 32x128 and 4x512)")
    ap.add_argument("--layers", default="384x384,384x1536,1536x384",
                    help="INxOUT of each linear layer (default: all-MiniLM-L6-v2's and the student's)")
    ap.add_argument("--ops", default=",".join(OPS), help=f"which products (default {','.join(OPS)})")
    ap.add_argument("--all-gelu", dest="gelu_only_up", action="store_false",
                    help="time fwd_gelu at every layer shape (default: only where OUT > IN, the feed-forward's up)")
    ap.add_argument("--rounds", type=int, default=15, help="timed calls per implementation, interleaved")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--peak-n", type=int, default=2048, help="size of the matmul peak's square product")
    ap.add_argument("--json", default=None)
    return cli_main(ap, run, argv)


if __name__ == "__main__":
    sys.exit(main())
