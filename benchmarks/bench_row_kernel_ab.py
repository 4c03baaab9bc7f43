"""The distillation step with and without the compiled CPU row kernel, alternated in one process.

``bench_distill_step.py --impls toolkit,toolkit_torchrows`` runs the two in separate worker
processes one after the other, so a shared VM's drift (+-5% within minutes) lands between
them. Here one toolkit step (the recipe's: truncated sdpa teacher, chunked relation KL, fused
AdamW) alternates blocks of steps with the kernel on and off (``cpu_rows.disabled()``); the
ratio of the medians and the median of per-round ratios are printed. Memory is not measured
(``bench_distill_step.py`` does that). Nothing is asserted on time.

Usage::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
        python benchmarks/bench_row_kernel_ab.py --shapes 128x8,128x32,512x4 --rounds 6
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import check_counts, cli_main, write_json  # noqa: E402

from toolkit.errors import ConfigError  # noqa: E402
from toolkit.kernels import cpu_rows  # noqa: E402


def parse_shapes(text: str) -> List[tuple]:
    """``"128x8,512x4"`` -> ``[(128, 8), (512, 4)]`` (seq x batch)."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        try:
            seq, batch = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise ConfigError("--shapes", f"expected SEQxBATCH items such as 128x32, got {part!r}") from None
        if seq < 1 or batch < 1:
            raise ConfigError("--shapes", f"seq and batch must be >= 1, got {part!r}")
        out.append((seq, batch))
    if not out:
        raise ConfigError("--shapes", "name at least one shape, e.g. 128x32")
    return out


def run_shape(step: Any, batch: Dict[str, torch.Tensor], rounds: int, per_arm: int, warmup: int) -> Dict[str, Any]:
    from bench_distill_step import _timed_step

    for _ in range(warmup):
        _timed_step(step, batch, {})
        with cpu_rows.disabled():
            _timed_step(step, batch, {})
    times: Dict[str, List[float]] = {"kernel": [], "torch": []}
    ratios = []
    for r in range(rounds):
        # Alternate which arm goes first, so neither always follows the other.
        order = ("kernel", "torch") if r % 2 == 0 else ("torch", "kernel")
        this: Dict[str, List[float]] = {"kernel": [], "torch": []}
        for arm in order:
            for _ in range(per_arm):
                t0 = time.perf_counter()
                if arm == "torch":
                    with cpu_rows.disabled():
                        _timed_step(step, batch, {})
                else:
                    _timed_step(step, batch, {})
                this[arm].append(time.perf_counter() - t0)
        for arm in this:
            times[arm].extend(this[arm])
        ratios.append(statistics.median(this["torch"]) / statistics.median(this["kernel"]))
    return {"kernel_ms": 1e3 * statistics.median(times["kernel"]), "torch_ms": 1e3 * statistics.median(times["torch"]),
            "speedup_of_medians": statistics.median(times["torch"]) / statistics.median(times["kernel"]),
            "speedup_median_of_rounds": statistics.median(ratios), "round_speedups": ratios,
            "kernel_ms_all": [1e3 * t for t in times["kernel"]], "torch_ms_all": [1e3 * t for t in times["torch"]]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="128x8,128x32,512x4", help="SEQxBATCH list")
    p.add_argument("--rounds", type=int, default=6, help="rounds of (kernel, torch) blocks per shape")
    p.add_argument("--per-arm", type=int, default=2, help="steps per arm per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per arm before the rounds")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--smoke", action="store_true", help="tiny random models (checks the plumbing)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    return p


def _main(args: argparse.Namespace) -> int:
    from bench_distill_step import ToolkitStep, bench_models, make_batch

    check_counts(args, ["rounds", "per_arm", "threads"])
    shapes = parse_shapes(args.shapes)
    torch.set_num_threads(args.threads)
    kernel = cpu_rows.load()
    if kernel is None:
        raise ConfigError("TOOLKIT_CPU_KERNEL",
                          f"the compiled CPU row kernel does not run here ({cpu_rows.unavailable_reason()}): "
                          f"nothing to compare")
    models = bench_models(args.smoke)
    print(f"teacher: {models.teacher_note}; kernel {kernel.path.name}; torch {torch.__version__}, {args.threads} threads; "
          f"{args.rounds} rounds x {args.per_arm} steps per arm\n")
    print("| seq | batch | step ms, compiled rows | step ms, torch rows | speed-up (medians) | "
          "speed-up (median of rounds) | rounds min-max |")
    print("|---|---|---|---|---|---|---|")
    results = []
    step = ToolkitStep(models)
    for seq, batch in shapes:
        data = make_batch(models, batch, seq)
        r = run_shape(step, data, args.rounds, args.per_arm, args.warmup)
        r.update(seq=seq, batch=batch)
        results.append(r)
        print(f"| {seq} | {batch} | {r['kernel_ms']:.0f} | {r['torch_ms']:.0f} | {r['speedup_of_medians']:.3f}x | "
              f"{r['speedup_median_of_rounds']:.3f}x | {min(r['round_speedups']):.3f}-{max(r['round_speedups']):.3f} |",
              flush=True)
        if args.json:
            write_json(args.json, {"command": sys.argv, "partial": True, "results": results})
    if args.json:
        write_json(args.json, {"command": sys.argv, "partial": False, "results": results})
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli_main(build_parser(), _main, argv)


if __name__ == "__main__":
    sys.exit(main())
