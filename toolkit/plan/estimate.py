"""Memory per GPU and time per step of a checked job (:class:`~toolkit.plan.checks.JobFacts`).

Memory follows what DeepSpeed allocates for the ZeRO stage and offload the JSON asks for,
read through DeepSpeed's own config model (its defaults included):

* weights: the trained model in the compute dtype (ZeRO-3: a 1/N shard plus the layers
  gathered for the current and the prefetched step);
* fp32 master weights: half-precision jobs (and every ZeRO stage >= 1, which keeps an fp32
  partition it updates) - 1/N of them from stage 1 on;
* gradients: full size before ZeRO-2, a 1/N partition from stage 2, plus the fp32 partition
  handed to the optimizer;
* optimizer states: AdamW's two fp32 moments, 1/N of them from stage 1; offload moves master
  weights, fp32 gradients and moments to host memory;
* buffers: ZeRO-1/2's contiguous gradient buckets (``reduce_bucket_size`` elements, twice with
  ``overlap_comm``), ZeRO-3's prefetch and reduce buckets;
* activations: what autograd keeps per layer of the trained model at micro batch x sequence
  length (see :func:`layer_activation_bytes`), the embeddings, a layer cut to its Q/K/V
  projections, and the first gradients of the backward;
* the frozen teacher: its truncated weights in its dtype, and the Q/K/V it hands to the loss
  (its no-grad forward runs one layer at a time, before the student's activations exist);
* the loss: the relation-KL blocks of the chunked kernel on GPUs (or the whole ``[B, R, L, L]``
  of ``impl: naive``); the fused CPU kernel works in place.

The peak is the persistent part (weights, master weights, optimizer states, the frozen
teacher, and the gradients where ZeRO keeps them between steps: stages 0 and 1) plus the
step's: the activations, the teacher's Q/K/V, the loss, and under ZeRO-2/3 the gradient
partition and buckets the backward fills. Measured against the heap of short CPU runs in
tests/plan/test_memory_estimate.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from toolkit.plan.checks import JobFacts, TrainedPart

GIB = float(1 << 30)
ADAM_STATE_BYTES = 8            # two fp32 moments per parameter
FP32 = 4


@dataclass(frozen=True)
class Hardware:
    """What the plan is made for.

    Attributes:
        device: ``"gpu"`` (half-precision teacher) or ``"cpu"`` (fp32 teacher).
        nodes, gpus_per_node: the ranks (world size = nodes x gpus_per_node).
        gpu_memory: bytes per GPU.
        peak_tflops: the GPU's dense peak for the job's precision.
        mfu: the model-FLOPs utilisation the step time is estimated at.
    """

    device: str = "gpu"
    nodes: int = 1
    gpus_per_node: int = 1
    gpu_memory: float = 80e9
    peak_tflops: float = 312.0
    mfu: float = 0.4

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass
class Precision:
    compute: str            # fp32 | bf16 | fp16
    teacher: str

    @property
    def compute_bytes(self) -> int:
        return FP32 if self.compute == "fp32" else 2

    @property
    def teacher_bytes(self) -> int:
        return FP32 if self.teacher == "fp32" else 2


@dataclass
class MemoryPlan:
    """Bytes per GPU by part (``rows``), host bytes moved there by offload, and the peak."""

    rows: List[Tuple[str, float, str]] = field(default_factory=list)
    host_rows: List[Tuple[str, float]] = field(default_factory=list)
    persistent: float = 0.0
    step: float = 0.0
    activations: float = 0.0
    gradients: float = 0.0
    peak: float = 0.0


def precision_of(ds: Dict[str, Any], device: str) -> Precision:
    def on(key: str) -> bool:
        block = ds.get(key)
        return isinstance(block, dict) and bool(block.get("enabled", False))

    compute = "bf16" if on("bf16") or on("bfloat16") else "fp16" if on("fp16") else "fp32"
    if device == "cpu":
        return Precision(compute, compute if compute == "bf16" else "fp32")
    return Precision(compute, "bf16" if compute != "fp16" else "fp16")


def zero_settings(ds: Dict[str, Any], source: Optional[str] = None) -> Any:
    """DeepSpeed's own ZeRO config model of ``ds`` (with its defaults)."""
    from toolkit.engine.ds_config import deepspeed_view

    return deepspeed_view(ds, source).zero_config


def _offload(device: Any) -> bool:
    return device is not None and str(getattr(device, "device", device)).split(".")[-1].lower() not in ("none", "")


