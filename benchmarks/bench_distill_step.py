"""Benchmark one MiniLMv2 distillation step: the toolkit's step against a plain transformers baseline.

Both are measured in the same run, on the same batches, at the same thread count:

* ``toolkit``: what ``toolkit/recipes/distill.py`` runs per step, without DeepSpeed (one CPU
  process gains nothing from it): a frozen, truncated sdpa teacher under ``no_grad`` whose Q/K/V
  come from :class:`~toolkit.models.capture.QKVCapture` hooks, the recipe's ``StudentWithLoss``
  (sdpa student + ``MiniLMv2RelationLoss(impl="auto")``: the chunked path on CPUs, the Triton
  kernel on GPUs), fused AdamW.
* ``baseline``: what people write with stock transformers: eager attention,
  ``output_attentions=True, output_hidden_states=True``, the full teacher, Q/K/V recomputed from
  ``hidden_states[layer - 1]`` with the layer's own projections, a relation KL that materializes
  every ``[B, R, L, L]`` matrix, default (foreach) AdamW.

Every (implementation, seq, batch) runs in a fresh subprocess so its peak memory is its own.
The parent first checks that both steps compute the same loss on the same batch (fp32),
measures the matmul peak of the run's dtype for MFU, then prints a Markdown table (and
``--json`` writes everything).

Precision (``--dtype bf16``): the toolkit's step runs as the recipe does under a DeepSpeed bf16
config: bf16 teacher and student weights, fp32 master weights in the optimizer (what
DeepSpeed's bf16 optimizer keeps), relation statistics in fp32. The baseline runs as a plain
script would: fp32 weights under ``torch.autocast(bfloat16)``. MFU then divides by the bf16
matmul peak. ``--device cuda`` runs everything on the first GPU (peak memory is then
``torch.cuda.max_memory_allocated``); ``--models bert-large`` is the GPU setting: a
BERT-large-shaped teacher (random weights: none can be downloaded here) distilled at layer
21 into a 6 x 384 student with 64 relation heads.

Usage::

    python benchmarks/bench_distill_step.py --seqs 128,512 --batches "128=8,32;512=4,8,16" \
        --steps 5 --warmup 2 --threads 2 --json results.json
    python benchmarks/bench_distill_step.py --device cuda --dtype bf16 --models bert-large \
        --seqs 128,512 --batches "128=32,128;512=8,32" --json results_gpu.json
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from _common import (DTYPES, EncoderShape, MatmulProbeProcess, allocator_env, allocator_in_use, check_counts,
                     cli_main, cpu_seconds, load_average,
                     machine_info, markdown_table, measure_matmul_peak, parse_int_list, peak_rss_bytes, rss_bytes,
                     step_flops, sync, write_json)
from toolkit.errors import ConfigError, ToolkitError

RESULT_PREFIX = "BENCH_RESULT "
LR = 1e-4
WEIGHT_DECAY = 0.01
TEACHER_SEED = 1234     # only used when the real teacher is missing (random stand-in)
STUDENT_SEED = 42
BATCH_SEED = 7
RELATIONS = ("q", "k", "v")
DEFAULT_BATCHES = {128: [8, 32], 512: [4, 8, 16]}
MIB = 1024.0 * 1024.0


# ----------------------------------------------------------------------------------------------
# Models
@dataclass
class BenchModels:
    """Teacher source (directory or random spec), student spec and relation heads of a run."""

    teacher: Any            # str directory or EncoderSpec
    teacher_note: str
    student: Any            # EncoderSpec
    relation_heads: int
    vocab_size: int
    max_positions: int
    teacher_layer: int = -1  # 1-based layer the loss reads; -1: MiniLMv2's default for the teacher's depth


#: ``--models`` presets: the CPU setting (the demo's models) and the GPU setting.
MODEL_PRESETS = ("minilm", "bert-large")


def bench_models(smoke: bool, preset: str = "minilm") -> BenchModels:
    """The benchmark's models, or tiny ones for ``--smoke``.

    ``minilm``: all-MiniLM-L6-v2 teacher (its last layer read), 3x384 student, 12 relation heads.
    ``bert-large``: a random BERT-large-shaped teacher (24 x 1024, 16 heads) read at layer 21,
    6x384 student, 64 relation heads (MiniLMv2's setting for large teachers).
    """
    from toolkit.models.encoder import EncoderSpec
    from toolkit.recipes.distill import StudentConfig

    if preset not in MODEL_PRESETS:
        raise ConfigError("--models", f"unknown preset {preset!r}; choose from {list(MODEL_PRESETS)}")
    if smoke:
        tiny = dict(arch="bert", hidden_size=32, num_heads=4, intermediate_size=64, vocab_size=512,
                    max_position_embeddings=64)
        layers = 3 if preset == "bert-large" else 2
        return BenchModels(EncoderSpec(num_layers=layers, **tiny), "random tiny teacher (--smoke)",
                           EncoderSpec(num_layers=2, **tiny), 4, 512, 64,
                           teacher_layer=2 if preset == "bert-large" else -1)
    # The toolkit's student takes the distill recipe's defaults (StudentConfig): attention
    # dropout 0, hidden dropout 0.1. The baseline keeps stock BERT's 0.1 / 0.1 (BaselineStep).
    sc = StudentConfig()
    if preset == "bert-large":
        vocab, max_pos = 30522, 512
        teacher = EncoderSpec(arch="bert", num_layers=24, hidden_size=1024, num_heads=16, intermediate_size=4096,
                              vocab_size=vocab, max_position_embeddings=max_pos)
        student = EncoderSpec(arch="bert", num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536,
                              vocab_size=vocab, max_position_embeddings=max_pos, hidden_dropout=sc.hidden_dropout,
                              attention_dropout=sc.attention_dropout)
        return BenchModels(teacher, "RANDOM BERT-large-shaped teacher (24 x 1024, 16 heads), layer 21 read",
                           student, 64, vocab, max_pos, teacher_layer=21)
    teacher: Any
    try:
        from toolkit.demo.resources import teacher_dir

        teacher = str(teacher_dir())
        note = f"all-MiniLM-L6-v2 ({teacher})"
        vocab, max_pos = 30522, 512
        cfg = json.loads((Path(teacher) / "config.json").read_text(encoding="utf-8"))
        vocab, max_pos = int(cfg["vocab_size"]), int(cfg["max_position_embeddings"])
    except ToolkitError as e:
        vocab, max_pos = 30522, 512
        teacher = EncoderSpec(arch="bert", num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536,
                              vocab_size=vocab, max_position_embeddings=max_pos)
        note = f"RANDOM BertModel of all-MiniLM-L6-v2's shape (the real teacher is missing: {e})"
    student = EncoderSpec(arch="bert", num_layers=3, hidden_size=384, num_heads=12, intermediate_size=1536,
                          vocab_size=vocab, max_position_embeddings=max_pos, hidden_dropout=sc.hidden_dropout,
                          attention_dropout=sc.attention_dropout)
    return BenchModels(teacher, note, student, 12, vocab, max_pos)


def _shape(config: Any, layers_run: int) -> EncoderShape:
    """The useful work of an encoder in a MiniLMv2 step: layers up to the distilled one, whose
    Q/K/V projections are all the loss reads (no pooler). Both implementations get this credit."""
    return EncoderShape(layers_run, config.hidden_size, config.intermediate_size, pooler=False, last_qkv_only=True)


def make_batch(models: BenchModels, batch: int, seq: int, pad_last: int = 0) -> Dict[str, Tensor]:
    """Random token ids ``[batch, seq]`` (seeded), full attention mask as the packed corpus yields.

    ``pad_last`` pads the last row's final ``pad_last`` positions (used by the loss check).
    """
    g = torch.Generator().manual_seed(BATCH_SEED)
    low = min(1000, models.vocab_size // 2)   # skip [PAD]/[unused] rows of a real vocabulary
    ids = torch.randint(low, models.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    if pad_last:
        mask[-1, seq - pad_last:] = 0
        ids[-1, seq - pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


# ----------------------------------------------------------------------------------------------
# The toolkit step (mirrors toolkit/recipes/distill.py without DeepSpeed)
class MasterWeightAdamW:
    """Fused AdamW on fp32 master copies of half-precision parameters, as DeepSpeed's bf16
    optimizer does: gradients are upcast into the masters, the masters step, and the model's
    bf16 weights are refreshed from them. ``step`` / ``zero_grad`` like a torch optimizer."""

    def __init__(self, params: Sequence[nn.Parameter], lr: float, weight_decay: float):
        self.params = list(params)
        self.masters = [p.detach().float().clone().requires_grad_(True) for p in self.params]
        self.inner = torch.optim.AdamW(self.masters, lr=lr, weight_decay=weight_decay, fused=True)

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.masters):
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for p, m in zip(self.params, self.masters):
            p.copy_(m)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=True)



class ToolkitStep:
    """The recipe's step: the frozen teacher cut to what the loss reads (``FrozenTeacher``), the
    registered ``minilmv2`` loss, the recipe's ``StudentWithLoss`` and fused AdamW."""

    def __init__(self, models: BenchModels, student_attention_dropout: Optional[float] = None,
                 chunk_size: Optional[int] = None, activation_checkpointing: bool = False,
                 device: str = "cpu", dtype: str = "fp32", fp32_teacher: bool = False):
        from toolkit.engine.precision import teacher_dtype
        from toolkit.losses import LossContext, Needs, build_loss
        from toolkit.models.capture import default_teacher_layer, resolve_layer
        from toolkit.models.encoder import build_encoder
        from toolkit.recipes.distill import StudentWithLoss
        from toolkit.recipes.frozen import FrozenTeacher
        from transformers import AutoConfig

        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        t_config = (AutoConfig.from_pretrained(models.teacher, local_files_only=True)
                    if isinstance(models.teacher, str) else models.teacher.to_config())
        n_layers = t_config.num_hidden_layers
        layer = models.teacher_layer if models.teacher_layer > 0 else default_teacher_layer(n_layers)
        self.teacher_idx = resolve_layer(layer, n_layers)
        spec = models.student
        if student_attention_dropout is not None:
            spec = dataclasses.replace(spec, attention_dropout=student_attention_dropout)
        torch.manual_seed(STUDENT_SEED)
        student = build_encoder(spec)
        # As the recipe: the pooler gets no gradient from relation losses, so it is frozen.
        student.pooler.requires_grad_(False)
        s_idx = student.config.num_hidden_layers - 1
        # impl "auto" as the recipe's default: the Triton kernel on a GPU, the chunked path on CPUs.
        options = {"num_relation_heads": models.relation_heads, "impl": "auto", "chunk_size": chunk_size or 0}
        ctx = LossContext(t_config, student.config, self.teacher_idx, s_idx, student=student,
                          field="loss.options.minilmv2")
        loss = build_loss("minilmv2", options, ctx)
        needs = Needs() | loss.needs()
        # As the recipe: a half-precision teacher on GPUs, and on CPUs in a bf16 job; the loss
        # check (fp32_teacher) compares numbers with the fp32 baseline instead.
        t_dtype = torch.float32 if fp32_teacher else teacher_dtype(self.device, self.dtype)
        torch.manual_seed(TEACHER_SEED)
        self.teacher = FrozenTeacher(models.teacher, needs, self.device, t_dtype)
        self.module = StudentWithLoss(student, nn.ModuleDict({"minilmv2": loss}), {"minilmv2": 1.0}, needs, [1.0])
        if activation_checkpointing:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.module.train()
        self.module.to(self.device)
        self.student = student
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.dtype == torch.float32:
            self.optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY, fused=True)
        else:
            self.module.to(self.dtype)
            self.optimizer = MasterWeightAdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
        self.teacher_layers_run = self.teacher_idx + 1   # the cut layer's projections run too

    @torch.no_grad()
    def teacher_qkv(self, batch: Mapping[str, Tensor]) -> Dict[str, Any]:
        """Teacher forward: what the loss reads (the distilled layer's Q/K/V)."""
        return self.teacher(batch)

    def student_loss(self, batch: Mapping[str, Tensor], t_out: Dict[str, Any]) -> Tensor:
        """Student forward + relation loss: a scalar with a graph."""
        return self.module(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                           teachers=[t_out])["loss"]

    def step(self, batch: Mapping[str, Tensor], phases: Dict[str, float]) -> float:
        """One optimizer step; adds seconds per phase to ``phases``. Returns the loss."""
        return _timed_step(self, batch, phases)


