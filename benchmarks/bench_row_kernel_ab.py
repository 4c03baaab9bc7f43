"""The distillation step with one CPU fast path on and off, alternated in one process.

``bench_distill_step.py --impls toolkit,toolkit_torchrows`` runs two variants in separate
worker processes one after the other, so a shared VM's drift (+-5% within minutes) lands
between them. Here one toolkit step (the recipe's: truncated sdpa teacher, chunked relation KL,
fused AdamW) alternates blocks of steps with a switch on and off:

* ``--switch cpu-rows``: the compiled CPU row kernel of the relation KL (off:
  ``cpu_rows.disabled()``, the torch block math);
* ``--switch teacher-onednn``: the frozen teacher's linears on oneDNN's GEMM (off: MKL's,
  ``restore_linears``);
* ``--switch student-onednn``: the trained student's linears on oneDNN's GEMM, forward and input
  gradient (off: ``nn.Linear`` on MKL's);
* ``--switch cpu-attention``: the teacher's and the student's attention on the compiled CPU
  attention kernel, forward and backward (off: sdpa, ``restore_attention``);
* ``--switch teacher-gelu``: the teacher's feed-forward GEMM + GELU as one oneDNN call (off: two);
* ``--switch cpu-dropout``: the student's dropout masks from the compiled generator (off:
  torch's ``random_()``, ``cpu_dropout.disabled()``);
* ``--switch cpu-wgrad``: the student's weight and bias gradients from the compiled kernel (off:
  MKL's ``mm`` and a ``sum``, ``cpu_wgrad.disabled()``);
* ``--switch cpu-linear``: both models' forward GEMMs and the student's input gradients on the
  compiled GEMM kernel from 4096 rows on (off: oneDNN's, ``cpu_linear.disabled()``);
* ``--switch cpu-relation``: the relation KL on the compiled fused kernel (off: the chunked
  path's blocks with the row kernel, ``cpu_relation.disabled()``);
* ``--switch ffn-recompute``: the student's feed-forward as one autograd function that keeps the
  GELU's input and recomputes its output in the backward (off: the layers' own
  ``feed_forward_chunk``, the GELU's output kept, ``restore_feed_forward``).

The ratio of the medians and the median of per-round ratios are printed. Memory is not
measured (``bench_distill_step.py`` does that). Nothing is asserted on time.

Usage::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \\
        python benchmarks/bench_row_kernel_ab.py --shapes 128x8,128x32,512x4 --rounds 6 [--switch teacher-onednn|student-onednn|cpu-attention|teacher-gelu|cpu-dropout|cpu-wgrad|cpu-linear|cpu-relation|ffn-recompute]
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

from _common import check_counts, cli_main, parse_dims, write_json  # noqa: E402

from toolkit.errors import ConfigError  # noqa: E402
from toolkit.kernels import cpu_attention, cpu_dropout, cpu_linear, cpu_relation, cpu_rows, cpu_wgrad  # noqa: E402
from toolkit.kernels.cpu_attention import restore_attention, use_cpu_attention  # noqa: E402
from toolkit.models import onednn  # noqa: E402
from toolkit.models.onednn import (fuse_dense_gelu, onednn_unavailable_reason, recompute_feed_forward_gelu,  # noqa: E402
                                   restore_feed_forward, restore_linears, unfuse_dense_gelu, use_onednn_linears)

SWITCHES = ("cpu-rows", "teacher-onednn", "student-onednn", "cpu-attention", "teacher-gelu", "cpu-dropout",
            "cpu-wgrad", "cpu-linear", "cpu-relation", "ffn-recompute")


#: Switches whose off arm runs inside the kernel module's ``disabled()``.
_MODULE_SWITCHES = {"cpu-dropout": cpu_dropout, "cpu-wgrad": cpu_wgrad, "cpu-linear": cpu_linear,
                    "cpu-relation": cpu_relation}


#: Switches of the compiled kernels (toolkit/kernels/compiled.py): the module, whether the layers
#: it serves must be on oneDNN first, the comparison, and the two arms' names.
_COMPILED_SWITCHES = {
    "cpu-dropout": (cpu_dropout, False, "dropout masks from the compiled generator vs torch's random_()",
                    "compiled masks", "torch masks"),
    "cpu-wgrad": (cpu_wgrad, True, "student weight gradients from the compiled kernel vs MKL's mm + sum",
                  "wgrad kernel", "mm + sum"),
    "cpu-linear": (cpu_linear, True, "forward and input-gradient GEMMs on the compiled kernel vs oneDNN",
                   "GEMM kernel", "oneDNN"),
    "cpu-relation": (cpu_relation, False, "relation KL on the fused compiled kernel vs the chunked blocks",
                     "fused relation KL", "chunked blocks"),
    "cpu-attention": (cpu_attention, False, "attention on the compiled CPU kernel vs sdpa", "attention kernel",
                      "sdpa"),
}


def parse_shapes(text: str) -> List[tuple]:
    """``"128x8,512x4"`` -> ``[(128, 8), (512, 4)]`` (seq x batch)."""
    return parse_dims(text, "--shapes", ("seq", "batch"), "128x32")


def _one_step(step: Any, batch: Dict[str, torch.Tensor], switch: str, on: bool) -> None:
    from bench_distill_step import _timed_step

    if switch == "teacher-onednn":
        (use_onednn_linears if on else restore_linears)(step.teacher)
        _timed_step(step, batch, {})
    elif switch == "student-onednn":
        if on:
            use_onednn_linears(step.module, trainable=True)
        else:
            restore_linears(step.module)
        _timed_step(step, batch, {})
    elif switch == "cpu-attention":
        for model in (step.teacher, step.module):
            (use_cpu_attention if on else restore_attention)(model)
        _timed_step(step, batch, {})
    elif switch == "teacher-gelu":
        (fuse_dense_gelu if on else unfuse_dense_gelu)(step.teacher)
        _timed_step(step, batch, {})
    elif switch == "ffn-recompute":
        (recompute_feed_forward_gelu if on else restore_feed_forward)(step.module)
        _timed_step(step, batch, {})
    elif switch in _MODULE_SWITCHES:
        if on:
            _timed_step(step, batch, {})
        else:
            with _MODULE_SWITCHES[switch].disabled():
                _timed_step(step, batch, {})
    elif on:
        _timed_step(step, batch, {})
    else:
        with cpu_rows.disabled():
            _timed_step(step, batch, {})


def run_shape(step: Any, batch: Dict[str, torch.Tensor], rounds: int, per_arm: int, warmup: int,
              switch: str = "cpu-rows") -> Dict[str, Any]:
    """Median step ms with the switch on and off, blocks of ``per_arm`` steps, order swapped each round."""
    for _ in range(warmup):
        _one_step(step, batch, switch, True)
        _one_step(step, batch, switch, False)
    times: Dict[str, List[float]] = {"on": [], "off": []}
    ratios = []
    for r in range(rounds):
        # Alternate which arm goes first, so neither always follows the other.
        order = ("on", "off") if r % 2 == 0 else ("off", "on")
        this: Dict[str, List[float]] = {"on": [], "off": []}
        for arm in order:
            for _ in range(per_arm):
                t0 = time.perf_counter()
                _one_step(step, batch, switch, arm == "on")
                this[arm].append(time.perf_counter() - t0)
        for arm in this:
            times[arm].extend(this[arm])
        ratios.append(statistics.median(this["off"]) / statistics.median(this["on"]))
    if switch == "teacher-onednn":
        use_onednn_linears(step.teacher)   # leave the step as the recipe runs it
    elif switch == "student-onednn":
        use_onednn_linears(step.module, trainable=True)
    elif switch == "cpu-attention":
        use_cpu_attention(step.teacher)
        use_cpu_attention(step.module)
    elif switch == "teacher-gelu":
        fuse_dense_gelu(step.teacher)
    elif switch == "ffn-recompute":
        recompute_feed_forward_gelu(step.module)
    return {"switch": switch, "on_ms": 1e3 * statistics.median(times["on"]),
            "off_ms": 1e3 * statistics.median(times["off"]),
            "speedup_of_medians": statistics.median(times["off"]) / statistics.median(times["on"]),
            "speedup_median_of_rounds": statistics.median(ratios), "round_speedups": ratios,
            "on_ms_all": [1e3 * t for t in times["on"]], "off_ms_all": [1e3 * t for t in times["off"]]}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="128x8,128x32,512x4", help="SEQxBATCH list")
    p.add_argument("--switch", default="cpu-rows", choices=SWITCHES,
                   help="cpu-rows: the relation KL's compiled row kernel; teacher-onednn / student-onednn: the "
                        "teacher's / the student's linears on oneDNN's GEMM instead of MKL's; cpu-attention: "
                        "both models' attention on the compiled CPU kernel instead of sdpa; teacher-gelu: the teacher's "
                        "GEMM + GELU in one oneDNN call; cpu-dropout: dropout masks from the compiled generator; "
                        "cpu-wgrad: the student's weight gradients from the compiled kernel instead of MKL's mm; "
                        "cpu-linear: forward and input-gradient GEMMs on the compiled kernel instead of oneDNN; "
                        "cpu-relation: the relation KL on the fused compiled kernel instead of the chunked blocks; "
                        "ffn-recompute: the student's GELU output recomputed in the backward instead of kept")
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
    if args.switch == "cpu-rows":
        kernel = cpu_rows.load()
        if kernel is None:
            raise ConfigError("TOOLKIT_CPU_KERNEL",
                              f"the compiled CPU row kernel does not run here ({cpu_rows.unavailable_reason()}): "
                              f"nothing to compare")
        what, on_name, off_name = f"kernel {kernel.path.name}", "compiled rows", "torch rows"
    elif args.switch in _COMPILED_SWITCHES:
        module, needs_onednn, what, on_name, off_name = _COMPILED_SWITCHES[args.switch]
        reason = (onednn_unavailable_reason() if needs_onednn else None) or module.unavailable_reason()
        if reason is not None:
            raise ConfigError(module._KERNEL.env_var, f"{module._KERNEL.what} does not run here ({reason}): "
                              f"nothing to compare")
    elif args.switch == "ffn-recompute":
        reason = onednn_unavailable_reason() or cpu_linear.unavailable_reason()
        if reason is not None:
            raise ConfigError("TOOLKIT_CPU_LINEAR", f"the recomputing feed-forward does not run here ({reason}): "
                              f"nothing to compare")
        what, on_name, off_name = "student feed-forward GELU output recomputed vs kept", "recomputed", "kept"
    elif args.switch == "teacher-gelu":
        reason = onednn_unavailable_reason() or onednn._gelu_postop_reason()
        if reason is not None:
            raise ConfigError("TOOLKIT_ONEDNN_LINEAR", f"oneDNN's GEMM + GELU does not run here ({reason}): "
                              f"nothing to compare")
        what, on_name, off_name = "teacher feed-forward GEMM + GELU in one oneDNN call vs two", "fused GELU", \
            "separate GELU"
    else:
        reason = onednn_unavailable_reason()
        if reason is not None:
            raise ConfigError("TOOLKIT_ONEDNN_LINEAR", f"oneDNN's linear does not run here ({reason}): nothing to compare")
        who = args.switch.split("-")[0]
        what, on_name, off_name = f"{who} linears on oneDNN vs MKL", f"{who} oneDNN", f"{who} MKL"
    models = bench_models(args.smoke)
    print(f"teacher: {models.teacher_note}; {what}; torch {torch.__version__}, {args.threads} threads; "
          f"{args.rounds} rounds x {args.per_arm} steps per arm\n")
    print(f"| seq | batch | step ms, {on_name} | step ms, {off_name} | speed-up (medians) | "
          "speed-up (median of rounds) | rounds min-max |")
    print("|---|---|---|---|---|---|---|")
    results = []
    step = ToolkitStep(models)
    for seq, batch in shapes:
        data = make_batch(models, batch, seq)
        r = run_shape(step, data, args.rounds, args.per_arm, args.warmup, args.switch)
        r.update(seq=seq, batch=batch)
        results.append(r)
        print(f"| {seq} | {batch} | {r['on_ms']:.0f} | {r['off_ms']:.0f} | {r['speedup_of_medians']:.3f}x | "
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
