"""AdamW step implementations side by side: which one the engine should hand DeepSpeed.

The engine can hand DeepSpeed ``torch.optim.AdamW(fused=True)`` or DeepSpeed's fused Adam,
whichever is faster on the hardware. This script times one optimizer step over the parameters of a real
encoder shape (the engine's two parameter groups: decayed matrices, undecayed biases and
LayerNorm), for every implementation available on the device, in one process:

* ``torch_loop``    - ``torch.optim.AdamW(foreach=False, fused=False)``: the plain baseline.
* ``torch_foreach`` - ``torch.optim.AdamW(foreach=True)``.
* ``torch_fused``   - ``torch.optim.AdamW(fused=True)`` (what ``optim.impl: auto`` picks).
* ``ds_cpu_adam``   - ``deepspeed.ops.adam.DeepSpeedCPUAdam`` (CPU; its C++ op is compiled on
  first use, cached in ``~/.cache/torch_extensions``; the build is timed separately).
* ``ds_fused_adam`` - ``deepspeed.ops.adam.FusedAdam`` (CUDA only; also compiled on first use).

Every implementation starts from the same parameters and the same fixed gradients. After the
timed steps the parameters are compared with ``torch_loop``'s after as many steps (max abs
difference), so a fast but wrong step shows. Nothing is asserted on time.

Usage::

    python benchmarks/bench_optimizer.py                        # CPU, 2 threads, student sizes
    python benchmarks/bench_optimizer.py --models student3,bert-base --impls torch_loop,torch_fused,ds_cpu_adam
    python benchmarks/bench_optimizer.py --device cuda --models bert-base,bert-large
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import machine_info, markdown_table, time_calls, write_json  # noqa: E402
from toolkit.engine.engine import param_groups  # noqa: E402
from toolkit.errors import ConfigError  # noqa: E402
from toolkit.models.encoder import EncoderSpec, build_encoder  # noqa: E402

#: Parameter sets: the encoder shapes the toolkit trains with AdamW (BERT vocabulary, 30522).
MODELS: Dict[str, Dict[str, int]] = {
    "student3": dict(num_layers=3, hidden_size=384, num_heads=12, intermediate_size=1536),   # CPU bench student
    "student6": dict(num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536),   # ERNIE 3.0 Tiny-like
    "bert-base": dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072),  # a multi-task teacher
    "bert-large": dict(num_layers=24, hidden_size=1024, num_heads=16, intermediate_size=4096),
    "tiny": dict(num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64),              # smoke test
}
IMPLS = ("torch_loop", "torch_foreach", "torch_fused", "ds_cpu_adam", "ds_fused_adam")
HYPER = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def make_params(model: str, device: torch.device, seed: int = 0) -> List[Dict[str, Any]]:
    """The engine's AdamW groups over a random encoder of ``model``'s shape, with fixed gradients."""
    torch.manual_seed(seed)
    enc = build_encoder(EncoderSpec(arch="bert", vocab_size=30522, **MODELS[model])).to(device)
    groups = param_groups(enc, HYPER["weight_decay"])
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    for g in groups:
        for p in g["params"]:
            p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(device)
    return groups


def clone_groups(groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Fresh leaf parameters (same values and gradients) with the same group settings."""
    out = []
    for g in groups:
        params = []
        for p in g["params"]:
            q = torch.nn.Parameter(p.detach().clone())
            q.grad = p.grad.clone()
            params.append(q)
        out.append({**{k: v for k, v in g.items() if k != "params"}, "params": params})
    return out


def build(impl: str, groups: List[Dict[str, Any]], device: torch.device) -> torch.optim.Optimizer:
    """One optimizer of ``impl`` over ``groups``; ConfigError when it cannot run on ``device``."""
    kw = dict(HYPER)
    if impl == "torch_loop":
        return torch.optim.AdamW(groups, foreach=False, fused=False, **kw)
    if impl == "torch_foreach":
        return torch.optim.AdamW(groups, foreach=True, **kw)
    if impl == "torch_fused":
        return torch.optim.AdamW(groups, fused=True, **kw)
    if impl == "ds_cpu_adam":
        if device.type != "cpu":
            raise ConfigError("--impls", "ds_cpu_adam steps CPU parameters; drop it with --device cuda")
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    if impl == "ds_fused_adam":
        if device.type != "cuda":
            raise ConfigError("--impls", "ds_fused_adam needs CUDA parameters (--device cuda on a GPU host)")
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, adam_w_mode=True, **kw)
    raise ConfigError("--impls", f"unknown implementation {impl!r}; choose from {', '.join(IMPLS)}")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the optimizer's per-parameter state tensors (moments, step counters)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v))