# ----------------------------------------------------------------------------------------------
# The plain baseline (stock transformers, written inline on purpose)
def naive_relation_kl(t_x: Tensor, s_x: Tensor, mask: Tensor, heads: int) -> Tensor:
    """KL(teacher || student) of ``softmax(x x^T / sqrt(d))`` per relation head, fully materialized.

    Args:
        t_x: teacher projection ``[B, L, Ht]``.
        s_x: student projection ``[B, L, Hs]``.
        mask: ``[B, L]``, 1 for real tokens.
        heads: relation heads R.

    Returns:
        Scalar: mean over real query tokens and heads.
    """
    key_pad = mask[:, None, None, :] == 0                           # [B, 1, 1, L]

    def logits(x: Tensor) -> Tensor:
        b, l, h = x.shape
        d = h // heads
        xr = x.view(b, l, heads, d).transpose(1, 2)                 # [B, R, L, d]
        scores = xr @ xr.transpose(-1, -2) / math.sqrt(d)           # [B, R, L, L]
        return scores.masked_fill(key_pad, torch.finfo(scores.dtype).min)

    t_logits, s_logits = logits(t_x), logits(s_x)
    p_t = torch.softmax(t_logits, dim=-1)
    kl = (p_t * (torch.log_softmax(t_logits, dim=-1) - torch.log_softmax(s_logits, dim=-1))).sum(-1)  # [B, R, L]
    valid = mask[:, None, :].to(kl.dtype)
    return (kl * valid).sum() / (valid.sum() * heads)


