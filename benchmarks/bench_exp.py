"""Why the relation losses take probabilities from ``softmax`` and never ``exp(log_softmax)``.

Times ``torch.exp`` against ``torch.softmax`` / ``torch.log_softmax`` on one block of the chunked
relation KL (``[B, R, rows, L]``, fp32), with the last two thirds of every row either normal
values or a fill such as a padded key's ``finfo.min``: on x86 CPUs ``exp`` takes a slow path
for arguments below about -88 while softmax's own exp does not. Nothing is asserted on time.

Usage::

    python benchmarks/bench_exp.py --shape 16x12x32x512 --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import check_counts, cli_main, markdown_table, time_calls  # noqa: E402
from toolkit.errors import ConfigError  # noqa: E402

FILLS = (("none (N(0,1) logits)", None), ("-50", -50.0), ("-200", -200.0),
         ("finfo.min (padded key)", torch.finfo(torch.float32).min), ("-inf", float("-inf")))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="16x12x32x512", help="block shape BxRxROWSxL")
    p.add_argument("--reps", type=int, default=15, help="timed calls per op")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    return p


def _main(args: argparse.Namespace) -> int:
    check_counts(args, ("reps", "threads"))
    try:
        shape = tuple(int(x) for x in args.shape.lower().split("x"))
    except ValueError:
        raise ConfigError("--shape", f"expected four integers such as 16x12x32x512, got {args.shape!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise ConfigError("--shape", f"expected four positive integers BxRxROWSxL, got {args.shape!r}")
    torch.set_num_threads(args.threads)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    rows = []
    for name, fill in FILLS:
        y = x.clone()
        if fill is not None:
            y[..., shape[-1] // 3:] = fill
        out = torch.empty_like(y)
        ms = [1e3 * statistics.median(time_calls(fn, "cpu", args.reps, 3))
              for fn in (lambda: torch.exp(y, out=out), lambda: torch.softmax(y, -1), lambda: torch.log_softmax(y, -1))]
        rows.append([name] + [f"{m:.3f}" for m in ms])
    print(f"torch {torch.__version__}, {args.threads} threads, fp32 {args.shape}, last 2/3 of each row filled\n")
    print(markdown_table(["fill", "exp ms", "softmax ms", "log_softmax ms"], rows))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli_main(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