def layer_activation_bytes(tokens: int, hidden: int, inter: int, heads: int, seq: int, e: int,
                           device: str, attention_dropout: bool) -> float:
    """What autograd keeps for the backward of one trained BERT/ERNIE layer, in bytes.

    In ``tokens x hidden`` units of ``e`` bytes: the layer input (read by Q, K and V), Q, K and
    V (the attention's backward), the attention output and the output projection's contiguous
    copy of it, the two LayerNorms' inputs and the first one's output (the feed-forward input);
    in ``tokens x intermediate`` units: the GELU input and output; two dropout masks of one byte
    per element. Attention dropout (or eager attention) adds the ``[B, heads, L, L]``
    probabilities and their mask. The same on every device: the layers are transformers' own.
    """
    act = tokens * (9 * hidden + 2 * inter) * e + 2 * tokens * hidden
    if attention_dropout:
        batch = tokens // max(seq, 1)
        act += batch * heads * seq * seq * (e + 1)
    return float(act)


def _activations(part: TrainedPart, facts: JobFacts, micro: int, e: int, device: str) -> float:
    s = part.shape
    tokens = micro * facts.seq_length
    full_layers = part.layers_run - (1 if part.last_projections_only else 0)
    # GPUs run attention dropout inside the fused kernels; on CPUs it takes sdpa's math path.
    per_layer = layer_activation_bytes(tokens, s.hidden, s.intermediate, s.heads, facts.seq_length, e,
                                       device, attention_dropout=device == "cpu" and facts.attention_dropout > 0)
    if facts.activation_checkpointing:
        # Each layer keeps only its input; one layer's set is rebuilt at a time in the backward.
        kept = full_layers * tokens * s.hidden * e + (per_layer if full_layers else 0)
    else:
        kept = full_layers * per_layer
    embeddings = tokens * s.hidden * (2 * e + 1)              # LayerNorm input, output, dropout mask
    cut = 3 * tokens * s.hidden * e if part.last_projections_only else 0
    in_flight = tokens * max(s.hidden, s.intermediate) * e    # the backward's first gradients
    return float(kept + embeddings + cut + in_flight)


def _teacher_step(part: TrainedPart, facts: JobFacts, micro: int, e: int) -> Tuple[float, float]:
    """(the no-grad forward's working set, the Q/K/V it keeps for the loss), in bytes."""
    s = part.shape
    tokens = micro * facts.seq_length
    return float(tokens * (s.intermediate + 4 * s.hidden) * e), float(3 * tokens * s.hidden * e)


def _loss_bytes(facts: JobFacts, micro: int, device: str) -> float:
    if not facts.relation_heads:
        return 0.0
    seq, r = facts.seq_length, facts.relation_heads
    if facts.loss_impl == "naive":
        return float(facts.relations * micro * r * seq * seq * FP32 * 4)
    if device == "cpu":
        return 0.0
    from toolkit.losses.relation_kl.chunked import _LIVE_BLOCK_TENSORS, plan_blocks

    samples, rows = plan_blocks(micro, r, seq, False, facts.chunk_size)
    return float(samples * r * rows * seq * FP32 * _LIVE_BLOCK_TENSORS)


