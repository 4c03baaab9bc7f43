"""Dropout on CPU: torch's ``F.dropout`` against the toolkit's ``fast_dropout``, side by side.

``fast_dropout`` runs twice: with its masks from the compiled generator (the default where it
builds, ``toolkit/kernels/cpu_dropout.py``) and from torch's ``random_()``.

Times forward and forward + backward of one dropout site on ``[batch, seq, hidden]`` fp32
activations (the distillation student has five such sites per step at the default sizes),
median of ``--reps`` calls after one warm-up, in this process. Nothing is asserted on time.

Usage::

    python benchmarks/bench_dropout.py --shapes 32x128x384,4x512x384 --p 0.1 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toolkit.errors import ConfigError  # noqa: E402
from toolkit.kernels import cpu_dropout  # noqa: E402
from toolkit.models.dropout import fast_dropout  # noqa: E402


def parse_shapes(text: str) -> List[Tuple[int, int, int]]:
    out = []
    for part in text.split(","):
        try:
            dims = tuple(int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != 3 or min(dims) < 1:
            raise ConfigError("--shapes", f"expected BATCHxSEQxHIDDEN items such as 32x128x384, got {part!r}")
        out.append(dims)
    return out


def median_ms(fn: Callable[[], None], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="32x128x384,8x128x384,4x512x384", help="BATCHxSEQxHIDDEN list")
    ap.add_argument("--p", type=float, default=0.1, help="drop probability")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    try:
        shapes = parse_shapes(args.shapes)
        if not 0.0 < args.p < 1.0:
            raise ConfigError("--p", f"must be in (0, 1), got {args.p}")
        if args.reps < 1:
            raise ConfigError("--reps", f"must be >= 1, got {args.reps}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    def fast_dropout_torch_rng(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        with cpu_dropout.disabled():
            return fast_dropout(x, p, training)

    impls = {"torch F.dropout": F.dropout, "toolkit fast_dropout": fast_dropout,
             "toolkit fast_dropout, torch random_() masks": fast_dropout_torch_rng}
    print(f"torch {torch.__version__}, {args.threads} threads, p={args.p}, fp32, median of {args.reps}\n")
    print("| shape | impl | forward ms | forward + backward ms | kept fraction |")
    print("|---|---|---|---|---|")
    for shape in shapes:
        x = torch.randn(*shape, requires_grad=True)
        g = torch.randn(*shape)
        for name, fn in impls.items():
            with torch.no_grad():
                fwd = median_ms(lambda: fn(x, args.p, True), args.reps)
            both = median_ms(lambda: fn(x, args.p, True).backward(g), args.reps)
            kept = float((fn(x.detach(), args.p, True) != 0).float().mean())
            print(f"| {'x'.join(map(str, shape))} | {name} | {fwd:.2f} | {both:.2f} | {kept:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