def run_model(model: str, impls: Sequence[str], device: torch.device, steps: int, warmup: int) -> List[Dict[str, Any]]:
    base = make_params(model, device)
    n_params = sum(p.numel() for g in base for p in g["params"])
    rows: List[Dict[str, Any]] = []
    reference: Optional[List[torch.Tensor]] = None
    for impl in ("torch_loop",) + tuple(i for i in impls if i != "torch_loop"):
        groups = clone_groups(base)
        t0 = time.perf_counter()
        opt = build(impl, groups, device)
        build_s = time.perf_counter() - t0    # DeepSpeed ops: compile on first use, else load from the cache
        times = time_calls(opt.step, device, steps, warmup)
        params = [p.detach() for g in groups for p in g["params"]]
        if impl == "torch_loop":
            reference = params
        diff = max(float((a - b).abs().max()) for a, b in zip(params, reference))
        row = {"model": model, "impl": impl, "params": n_params, "step_ms": 1e3 * statistics.median(times),
               "min_ms": 1e3 * min(times), "build_s": build_s, "state_mib": state_bytes(opt) / 2 ** 20,
               "max_abs_diff_vs_torch_loop": diff, "steps": steps + warmup}
        # fp32 traffic of one AdamW step: read parameter, gradient and both moments, write back
        # parameter and moments (7 x 4 bytes a parameter): the step is memory-bound.
        row["gbytes_per_s"] = 7 * 4 * n_params / (row["step_ms"] / 1e3) / 1e9
        if impl in impls:
            rows.append(row)
        print(f"  {model:10s} {impl:14s} {row['step_ms']:8.2f} ms/step  ({row['gbytes_per_s']:.1f} GB/s, "
              f"built in {build_s:.1f} s, max |diff| vs torch_loop {diff:.1e})", flush=True)
        del opt, groups
    fastest = min(rows, key=lambda r: r["step_ms"])
    for r in rows:
        r["fastest"] = r is fastest
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="student3,student6,bert-base", help=f"among {', '.join(MODELS)}")
    ap.add_argument("--impls", default=None,
                    help="comma-separated among " + ", ".join(IMPLS) + " (default: all that run on --device)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=20, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    ap.add_argument("--json", default=None, help="write the rows and the machine to this file")
    args = ap.parse_args(argv)
    try:
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        bad = [m for m in models if m not in MODELS]
        if bad or not models:
            raise ConfigError("--models", f"unknown model(s) {bad or models}; choose from {', '.join(MODELS)}")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device", "cuda was asked for but torch sees no GPU on this host")
        device = torch.device(args.device)
        default = [i for i in IMPLS if i != ("ds_fused_adam" if device.type == "cpu" else "ds_cpu_adam")]
        impls = [i.strip() for i in args.impls.split(",")] if args.impls else default
        bad = [i for i in impls if i not in IMPLS]
        if bad or not impls:
            raise ConfigError("--impls", f"unknown implementation(s) {bad or impls}; choose from {', '.join(IMPLS)}")
        if args.steps < 1 or args.warmup < 0:
            raise ConfigError("--steps", "needs --steps >= 1 and --warmup >= 0")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    info = machine_info(args.threads)
    info["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"# AdamW step benchmark\n\nmachine: {info['cpu']} ({', '.join(info['cpu_flags'])}), "
          f"{info['threads']} threads, device {info['device']}, torch {info['torch']}, {info['date']}")
    rows: List[Dict[str, Any]] = []
    for model in models:
        try:
            rows += run_model(model, impls, device, args.steps, args.warmup)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.json:   # after every model: a run stopped by a time limit keeps what it finished
            write_json(args.json, {"machine": info, "partial": True, "rows": rows})
    print()
    loop_ms = {r["model"]: r["step_ms"] for r in rows if r["impl"] == "torch_loop"}
    print(markdown_table(
        ["model", "params (M)", "impl", "step ms (median)", "GB/s", "vs torch_loop", "state MiB",
         "max abs diff vs torch_loop", "build/load s"],
        [[r["model"], f"{r['params'] / 1e6:.1f}", ("**" + r["impl"] + "**") if r["fastest"] else r["impl"],
          f"{r['step_ms']:.2f}", f"{r['gbytes_per_s']:.1f}",
          f"{loop_ms[r['model']] / r['step_ms']:.2f}x" if r["model"] in loop_ms else "-",
          f"{r['state_mib']:.0f}", f"{r['max_abs_diff_vs_torch_loop']:.1e}", f"{r['build_s']:.1f}"] for r in rows]))
    if args.json:
        write_json(args.json, {"machine": info, "partial": False, "rows": rows})
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