def estimate_memory(facts: JobFacts, hw: Hardware) -> MemoryPlan:
    """Bytes per GPU of ``facts``'s job on ``hw`` (see the module doc for each part)."""
    plan = MemoryPlan()
    part = facts.trained
    if part is None:
        return plan
    ds = facts.ds
    n = facts.world_size
    zero = zero_settings(ds, str(facts.ds_path) if facts.ds_path else None)
    stage = int(zero.stage)
    prec = precision_of(ds, hw.device)
    e = prec.compute_bytes
    half = prec.compute != "fp32"
    p_all = part.shape.params + part.extra_params
    p = part.trainable
    off_opt = stage >= 1 and _offload(getattr(zero, "offload_optimizer", None))
    off_param = stage == 3 and _offload(getattr(zero, "offload_param", None))
    shard = 1.0 / n if stage >= 1 else 1.0

    def row(name: str, nbytes: float, note: str = "", host: bool = False) -> None:
        (plan.host_rows.append((name, nbytes)) if host else plan.rows.append((name, nbytes, note)))

    # Weights
    if stage == 3:
        gathered = 2 * part.shape.layer_params * e
        resident = 0.0 if off_param else p_all * e / n
        row("weights", resident + gathered, f"1/{n} shard{' on the host' if off_param else ''} + 2 gathered layers")
        if off_param:
            row("weights (offloaded shard)", p_all * e / n, host=True)
    else:
        row("weights", p_all * e, prec.compute)
    # fp32 master weights
    if half or stage >= 1:
        master = p * FP32 * shard
        if off_opt:
            row("fp32 master weights (offloaded)", master, host=True)
        else:
            row("fp32 master weights", master, f"1/{n}" if stage >= 1 else "")
    # Optimizer states
    states = p * ADAM_STATE_BYTES * shard
    if off_opt:
        row("optimizer states (offloaded)", states, host=True)
    else:
        row("optimizer states", states, "AdamW moments, fp32" + (f", 1/{n}" if stage >= 1 else ""))
    # Gradients: full size and kept between steps before ZeRO-2; from ZeRO-2 a partition (and
    # its fp32 copy for the optimizer) that the backward fills and the step frees.
    if stage <= 1:
        grads = p * e + (p * FP32 * shard if (half or stage == 1) else 0)
        note = f"{prec.compute}" + (" + fp32 accumulation" if half and stage == 0 else "")
        note += "" if stage == 0 else f" + the fp32 1/{n} partition"
    else:
        grads = p * e / n + (0.0 if off_opt else p * FP32 / n)
        note = f"1/{n} partition + its fp32 copy, during the step" if not off_opt else \
            f"1/{n} partition, during the step (fp32 copy on the host)"
        if off_opt:
            row("fp32 gradients (offloaded)", p * FP32 / n, host=True)
    row("gradients", grads, note)
    plan.gradients = grads
    # DeepSpeed's buckets, made by the backward.
    if stage in (1, 2) and getattr(zero, "contiguous_gradients", False):
        copies = 2 if getattr(zero, "overlap_comm", False) else 1
        row("ZeRO buffers", float(zero.reduce_bucket_size) * (FP32 if stage == 1 else e) * copies,
            f"reduce_bucket_size {int(zero.reduce_bucket_size):,} x {copies}, during the step")
    elif stage == 3:
        row("ZeRO buffers", (float(zero.prefetch_bucket_size) + float(zero.reduce_bucket_size)) * e,
            "prefetch + reduce buckets")
    micro = int(ds["train_micro_batch_size_per_gpu"])
    # The frozen teacher
    teacher_work = teacher_qkv = 0.0
    if facts.frozen is not None:
        f = facts.frozen
        tb = prec.teacher_bytes
        weights_t = (f.shape.params_up_to(f.layers_run) + f.shape.pooler_params) * tb
        row("frozen teacher weights", weights_t, f"{prec.teacher}, {f.layers_run} of {f.shape.layers} layers")
        teacher_work, teacher_qkv = _teacher_step(f, facts, micro, tb)
        row("teacher Q/K/V for the loss", teacher_qkv, "its forward: one layer at a time, before the student's")
    act = _activations(part, facts, micro, e, hw.device)
    loss = _loss_bytes(facts, micro, hw.device)
    row("activations", act, f"micro batch {micro} x seq {facts.seq_length}"
        + (", checkpointed" if facts.activation_checkpointing else ""))
    if loss:
        row("relation loss", loss, f"{facts.relation_heads} relation heads, {facts.relations} relations")
    plan.activations = act + loss
    in_step = {"activations", "relation loss", "teacher Q/K/V for the loss"}
    if stage >= 2:
        in_step |= {"gradients", "ZeRO buffers"}
    elif stage == 1:
        in_step |= {"ZeRO buffers"}
    plan.persistent = sum(b for name, b, _ in plan.rows if name not in in_step)
    step = sum(b for name, b, _ in plan.rows if name in in_step)
    plan.step = max(step, teacher_work + teacher_qkv)
    plan.peak = plan.persistent + plan.step
    return plan


# -- compute -----------------------------------------------------------------------------------
def step_flops(facts: JobFacts) -> float:
    """Model FLOPs of one optimizer step over all ranks: 6 per trained parameter and token
    (forward + backward; 8 with activation checkpointing), 2 per frozen parameter and token,
    the attention's score and value matmuls, and the relation KL's ``Q Q^T`` products."""
    part = facts.trained
    if part is None:
        return 0.0
    ds = facts.ds
    seq = facts.seq_length
    tokens = float(ds["train_batch_size"]) * seq
    s = part.shape
    full = part.layers_run - (1 if part.last_projections_only else 0)
    train_mult = 8.0 if facts.activation_checkpointing else 6.0
    dense = full * s.layer_params + (s.qkv_params if part.last_projections_only else 0)
    flops = train_mult * dense * tokens + (train_mult / 2) * 4 * full * seq * s.hidden * tokens
    if facts.frozen is not None:
        t = facts.frozen.shape
        tfull = facts.frozen.layers_run - (1 if facts.frozen.last_projections_only else 0)
        tdense = tfull * t.layer_params + (t.qkv_params if facts.frozen.last_projections_only else 0)
        flops += 2.0 * tdense * tokens + 4.0 * tfull * seq * t.hidden * tokens
        if facts.relations:
            flops += facts.relations * 2.0 * seq * tokens * (t.hidden + 3 * s.hidden)
    return flops


def step_seconds(facts: JobFacts, hw: Hardware) -> float:
    return step_flops(facts) / max(facts.world_size, 1) / (hw.peak_tflops * 1e12 * hw.mfu)
