"""Time the MiniLMv2 relation KL alone, per implementation of the relation-KL registry.

One "call" is what one distillation step spends in the loss: three relations (QQ, KK, VV),
forward and backward, on random teacher/student projections ``[B, L, 384]`` with 12 relation
heads and no padding (the packed corpus has none). Every implementation named in ``--impls``
(``chunked``, ``naive``, ``triton`` on CUDA) runs in this process on the same inputs; the
script prints the median of ``--reps`` calls after one warm-up, and the largest relative
difference of loss and gradients to the first implementation. Nothing is asserted on time.

To compare with an earlier version of the kernel, put that version's checkout first on the
path; this script then times its ``toolkit``::

    git worktree add /tmp/old <commit> && PYTHONPATH=/tmp/old python benchmarks/bench_relation_kl.py

Usage::

    python benchmarks/bench_relation_kl.py --shapes 32x128,4x512,8x512 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import toolkit
from _common import parse_dims
from toolkit.errors import ConfigError
from toolkit.losses import relation_kl as registry

HIDDEN = 384
HEADS = 12


def parse_shapes(text: str) -> List[Tuple[int, int]]:
    """``"32x128,4x512"`` -> ``[(32, 128), (4, 512)]`` (batch x seq)."""
    return parse_dims(text, "--shapes", ("batch", "seq"), "32x128")


def time_loss(fn: Callable[..., Tensor], batch: int, seq: int, reps: int,
              chunk_size: Optional[int], pad_frac: float = 0.0) -> Dict[str, object]:
    """Median forward and backward ms of three relations; loss and gradients of the last call.

    ``pad_frac``: every other row has its last ``pad_frac * seq`` positions padded (a corpus
    that is not packed, or an evaluation batch); 0 is the packed corpus.
    """
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(batch, seq, HIDDEN, generator=g) for _ in range(3)]
    student = [torch.randn(batch, seq, HIDDEN, generator=g).requires_grad_(True) for _ in range(3)]
    mask = torch.ones(batch, seq, dtype=torch.long)
    n_pad = int(pad_frac * seq)
    if n_pad:
        mask[1::2, seq - n_pad:] = 0
    fwd, bwd = [], []
    for i in range(reps + 1):
        for s in student:
            s.grad = None
        t0 = time.perf_counter()
        loss = sum(fn(t, t, s, s, mask, HEADS, chunk_size) for t, s in zip(teacher, student))
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        if i:   # the first call warms up
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
    return {"fwd_ms": 1e3 * statistics.median(fwd), "bwd_ms": 1e3 * statistics.median(bwd),
            "loss": loss.detach(), "grads": [s.grad for s in student]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="32x128,8x128,4x512,8x512", help="BATCHxSEQ list")
    ap.add_argument("--impls", default="chunked,naive", help="relation-KL implementations (registry names)")
    ap.add_argument("--chunk-size", type=int, default=None, help="chunked query block (default: auto)")
    ap.add_argument("--pad-frac", type=float, default=0.0,
                    help="pad this fraction of every other row (0: packed, no padding)")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per shape (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    args = ap.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes)
        impls = [x.strip() for x in args.impls.split(",") if x.strip()]
        bad = [x for x in impls if x == "auto" or x not in registry.relation_kl_names()]
        if bad or not impls:
            raise ConfigError("--impls", f"choose from {', '.join(registry.relation_kl_names()[1:])}; "
                                         f"got {args.impls!r}")
        if args.reps < 1:
            raise ConfigError("--reps", f"must be >= 1, got {args.reps}")
        if not 0.0 <= args.pad_frac < 1.0:
            raise ConfigError("--pad-frac", f"must be in [0, 1), got {args.pad_frac}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    print(f"toolkit from {toolkit.__file__}; torch {torch.__version__}, {args.threads} threads; "
          f"3 relations, hidden {HIDDEN}, {HEADS} relation heads, fp32, "
          + (f"every other row {100 * args.pad_frac:.0f}% padded\n" if args.pad_frac else "no padding\n"))
    print("| batch x seq | impl | forward ms | backward ms | total ms | max rel. diff to the first impl |")
    print("|---|---|---|---|---|---|")
    for batch, seq in shapes:
        first = None
        for impl in impls:
            r = time_loss(lambda *a, name=impl: registry.compute_relation_kl(name, *a), batch, seq, args.reps,
                          args.chunk_size, args.pad_frac)
            if first is None:
                first, diff = r, "-"
            else:
                rel = [float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                       for a, b in zip(r["grads"], first["grads"])]
                rel.append(float((r["loss"] - first["loss"]).abs() / first["loss"].abs()))
                diff = f"{max(rel):.1e}"
            print(f"| {batch} x {seq} | {impl} | {r['fwd_ms']:.1f} | {r['bwd_ms']:.1f} | "
                  f"{r['fwd_ms'] + r['bwd_ms']:.1f} | {diff} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