class BaselineStep:
    """Eager teacher and student with ``output_attentions``/``output_hidden_states``, naive KL, AdamW."""

    def __init__(self, models: BenchModels, device: str = "cpu", dtype: str = "fp32"):
        from transformers import AutoModel

        from toolkit.models.capture import default_teacher_layer

        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        torch.manual_seed(TEACHER_SEED)
        if isinstance(models.teacher, str):
            teacher = AutoModel.from_pretrained(models.teacher, attn_implementation="eager", local_files_only=True)
        else:
            teacher = AutoModel.from_config(models.teacher.to_config("eager"), attn_implementation="eager")
        teacher.eval()
        teacher.requires_grad_(False)
        torch.manual_seed(STUDENT_SEED)
        stock = dataclasses.replace(models.student, hidden_dropout=0.1, attention_dropout=0.1)  # BertConfig defaults
        student = AutoModel.from_config(stock.to_config("eager"), attn_implementation="eager")
        student.train()
        for name, model in (("teacher", teacher), ("student", student)):
            if model.config._attn_implementation != "eager":
                raise ToolkitError(f"baseline {name} runs {model.config._attn_implementation!r} attention, "
                                   "expected eager; this transformers version ignores attn_implementation")
        teacher.to(self.device)
        student.to(self.device)
        self.teacher, self.student, self.heads = teacher, student, models.relation_heads
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
        n_layers = teacher.config.num_hidden_layers
        self.teacher_read = (models.teacher_layer if models.teacher_layer > 0 else default_teacher_layer(n_layers)) - 1
        self.teacher_layers_run = n_layers   # a plain script runs the whole teacher

    def _autocast(self):
        # A plain script's mixed precision: fp32 weights, bf16 compute where autocast allows it.
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)

    @staticmethod
    def _qkv(model: nn.Module, hidden_states: Sequence[Tensor], layer: int) -> Dict[str, Tensor]:
        # hidden_states[i] is the input of layer i (0-based), so Q/K/V of `layer` come from it.
        attn = model.encoder.layer[layer].attention.self
        h = hidden_states[layer]
        return {"q": attn.query(h), "k": attn.key(h), "v": attn.value(h)}

    @torch.no_grad()
    def teacher_qkv(self, batch: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """Full eager teacher forward with every attention map and hidden state; Q/K/V recomputed."""
        with self._autocast():
            t_out = self.teacher(**batch, output_attentions=True, output_hidden_states=True)
            return self._qkv(self.teacher, t_out.hidden_states, self.teacher_read)

    def student_loss(self, batch: Mapping[str, Tensor], t_qkv: Dict[str, Tensor]) -> Tensor:
        """Eager student forward, Q/K/V recomputed, naive relation KL summed over q/k/v."""
        with self._autocast():
            s_out = self.student(**batch, output_attentions=True, output_hidden_states=True)
            s_qkv = self._qkv(self.student, s_out.hidden_states, self.student.config.num_hidden_layers - 1)
            return sum(naive_relation_kl(t_qkv[r], s_qkv[r], batch["attention_mask"], self.heads)
                       for r in RELATIONS)

    def step(self, batch: Mapping[str, Tensor], phases: Dict[str, float]) -> float:
        """One optimizer step; adds seconds per phase to ``phases``. Returns the loss."""
        return _timed_step(self, batch, phases)


def _timed_step(impl: Any, batch: Mapping[str, Tensor], phases: Dict[str, float]) -> float:
    """teacher forward + student forward + loss + backward + optimizer step + zero_grad.

    Adds the seconds of each phase to ``phases`` (the GPU is synchronized at each boundary).
    Returns the loss.
    """
    dev = impl.device
    t0 = time.perf_counter()
    t_qkv = impl.teacher_qkv(batch)
    sync(dev)
    t1 = time.perf_counter()
    loss = impl.student_loss(batch, t_qkv)
    del t_qkv
    sync(dev)
    t2 = time.perf_counter()
    loss.backward()
    sync(dev)
    t3 = time.perf_counter()
    impl.optimizer.step()
    impl.optimizer.zero_grad(set_to_none=True)
    sync(dev)
    t4 = time.perf_counter()
    for name, dt in (("teacher_fwd", t1 - t0), ("student_fwd_loss", t2 - t1), ("backward", t3 - t2),
                     ("optimizer", t4 - t3)):
        phases[name] = phases.get(name, 0.0) + dt
    return float(loss.detach())


#: Implementations by name (the order of the table rows). ``toolkit_ckpt`` is the recipe's step
#: with ``student.activation_checkpointing: true`` (memory for time at long sequences);
#: ``toolkit_attndrop01`` sets the student's attention dropout to 0.1 (CPU sdpa then has no
#: fused kernel and falls back to the math path): what the recipe's default of 0 avoids.
IMPLS: Dict[str, Callable[..., Any]] = {
    "toolkit": ToolkitStep,
    "baseline": BaselineStep,
    "toolkit_ckpt": lambda models, **kw: ToolkitStep(models, activation_checkpointing=True, **kw),
    "toolkit_attndrop01": lambda models, **kw: ToolkitStep(models, student_attention_dropout=0.1, **kw),
}


# ----------------------------------------------------------------------------------------------
# Profiling: op self-time by category
_OP_CATEGORIES = {
    "aten::addmm": "linear matmuls (QKV/O/FFN)",
    "aten::mm": "linear matmuls (QKV/O/FFN)",
    "aten::bmm": "batched matmuls (attention, relation logits)",
    "aten::baddbmm": "batched matmuls (attention, relation logits)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "sdpa flash kernel",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward": "sdpa flash kernel",
    "aten::_softmax": "softmax / logsumexp / exp",
    "aten::_log_softmax": "softmax / logsumexp / exp",
    "aten::_softmax_backward_data": "softmax / logsumexp / exp",
    "aten::_log_softmax_backward_data": "softmax / logsumexp / exp",
    "aten::logsumexp": "softmax / logsumexp / exp",
    "aten::exp": "softmax / logsumexp / exp",
    "aten::exp_": "softmax / logsumexp / exp",
    "aten::bernoulli_": "dropout masks",
    "aten::native_dropout": "dropout masks",
    "aten::_fused_adamw_": "optimizer",
    "aten::gelu": "gelu",
    "aten::gelu_backward": "gelu",
    "aten::native_layer_norm": "layer norm",
    "aten::native_layer_norm_backward": "layer norm",
    "aten::embedding_dense_backward": "embedding backward",
}
_OP_PREFIX_CATEGORIES = {"aten::_foreach_": "optimizer"}
# Inclusive CPU time of these events (substring of the profiler key) is reported on its own.
_NAMED_TOTALS = {
    "relation KL forward (chunked kernel)": "_RelationKLFunction",
    "relation KL backward (chunked kernel)": "_RelationKLFunctionBackward",
    "sdpa math path (no fused kernel)": "aten::_scaled_dot_product_attention_math",
    "sdpa flash kernel (forward + backward)": "aten::_scaled_dot_product_flash_attention_for_cpu",
    "relation KL (fused CPU kernel)": "toolkit::cpu_relation",
}


def _op_category(name: str) -> str:
    if name in _OP_CATEGORIES:
        return _OP_CATEGORIES[name]
    for prefix, cat in _OP_PREFIX_CATEGORIES.items():
        if name.startswith(prefix):
            return cat
    return "other (elementwise, masks, copies)"


def profile_step(step: Any, batch: Mapping[str, Tensor]) -> Dict[str, Any]:
    """One step under ``torch.profiler``: self CPU time per op category and the top ops (ms)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step.step(batch, {})
    cats: Dict[str, float] = {}
    named: Dict[str, float] = {}
    ops = []
    for ev in prof.key_averages():
        for label, needle in _NAMED_TOTALS.items():
            # "X" must not also count "XBackward" (the backward has its own entry), and the
            # autograd engine's "evaluate_function: XBackward" wrapper event must not count the
            # backward a second time.
            if ev.key.startswith("autograd::engine::"):
                continue
            if needle in ev.key and not (needle.endswith("Function") and "Backward" in ev.key):
                named[label] = named.get(label, 0.0) + ev.cpu_time_total / 1000.0
        ms = ev.self_cpu_time_total / 1000.0
        if ms <= 0:
            continue
        cat = _op_category(ev.key)
        cats[cat] = cats.get(cat, 0.0) + ms
        ops.append((ev.key, ms, ev.count))
    ops.sort(key=lambda o: -o[1])
    return {"categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "named_inclusive_ms": {k: round(v, 1) for k, v in named.items()},
            "top_ops_ms": [{"op": n, "self_ms": round(ms, 1), "calls": c} for n, ms, c in ops[:20]]}


# ----------------------------------------------------------------------------------------------
# Worker (one implementation, one size, fresh process)
def run_worker(impl: str, seq: int, batch: int, steps: int, warmup: int, smoke: bool,
               profile: bool, device: str = "cpu", dtype: str = "fp32", preset: str = "minilm",
               paired_peak: bool = False) -> Dict[str, Any]:
    """Build, warm up, time ``steps`` steps; memory is measured from right after set-up.

    With ``paired_peak`` the matmul peak is timed again (best of 3 products) right after every
    timed step, outside the step's time: ``mfu_paired`` is the median over steps of each step's
    FLOP rate divided by its own adjacent peak, which the host's drift (a shared VM's rate moves
    by 5-25% within minutes) cancels out of, unlike a best-of-run peak against a median step.
    """
    models = bench_models(smoke, preset)
    step = IMPLS[impl](models, device=device, dtype=dtype)
    data = {k: v.to(device) for k, v in make_batch(models, batch, seq).items()}
    on_gpu = torch.device(device).type == "cuda"
    # Weights loaded from safetensors may be memory-mapped and only become resident when the
    # first forward reads them; read every page now so the models count in the set-up RSS
    # (they are not part of the step's memory growth), the same for both implementations.
    _fault_in(*step_models(step))
    # The matmul rate of this worker's cores just before its steps shows whether the run had
    # them to itself (the machine is shared); with ``paired_peak`` it is timed again after every
    # step. The matrices live in a sibling process (MatmulProbeProcess), so none of their memory
    # is in this worker's RSS growth, faults or CPU time.
    # (It ends with this worker: when the pipe closes, on an error too.)
    probe = MatmulProbeProcess(peak_size(smoke, device), dtype, device, torch.get_num_threads())
    local_peak = probe.measure(reps=3, warmup=1)
    gc.collect()
    rss_setup = rss_bytes()
    peak_setup = peak_rss_bytes()
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        gpu_setup = torch.cuda.memory_allocated(device)
    losses, times = [], []
    cpu0, wall0 = cpu_seconds(), time.perf_counter()
    phases_per_step: List[Dict[str, float]] = []
    ru0 = None
    paired: List[float] = []
    probe_wall = 0.0   # the worker waits while the probe runs: taken out of its CPU-busy figure
    for i in range(warmup + steps):
        if i == warmup:
            ru0 = resource.getrusage(resource.RUSAGE_SELF)   # page faults / system time of the timed steps
        phases: Dict[str, float] = {}
        t0 = time.perf_counter()
        losses.append(step.step(data, phases))
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
            phases_per_step.append(phases)
            if paired_peak:
                w_a = time.perf_counter()
                paired.append(probe.measure(reps=3, warmup=0).best_flops)
                probe_wall += time.perf_counter() - w_a
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu_util = (cpu_seconds() - cpu0) / ((time.perf_counter() - wall0 - probe_wall) * torch.get_num_threads())
    probe.close()
    peak = peak_rss_bytes()
    # Peak memory: host RSS on CPU; on a GPU, what PyTorch allocated on the device.
    mem_setup, mem_peak = (gpu_setup, torch.cuda.max_memory_allocated(device)) if on_gpu else (rss_setup, peak)
    med = statistics.median(times)
    tokens = int(data["attention_mask"].sum())
    flops = step_flops(_shape(step.teacher.config, step.teacher_layers_run),
                       _shape(step.student.config, step.student.config.num_hidden_layers), batch, seq,
                       relations=len(RELATIONS))
    out: Dict[str, Any] = {
        "impl": impl, "seq": seq, "batch": batch, "steps": steps, "warmup": warmup,
        "threads": torch.get_num_threads(), "step_s_median": med, "step_s_all": times,
        "tokens_per_s": tokens / med, "samples_per_s": batch / med, "flops_per_step": flops,
        "achieved_flops": flops / med, "teacher_layers_run": step.teacher_layers_run,
        "device": torch.device(device).type, "dtype": dtype, "models": preset,
        "relation_kl_kernel": relation_kl_kernel(impl, device, dtype),
        "memory_kind": "cuda_allocated" if on_gpu else "host_rss",
        "rss_after_setup_mib": rss_setup / MIB, "peak_rss_setup_mib": peak_setup / MIB,
        "peak_rss_mib": mem_peak / MIB, "peak_growth_mib": (mem_peak - mem_setup) / MIB,
        "phases_s_median": {k: statistics.median(p[k] for p in phases_per_step) for k in phases_per_step[0]},
        "losses": losses, "loss_finite": all(math.isfinite(x) for x in losses),
        "cpu_util": cpu_util, "local_matmul_gflops": local_peak.best_flops / 1e9,
        "loadavg_end": load_average(), "allocator": allocator_in_use(),
        # Minor page faults and kernel time per timed step: what an allocator that gives memory
        # back to the kernel costs (glibc above its mmap/trim thresholds).
        "minor_faults_per_step": (ru1.ru_minflt - ru0.ru_minflt) / steps,
        "sys_s_per_step": (ru1.ru_stime - ru0.ru_stime) / steps,
    }
    if paired:
        out["paired_peak_gflops"] = [p / 1e9 for p in paired]
        out["mfu_paired"] = statistics.median(flops / t / p for t, p in zip(times, paired))
    if profile:
        out["profile"] = profile_step(step, data)
    return out


def relation_kl_kernel(impl: str, device: str, dtype: str = "fp32") -> str:
    """Which relation-KL implementation a row's step ran: the baseline's own, or what the
    registry's ``auto`` picks for the step's student tensors (and any that failed here)."""
    if impl == "baseline":
        return "naive (baseline)"
    from toolkit.losses.relation_kl import describe_relation_kl, failed_implementations

    name = describe_relation_kl("auto", torch.device(device), 1, 1, 1, dtype=DTYPES[dtype]).split(" ")[0]
    failed = failed_implementations()
    return name + (f" ({', '.join(f'{k} failed: {v[:120]}' for k, v in failed.items())})" if failed else "")


def peak_size(smoke: bool, device: str) -> int:
    """Matrix size of the matmul-peak measurement: large enough to reach the device's peak."""
    if smoke:
        return 256
    return 8192 if torch.device(device).type == "cuda" else 2048


