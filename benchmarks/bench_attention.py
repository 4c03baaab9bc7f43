"""Time one attention call alone: the compiled CPU attention kernel against torch's sdpa.

One call is ``softmax(Q K^T / sqrt(D) + mask) V`` on ``[B, H, L, D]`` views of ``[B, L, 3*H*D]``
projections (how the encoders hand Q, K and V over), with one sample's last quarter padded. Both
run in this process on the same inputs, interleaved call by call; the medians of ``--reps``
calls after a warm-up are printed with GFLOP/s (``4 B H L^2 D`` per forward, ``14 B H L^2 D``
per forward + backward: the backward recomputes ``Q K^T`` and does four more products) and the
largest difference of each against float64. ``fwd``: no-grad forward (the teacher's);
``fwd+bwd``: forward and backward (the student's; the kernel's backward is sdpa's own flash
backward). Nothing is asserted on time.

Usage::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
        python benchmarks/bench_attention.py --shapes 32x128,8x128,4x512,16x512 --json out.json
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import check_counts, cli_main, machine_info, markdown_table, parse_dims, write_json  # noqa: E402

from toolkit.errors import ConfigError  # noqa: E402
from toolkit.kernels import cpu_attention  # noqa: E402


def make_inputs(batch: int, seq: int, heads: int, head_dim: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, 3 * heads * head_dim, generator=gen)
    q, k, v = (t.view(batch, seq, heads, head_dim).transpose(1, 2) for t in x.split(heads * head_dim, dim=-1))
    valid = torch.ones(batch, seq, dtype=torch.bool)
    valid[0, seq - seq // 4:] = False
    return x, q, k, v, valid[:, None, None, :]


def run_shape(batch: int, seq: int, heads: int, head_dim: int, reps: int, warmup: int) -> Dict[str, Any]:
    x, q, k, v, mask = make_inputs(batch, seq, heads, head_dim)
    scale = head_dim ** -0.5
    ref = cpu_attention.reference(q, k, v, mask, scale)[0]
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))

    def kernel_fwd():
        with torch.no_grad():
            return cpu_attention.attention(q, k, v, mask, scale)

    def sdpa_fwd():
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)

    xg = x.clone().requires_grad_()
    qg, kg, vg = (t.view(batch, seq, heads, head_dim).transpose(1, 2) for t in xg.split(heads * head_dim, dim=-1))

    def kernel_both():
        xg.grad = None
        cpu_attention.attention(qg, kg, vg, mask, scale).backward(g)

    def sdpa_both():
        xg.grad = None
        F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale).backward(g)

    arms = {"kernel fwd": kernel_fwd, "sdpa fwd": sdpa_fwd, "kernel fwd+bwd": kernel_both, "sdpa fwd+bwd": sdpa_both}
    for fn in arms.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in arms}
    for _ in range(reps):   # interleaved, so the host's drift lands on both
        for name, fn in arms.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    fwd_flops = 4.0 * batch * heads * seq * seq * head_dim
    out: Dict[str, Any] = {"batch": batch, "seq": seq, "heads": heads, "head_dim": head_dim}
    for name, ts in times.items():
        med = statistics.median(ts)
        flops = fwd_flops * (3.5 if "bwd" in name else 1.0)
        out[name] = {"ms": 1e3 * med, "gflops": flops / med / 1e9, "all_ms": [1e3 * t for t in ts]}
    out["max_abs_err_vs_fp64"] = {
        "kernel": float((kernel_fwd().double() - ref).abs().max()),
        "sdpa": float((sdpa_fwd().double() - ref).abs().max()),
    }
    out["speedup_fwd"] = out["sdpa fwd"]["ms"] / out["kernel fwd"]["ms"]
    out["speedup_fwd_bwd"] = out["sdpa fwd+bwd"]["ms"] / out["kernel fwd+bwd"]["ms"]
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="32x128,8x128,4x512,16x512", help="BATCHxSEQ list")
    p.add_argument("--heads", type=int, default=12, help="attention heads (all-MiniLM-L6-v2: 12)")
    p.add_argument("--head-dim", type=int, default=32, help="head size (all-MiniLM-L6-v2: 32)")
    p.add_argument("--reps", type=int, default=15, help="timed calls per arm")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per arm")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p


def _main(args: argparse.Namespace) -> int:
    check_counts(args, ["reps", "threads", "heads", "head_dim"])
    shapes = parse_dims(args.shapes, "--shapes", ("batch", "seq"), "32x128")
    torch.set_num_threads(args.threads)
    if cpu_attention.load() is None:
        raise ConfigError("TOOLKIT_CPU_ATTENTION", f"the compiled CPU attention kernel does not run here "
                          f"({cpu_attention.unavailable_reason()}): nothing to compare")
    info = machine_info(args.threads)
    print(f"# attention: compiled CPU kernel vs sdpa ({args.heads} heads x {args.head_dim}, {args.threads} threads, "
          f"torch {torch.__version__})\n")
    rows, results = [], []
    for batch, seq in shapes:
        r = run_shape(batch, seq, args.heads, args.head_dim, args.reps, args.warmup)
        results.append(r)
        rows.append([seq, batch, f"{r['kernel fwd']['ms']:.2f} ({r['kernel fwd']['gflops']:.0f})",
                     f"{r['sdpa fwd']['ms']:.2f} ({r['sdpa fwd']['gflops']:.0f})", f"{r['speedup_fwd']:.2f}x",
                     f"{r['kernel fwd+bwd']['ms']:.2f} ({r['kernel fwd+bwd']['gflops']:.0f})",
                     f"{r['sdpa fwd+bwd']['ms']:.2f} ({r['sdpa fwd+bwd']['gflops']:.0f})",
                     f"{r['speedup_fwd_bwd']:.2f}x",
                     f"{r['max_abs_err_vs_fp64']['kernel']:.1e} / {r['max_abs_err_vs_fp64']['sdpa']:.1e}"])
        if args.json:
            write_json(args.json, {"command": sys.argv, "machine": info, "partial": True, "results": results})
    print(markdown_table(["seq", "batch", "kernel fwd ms (GFLOP/s)", "sdpa fwd ms (GFLOP/s)", "fwd speed-up",
                          "kernel fwd+bwd ms (GFLOP/s)", "sdpa fwd+bwd ms (GFLOP/s)", "fwd+bwd speed-up",
                          "max |err| vs fp64, kernel / sdpa"], rows))
    if args.json:
        write_json(args.json, {"command": sys.argv, "machine": info, "partial": False, "results": results})
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli_main(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
