"""MiniLM v1 (Wang et al. 2020): last-layer attention distributions + value relation.

Per attention head ``a`` (teacher and student must have the same head count; head widths
may differ): ``KL(softmax(Q_a K_a^T / sqrt(d_a))_t || ..._s)`` plus the value relation
``KL(softmax(V_a V_a^T / sqrt(d_a))_t || ..._s)``, each averaged over heads and real query
tokens. Both reuse the memory-bounded chunked relation KL.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Mapping, Optional

from torch import Tensor, nn

from toolkit.config import arg
from toolkit.errors import ConfigError, ToolkitError
from toolkit.losses.relation_kl.chunked import relation_kl_qk
from toolkit.losses.registry import DistillInputs, DistillLoss, LossContext, Needs, register_loss


class MiniLMv1Loss(nn.Module):
    """Attention-distribution KL + value-relation KL of the last layer.

    Args:
        student_heads: student attention heads.
        teacher_heads: teacher attention heads (must equal ``student_heads``).
        chunk_size: query rows per block (None = auto).
    """

    def __init__(self, student_heads: int, teacher_heads: int, chunk_size: Optional[int] = None):
        super().__init__()
        if student_heads != teacher_heads:
            raise ConfigError("num_attention_heads",
                              f"MiniLM v1 compares attention maps head by head, so the student's head count "
                              f"({student_heads}) must equal the teacher's ({teacher_heads}); use MiniLMv2 "
                              f"relations (minilm_v2) for different head counts")
        if student_heads < 1:
            raise ConfigError("num_attention_heads", f"must be positive, got {student_heads}")
        self.num_heads = student_heads
        self.chunk_size = chunk_size

    def forward(self, student_qkv: Mapping[str, Tensor], teacher_qkv: Mapping[str, Tensor],
                attention_mask: Tensor) -> Dict[str, Tensor]:
        """Args: ``*_qkv = {"q", "k", "v"}`` each ``[B, L, H]``; ``attention_mask`` ``[B, L]``.

        Returns:
            ``{"loss": attn + vv, "attn": scalar, "vv": scalar}``.
        """
        for side, qkv in (("student", student_qkv), ("teacher", teacher_qkv)):
            missing = [p for p in ("q", "k", "v") if p not in qkv]
            if missing:
                raise ToolkitError(f"MiniLM v1 needs the {side}'s q, k and v projections; missing {missing}")
        h = self.num_heads
        attn = relation_kl_qk(teacher_qkv["q"], teacher_qkv["k"], student_qkv["q"], student_qkv["k"],
                              attention_mask, h, self.chunk_size)
        vv = relation_kl_qk(teacher_qkv["v"], teacher_qkv["v"], student_qkv["v"], student_qkv["v"],
                            attention_mask, h, self.chunk_size)
        return {"loss": attn + vv, "attn": attn, "vv": vv}


@register_loss("minilm_v1")
class MiniLMv1(DistillLoss):
    """MiniLM v1 on the ``loss.teacher_layer`` / ``loss.student_layer`` pair (equal head counts)."""

    @dataclass
    class Options:
        chunk_size: int = arg(0, "query rows per block (0 = automatic)")

    def __init__(self, options: "MiniLMv1.Options", ctx: LossContext):
        super().__init__(options, ctx)
        if options.chunk_size < 0:
            raise ConfigError(f"{ctx.field}.chunk_size", "must be >= 0 (0 = automatic)")
        try:
            self.loss = MiniLMv1Loss(ctx.student_config.num_attention_heads, ctx.teacher_config.num_attention_heads,
                                     chunk_size=options.chunk_size or None)
        except ConfigError as e:
            raise ConfigError(ctx.field, e.message) from None
        self.s, self.t = ctx.student_layer, ctx.teacher_layer

    def needs(self) -> Needs:
        return Needs(student={self.s: {"q", "k", "v"}}, teacher={self.t: {"q", "k", "v"}})

    def forward(self, inputs: DistillInputs) -> Dict[str, Tensor]:
        return self.loss(inputs.student[self.s], inputs.teacher[self.t], inputs.attention_mask)