def step_models(step: Any) -> List[nn.Module]:
    """The modules of a step's models: the toolkit's frozen teacher (and its cut layer) or the
    baseline's teacher, and the student."""
    teacher = step.teacher
    parts = [teacher.model, teacher.cut_block] if hasattr(teacher, "model") else [teacher]
    return [m for m in (*parts, step.student) if m is not None]


def _fault_in(*models: nn.Module) -> None:
    """Read every parameter and buffer once (pages of a memory-mapped checkpoint become resident)."""
    with torch.no_grad():
        for model in models:
            for t in list(model.parameters()) + list(model.buffers()):
                if t.numel():
                    t.reshape(-1)[:: max(1, 1024 // max(1, t.element_size()))].sum()


def label(r: Mapping[str, Any]) -> str:
    """Row name: the implementation, with its allocator when that is not the system one."""
    alloc = r.get("allocator_asked", "system")
    return r["impl"] if alloc == "system" else f"{r['impl']} +{alloc}"


def worker_env(alloc: str, threads: int) -> Dict[str, str]:
    """Environment of a benchmark worker: ``threads`` BLAS/OpenMP threads, offline hub, and the
    host allocator ``alloc`` preloaded."""
    return allocator_env(alloc, dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                                     TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))


def run_worker_process(cmd: Sequence[str], alloc: str, threads: int, timeout: int, prefix: str,
                       base: Dict[str, Any]) -> Dict[str, Any]:
    """Start a worker command under ``alloc``; its JSON line after ``prefix``, or ``base`` plus an
    ``error`` (timeout, crash, out of memory, or a worker that ran on another allocator)."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, env=worker_env(alloc, threads),
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**base, "error": f"timed out after {timeout}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(prefix):
            out = {**json.loads(line[len(prefix):]), "allocator_asked": alloc}
            if out["allocator"] != alloc:
                return {**base, "error": f"asked for the {alloc} allocator, the worker ran with {out['allocator']}"}
            return out
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    return {**base, "error": f"{why}: {' | '.join(tail)}"}


def spawn_worker(impl: str, seq: int, batch: int, args: argparse.Namespace,
                 alloc: str = "system") -> Dict[str, Any]:
    """Run :func:`run_worker` in a fresh interpreter; a crash becomes a row with ``error`` set."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, "--seqs", str(seq),
           "--batches", str(batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype, "--models", args.models]
    if args.smoke:
        cmd.append("--smoke")
    if args.profile:
        cmd.append("--profile")
    if args.paired_peak:
        cmd.append("--paired-peak")
    base = {"impl": impl, "seq": seq, "batch": batch, "allocator_asked": alloc}
    return run_worker_process(cmd, alloc, args.threads, args.worker_timeout, RESULT_PREFIX, base)


# ----------------------------------------------------------------------------------------------
# Parent: loss check, matmul peak, table
def loss_check(models: BenchModels, seq: int, batch: int = 2, device: str = "cpu") -> Dict[str, Any]:
    """Both steps' loss on one batch (last row padded), dropout off, same weights, fp32."""
    tk, bl = ToolkitStep(models, device=device, fp32_teacher=True), BaselineStep(models, device=device)
    weights = dict(tk.teacher.model.state_dict())   # truncated layers are absent
    if tk.teacher.cut is not None:   # the read layer, cut after its projections, is a module of its own
        weights.update({f"encoder.layer.{tk.teacher.cut}.{k}": v for k, v in tk.teacher.cut_block.state_dict().items()})
    bl.teacher.load_state_dict(weights, strict=False)
    bl.student.load_state_dict(tk.student.state_dict())
    tk.module.eval()
    bl.student.eval()
    data = {k: v.to(device) for k, v in make_batch(models, batch, seq, pad_last=seq // 4).items()}
    with torch.no_grad():
        a = float(tk.student_loss(data, tk.teacher_qkv(data)))
        b = float(bl.student_loss(data, bl.teacher_qkv(data)))
    rel = abs(a - b) / max(abs(b), 1e-12)
    return {"seq": seq, "batch": batch, "toolkit_loss": a, "baseline_loss": b, "rel_diff": rel, "ok": rel <= 1e-4}


def parse_batches(text: Optional[str], seqs: Sequence[int], smoke: bool) -> Dict[int, List[int]]:
    """``"128=8,32;512=4,8"`` (per seq) or ``"4,8"`` (every seq); None = the defaults."""
    if text is None:
        if smoke:
            return {s: [2] for s in seqs}
        return {s: DEFAULT_BATCHES.get(s, [8]) for s in seqs}
    if "=" not in text:
        values = parse_int_list(text, "--batches")
        return {s: values for s in seqs}
    out: Dict[int, List[int]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        if "=" not in part:
            raise ConfigError("--batches", f"mix of per-seq and plain lists in {text!r}; write e.g. 128=8,32;512=4,8")
        seq_text, values = part.split("=", 1)
        seq = parse_int_list(seq_text, "--batches")[0]
        if seq not in seqs:
            raise ConfigError("--batches", f"seq {seq} is not in --seqs {list(seqs)}")
        out[seq] = parse_int_list(values, "--batches")
    missing = [s for s in seqs if s not in out]
    if missing:
        raise ConfigError("--batches", f"no batch sizes for seq {missing[0]}; add e.g. '{missing[0]}=8'")
    return out


def compare(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """toolkit / baseline ratios per (seq, batch) where both ran: first like for like (the
    baseline under the same allocator), then, for a toolkit row under another allocator, against
    the baseline on the system allocator too."""
    ok = [r for r in results if "error" not in r]
    by_key = {(r["impl"], r["allocator_asked"], r["seq"], r["batch"]): r for r in ok}
    out = []
    for (impl, alloc, seq, batch), tk in by_key.items():
        if impl == "baseline":
            continue
        for bl_alloc in dict.fromkeys([alloc, "system"]):
            bl = by_key.get(("baseline", bl_alloc, seq, batch))
            if bl is None:
                continue
            out.append({"impl": impl, "allocator": alloc, "baseline_allocator": bl_alloc, "seq": seq,
                        "batch": batch, "tokens_per_s_ratio": tk["tokens_per_s"] / bl["tokens_per_s"],
                        "peak_growth_ratio": tk["peak_growth_mib"] / bl["peak_growth_mib"],
                        "peak_rss_ratio": tk["peak_rss_mib"] / bl["peak_rss_mib"]})
    return out


def _pair(r: Mapping[str, Any]) -> str:
    """``toolkit +tcmalloc vs baseline +tcmalloc`` style name of one ratio row."""
    left = label({"impl": r["impl"], "allocator_asked": r["allocator"]})
    right = label({"impl": "baseline", "allocator_asked": r["baseline_allocator"]})
    return f"{left} vs {right}"


#: The MFU target on a GPU (bf16), against the measured bf16 matmul peak.
GPU_MFU_TARGET = 0.45


def check_targets(results: Sequence[Dict[str, Any]], ratios: Sequence[Dict[str, Any]], device: str = "cpu",
                  dtype: str = "fp32") -> List[Dict[str, Any]]:
    """The performance targets. CPU fp32: seq 512 >= 2x tokens/s and <= 1/4 memory, seq 128 MFU >=
    80%. GPU: MFU >= 45% of the bf16 matmul peak on every toolkit row. CPU bf16 has none."""
    out = []
    if device == "cuda":
        for r in results:
            if r.get("impl") != "baseline" and "error" not in r:
                out.append({"target": f"{label(r)} seq {r['seq']} batch {r['batch']}: MFU >= "
                                      f"{100 * GPU_MFU_TARGET:.0f}% of the {dtype} matmul peak",
                            "value": f"{100 * r['mfu']:.1f}%", "met": r["mfu"] >= GPU_MFU_TARGET})
        return out
    if dtype != "fp32":
        return out
    for r in ratios:
        if r["seq"] == 512:
            where = f"{_pair(r)}, seq 512 batch {r['batch']}"
            out.append({"target": f"{where}: tokens/s >= 2x",
                        "value": f"{r['tokens_per_s_ratio']:.2f}x", "met": r["tokens_per_s_ratio"] >= 2.0})
            out.append({"target": f"{where}: peak RSS growth <= 1/4",
                        "value": f"{r['peak_growth_ratio']:.2f}", "met": r["peak_growth_ratio"] <= 0.25})
    for r in results:
        if r.get("impl") != "baseline" and r.get("seq") == 128 and "error" not in r:
            out.append({"target": f"{label(r)} seq 128 batch {r['batch']}: MFU >= 80% of the fp32 matmul peak",
                        "value": f"{100 * r['mfu']:.1f}%", "met": r["mfu"] >= 0.8})
    return out


def render(results: Sequence[Dict[str, Any]], ratios: Sequence[Dict[str, Any]],
           targets: Sequence[Dict[str, Any]], device: str = "cpu") -> str:
    """Markdown: per-run table, ratio table, targets."""
    mem = "GPU memory (allocated)" if device == "cuda" else "RSS"
    paired = any("mfu_paired" in r for r in results)
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["seq"], r["batch"], label(r), "failed: " + r["error"]] + [""] * (7 + paired))
            continue
        ph = r["phases_s_median"]
        mfu = [f"{100 * r['mfu']:.1f}"]
        if paired:
            mfu.append(f"{100 * r['mfu_paired']:.1f}" if "mfu_paired" in r else "")
        rows.append([r["seq"], r["batch"], label(r), f"{1000 * r['step_s_median']:.0f}",
                     f"{r['tokens_per_s']:.0f}", f"{r['samples_per_s']:.2f}", *mfu,
                     f"{r['peak_growth_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
                     f"{100 * r['cpu_util']:.0f}% / {r['local_matmul_gflops']:.0f}",
                     " / ".join(f"{1000 * ph[k]:.0f}" for k in ("teacher_fwd", "student_fwd_loss", "backward",
                                                                  "optimizer"))])
    mfu_head = ["MFU %", "MFU % (paired)"] if paired else ["MFU %"]
    parts = [markdown_table(["seq", "batch", "impl", "step ms (median)", "tokens/s", "samples/s", *mfu_head,
                             f"peak {mem} growth MiB", f"peak {mem} MiB", "CPU busy / matmul GFLOP/s before",
                             "ms: teacher fwd / student fwd+loss / backward / optimizer"], rows)]
    if ratios:
        parts.append(markdown_table(
            ["comparison", "seq", "batch", "tokens/s ratio", f"peak {mem} growth ratio", f"peak {mem} ratio"],
            [[_pair(r), r["seq"], r["batch"], f"{r['tokens_per_s_ratio']:.2f}x", f"{r['peak_growth_ratio']:.2f}",
              f"{r['peak_rss_ratio']:.2f}"] for r in ratios]))
    if targets:
        parts.append(markdown_table(["target", "measured", "met"],
                                    [[t["target"], t["value"], "yes" if t["met"] else "NO"] for t in targets]))
    return "\n\n".join(parts)


def render_profiles(results: Sequence[Dict[str, Any]]) -> str:
    """Per-run profiler categories (self CPU ms of one step) as Markdown."""
    chunks = []
    for r in results:
        prof = r.get("profile")
        if not prof:
            continue
        total = sum(prof["categories_ms"].values()) or 1.0
        rows = [[cat, f"{ms:.0f}", f"{100 * ms / total:.0f}%"] for cat, ms in prof["categories_ms"].items()]
        rows += [[f"*incl.* {k}", f"{v:.0f}", f"{100 * v / total:.0f}%"]
                 for k, v in prof.get("named_inclusive_ms", {}).items()]
        chunks.append(f"**{label(r)}, seq {r['seq']}, batch {r['batch']}** (one profiled step, "
                      f"{total:.0f} ms self CPU)\n\n" + markdown_table(["category", "self ms", "share"], rows))
    return "\n\n".join(chunks)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqs", default=None, help="sequence lengths, e.g. 128,512 (default 128,512; --smoke: 16)")
    p.add_argument("--batches", default=None,
                   help="batch sizes: '4,8' for every seq or '128=8,32;512=4,8,16' (default as this example)")
    p.add_argument("--impls", default="toolkit,baseline", help=f"implementations among {', '.join(IMPLS)}")
    p.add_argument("--steps", type=int, default=5, help="timed steps per run (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before timing")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--allocators", default="system",
                   help="host allocators to run every implementation under: system, tcmalloc, jemalloc "
                        "(comma-separated; each worker is started with it preloaded)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where both steps run")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                   help="fp32, or bf16: the toolkit as under a DeepSpeed bf16 config, the baseline under autocast")
    p.add_argument("--models", default="minilm", choices=MODEL_PRESETS,
                   help="minilm: all-MiniLM-L6-v2 -> 3x384 (the CPU table); bert-large: BERT-large shape, "
                        "layer 21 -> 6x384 (the GPU table)")
    p.add_argument("--json", default=None, help="write all figures to this JSON file")
    p.add_argument("--smoke", action="store_true", help="tiny random models, seq 16, batch 2: checks the plumbing")
    p.add_argument("--profile", action="store_true", help="profile one extra step per run (op categories)")
    p.add_argument("--paired-peak", action="store_true",
                   help="also time the matmul peak right after every timed step and report 'MFU %% (paired)': "
                        "the median of each step's rate over its own adjacent peak, robust to the host's drift "
                        "(longer runs; the MFU column and the targets keep the best-of-run peak)")
    p.add_argument("--worker-timeout", type=int, default=900, help="seconds before a run is abandoned")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p


def check_device(args: argparse.Namespace) -> None:
    """Refuse settings that cannot run as asked, with what to do instead."""
    from toolkit.engine.precision import native_bf16_supported

    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device", "cuda was asked for but torch sees no GPU; run on a GPU host or use --device cpu")
    if args.device == "cuda" and args.profile:
        raise ConfigError("--profile", "profiles CPU op time only; on a GPU use nsys or torch.profiler with CUDA activity")
    if args.device == "cpu" and args.dtype == "bf16" and not args.smoke and not native_bf16_supported("cpu"):
        raise ConfigError("--dtype", "this CPU has no native bf16 (it would be emulated, ~400x slower than fp32); "
                          "use --dtype fp32 here, or bf16 on a CPU with AVX512-BF16/AMX or on a GPU")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return cli_main(build_parser(), _main, argv)


def _main(args: argparse.Namespace) -> int:
    check_counts(args, ("steps", "threads"))
    torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    seqs = parse_int_list(args.seqs or ("16" if args.smoke else "128,512"), "--seqs")
    if args.worker is not None:
        batch = parse_int_list(args.batches or "2", "--batches")[0]
        result = run_worker(args.worker, seqs[0], batch, args.steps, args.warmup, args.smoke, args.profile,
                            args.device, args.dtype, args.models, args.paired_peak)
        print(RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    impls = [s.strip() for s in args.impls.split(",") if s.strip()]
    bad = [i for i in impls if i not in IMPLS]
    if bad or not impls:
        raise ConfigError("--impls", f"unknown implementation {bad or impls}; choose from {list(IMPLS)}")
    batches = parse_batches(args.batches, seqs, args.smoke)
    allocs = [a.strip() for a in args.allocators.split(",") if a.strip()]
    bad = [a for a in allocs if a not in ("system", "tcmalloc", "jemalloc")]
    if bad or not allocs:
        raise ConfigError("--allocators", f"unknown allocator {bad or allocs}; choose from system, tcmalloc, jemalloc")
    for a in allocs:
        allocator_env(a, {})   # a missing library fails here, with how to install it
    check_device(args)
    models = bench_models(args.smoke, args.models)
    too_long = [s for s in seqs if s > models.max_positions]
    if too_long:
        raise ConfigError("--seqs", f"{too_long[0]} exceeds the models' {models.max_positions} positions")

    command = "python benchmarks/bench_distill_step.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:]))
    info = machine_info(args.threads)
    print(f"# distillation step benchmark\n\nmachine: {info['cpu']} ({', '.join(info['cpu_flags'])}), "
          f"{info['logical_cpus']} logical CPUs, {args.threads} threads, torch {info['torch']}, "
          f"transformers {info['transformers']}, {info['date']}, loadavg {info['loadavg']}")
    print(f"teacher: {models.teacher_note}")
    peak_n = peak_size(args.smoke, args.device)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"{args.threads} threads"
    print(f"steps: {args.dtype} on {args.device}; models: {args.models}")
    peak = measure_matmul_peak(peak_n, dtype=args.dtype, device=args.device)
    libs = ", ".join(f"{k} {v:.1f}" for k, v in (peak.by_backend or {}).items())
    print(f"{args.dtype} {peak_n}x{peak_n} matmul on {where}: best {peak.best_flops / 1e9:.1f} GFLOP/s, "
          f"median {peak.median_flops / 1e9:.1f} GFLOP/s (best per GEMM library: {libs}; MFU divides by the "
          f"best seen in the run)")
    check = loss_check(models, min(seqs[0], 128), device=args.device)
    print(f"loss check (seq {check['seq']}, batch {check['batch']}, padded row, dropout off): toolkit "
          f"{check['toolkit_loss']:.6f} baseline {check['baseline_loss']:.6f} rel diff {check['rel_diff']:.1e} "
          f"-> {'OK' if check['ok'] else 'MISMATCH'}", flush=True)
    if args.device == "cuda":
        # The check's models and the peak's matrices stay cached by this process's allocator
        # (GBs at BERT-large size) while every worker measures: hand them back first.
        import gc

        gc.collect()
        torch.cuda.empty_cache()

    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    base = {"machine": info, "command": command, "teacher": models.teacher_note, "device": args.device,
            "dtype": args.dtype, "models": args.models, "matmul_peak": peak.as_dict(), "loss_check": check}
    results: List[Dict[str, Any]] = []
    t_start = time.time()
    for seq in seqs:
        for batch in batches[seq]:
            for impl, alloc in ((i, a) for a in allocs for i in impls):
                r = spawn_worker(impl, seq, batch, args, alloc)
                name = label(r)
                if "error" not in r:
                    r["mfu"] = r["achieved_flops"] / peak.best_flops  # provisional; final peak below
                    print(f"  {name:8s} seq {seq:4d} batch {batch:3d}: {1000 * r['step_s_median']:8.0f} ms/step "
                          f"{r['tokens_per_s']:8.0f} tok/s  MFU {100 * r['mfu']:5.1f}%  "
                          + (f"(paired {100 * r['mfu_paired']:5.1f}%)  " if "mfu_paired" in r else "")
                          + f"growth {r['peak_growth_mib']:7.0f} MiB  "
                          f"{r['minor_faults_per_step']:7.0f} page faults/step", flush=True)
                else:
                    print(f"  {name:8s} seq {seq:4d} batch {batch:3d}: FAILED {r['error']}", flush=True)
                results.append(r)
                if args.json:
                    # Rewritten after every row, so a benchmark stopped by a time limit still
                    # leaves the rows it finished; "partial" until the end.
                    write_json(args.json, dict(base, partial=True, results=results,
                                                mfu_peak_gflops=peak.best_flops / 1e9))
    peak_after = measure_matmul_peak(peak_n, dtype=args.dtype, device=args.device)
    # MFU divides by the best matmul rate seen anywhere in this run (parent before/after, each
    # worker just before its steps): on a shared VM a slow measurement means contention, not a
    # lower ceiling.
    best_peak = max([peak.best_flops, peak_after.best_flops]
                    + [1e9 * r["local_matmul_gflops"] for r in results if "error" not in r])
    for r in results:
        if "error" not in r:
            r["mfu"] = r["achieved_flops"] / best_peak
    ratios = compare(results)
    targets = check_targets(results, ratios, args.device, args.dtype)
    print()
    print(render(results, ratios, targets, args.device))
    profiles = render_profiles(results)
    if profiles:
        print("\n" + profiles)
    print(f"\nMFU peak (best {args.dtype} {peak_n}x{peak_n} matmul seen in this run): {best_peak / 1e9:.1f} GFLOP/s; "
          f"matmul after the runs: best {peak_after.best_flops / 1e9:.1f} GFLOP/s; "
          f"loadavg {load_average()}; runs took {time.time() - t_start:.0f} s")
    if args.json:
        write_json(args.json, dict(base, partial=False, matmul_peak_after=peak_after.as_dict(),
                                    mfu_peak_gflops=best_peak / 1e9, results=results, ratios=ratios,
                                    targets=targets, loadavg_end=load_average()))
    return 0 if check["ok"] and all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
