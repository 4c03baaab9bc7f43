"""``toolkit plan``: a job's checks and its plan as text (how to read it: docs/PLAN.md)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from toolkit.plan.checks import JobFacts, TrainedPart, inspect_job
from toolkit.plan.estimate import GIB, Hardware, MemoryPlan, estimate_memory, precision_of, step_flops, step_seconds


@dataclass
class Plan:
    """A checked job (``facts``) with its estimates, one per training stage for the pipeline."""

    facts: JobFacts
    hardware: Hardware
    memory: Optional[MemoryPlan] = None
    flops: float = 0.0
    seconds: float = 0.0
    stages: List["Plan"] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        plans = [self, *self.stages] if self.memory is not None else self.stages
        return all(p.memory.peak <= self.hardware.gpu_memory for p in plans if p.memory is not None)


def make_plan(job: str, cfg: Any, hw: Hardware, source: Optional[str] = None) -> Plan:
    """Check ``job`` with config ``cfg`` for ``hw``'s ranks (no model is built) and estimate it."""
    facts = inspect_job(job, cfg, hw.world_size, source, planning=True, device=hw.device)
    return _estimate(facts, hw)


def _estimate(facts: JobFacts, hw: Hardware) -> Plan:
    plan = Plan(facts, hw)
    if facts.trained is not None:
        plan.memory = estimate_memory(facts, hw)
        plan.flops = step_flops(facts)
        plan.seconds = step_seconds(facts, hw)
    plan.stages = [_estimate(stage, hw) for stage in facts.stages]
    return plan


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GIB), ("MiB", float(1 << 20)), ("KiB", 1024.0)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def fmt_duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.1f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def _model_line(part: TrainedPart) -> str:
    s = part.shape
    line = (f"  {part.name:17s} {s.arch:5s} {s.layers:3d} layers  hidden {s.hidden:5d}  {s.heads:3d} heads  "
            f"ffn {s.intermediate:5d}  vocab {s.vocab:6d}  {fmt_count(s.params):>8s} params")
    if part.frozen:
        runs = s.params_up_to(part.layers_run, part.last_projections_only)
        line += f"  (runs {part.layers_run} layers: {fmt_count(runs)})"
    else:
        line += f"  ({fmt_count(part.trainable)} trained)"
    return line + f"\n  {'':17s} from {s.source}"


def render(plan: Plan, title: str = "", stage: bool = False) -> str:
    f, hw = plan.facts, plan.hardware
    out: List[str] = []
    if stage:
        out.append(f"stage: {f.job} (DeepSpeed JSON {f.ds_path})")
    else:
        out.append(f"plan: {f.job}" + (f" ({title})" if title else ""))
        out.append(f"ranks: {hw.nodes} node(s) x {hw.gpus_per_node} {'GPU' if hw.device == 'gpu' else 'CPU rank'}"
                   f"(s) = {f.world_size}; DeepSpeed JSON {f.ds_path}")
        out.append("checks: passed (every job field; every DeepSpeed key, nested ones included, and its type; the "
                   "model shapes at full size on the meta device; layer ranges, relation heads, vocabularies and "
                   "sequence length against the models; the batch over the ranks)")
    for w in f.warnings:
        out.append(f"warning: {w}")
    if plan.stages:
        for note in f.notes:
            out.append(f"note: {note}")
        for sub in plan.stages:
            out.append("")
            out.extend("  " + line if line else "" for line in render(sub, stage=True).splitlines())
        return "\n".join(out) + "\n"
    if f.trained is None:
        for note in f.notes:
            out.append(f"note: {note}")
        return "\n".join(out) + "\n"

    ds = f.ds
    prec = precision_of(ds, hw.device)
    from toolkit.plan.estimate import zero_settings

    zero = zero_settings(ds)
    out.append("")
    out.append("models")
    if f.frozen is not None:
        out.append(_model_line(f.frozen))
    out.append(_model_line(f.trained))

    mb, gas, gb = (int(ds[k]) for k in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                                         "train_batch_size"))
    tokens = gb * f.seq_length
    out.append("")
    out.append("batch")
    out.append(f"  micro batch {mb} x accumulation {gas} x {f.world_size} ranks = global batch {gb}")
    bound = "packed sequences are full" if f.job == "distill" else "every sequence padded to max_seq_length"
    out.append(f"  tokens per step: {tokens:,} (sequence length {f.seq_length}; an upper bound: {bound})")
    if f.max_steps:
        total = tokens * f.max_steps * f.runs
        runs = f" x {f.runs} runs" if f.runs > 1 else ""
        out.append(f"  steps: {f.max_steps:,}{runs} -> {fmt_count(total)} tokens in all")
    else:
        out.append(f"  steps: {f.epochs:g} epoch(s) of the training data (known once the data is read: "
                   f"examples x epochs / global batch)")

    m = plan.memory
    out.append("")
    out.append(f"memory per {'GPU' if hw.device == 'gpu' else 'rank'} (estimate: {prec.compute} compute, "
               f"ZeRO-{int(zero.stage)}{', optimizer offload' if any('offloaded' in n for n, _ in m.host_rows) else ''})")
    for name, nbytes, note in m.rows:
        out.append(f"  {name:28s} {fmt_bytes(nbytes):>11s}   {note}".rstrip())
    share = m.peak / hw.gpu_memory if hw.gpu_memory else 0.0
    verdict = "fits" if m.peak <= hw.gpu_memory else "DOES NOT FIT"
    out.append(f"  {'peak':28s} {fmt_bytes(m.peak):>11s}   {verdict} in {fmt_bytes(hw.gpu_memory)} ({share:.0%}): "
               f"persistent {fmt_bytes(m.persistent)} + during the step {fmt_bytes(m.step)}")
    for name, nbytes in m.host_rows:
        out.append(f"  host: {name:22s} {fmt_bytes(nbytes):>11s}")

    out.append("")
    out.append(f"time (estimate at {hw.mfu:.0%} MFU of {hw.peak_tflops:g} TFLOP/s per "
               f"{'GPU' if hw.device == 'gpu' else 'rank'})")
    per_token = plan.flops / tokens if tokens else 0.0
    out.append(f"  {fmt_count(per_token)} FLOP per token, {fmt_count(plan.flops)} FLOP per step over "
               f"{f.world_size} rank(s): {fmt_duration(plan.seconds)} per step")
    if f.max_steps:
        out.append(f"  {f.max_steps:,} steps{f' x {f.runs} runs' if f.runs > 1 else ''}: "
                   f"{fmt_duration(plan.seconds * f.max_steps * f.runs)}")
    for note in f.notes:
        out.append(f"note: {note}")
    return "\n".join(out) + "\n"
