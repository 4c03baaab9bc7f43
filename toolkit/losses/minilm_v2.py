"""The registered MiniLMv2 loss: Q-Q/K-K/V-V self-attention relations of one layer pair.

MiniLMv2 (Wang et al. 2021) reads one teacher layer (the last for teachers of up to 12 layers,
an upper-middle one for larger teachers) and the student's last layer. The relation math is
:class:`toolkit.losses.relations.MiniLMv2RelationLoss`; this class wires it to the layer pair.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from torch import Tensor

from toolkit.config import arg
from toolkit.errors import ConfigError
from toolkit.losses.registry import DistillInputs, DistillLoss, LossContext, Needs, register_loss
from toolkit.losses.relations import MiniLMv2RelationLoss, validate_relations


@register_loss("minilmv2")
class MiniLMv2Loss(DistillLoss):
    """KL(teacher || student) of the relation distributions, summed over the relations."""

    @dataclass
    class Options:
        num_relation_heads: int = arg(0, "relation heads R, dividing both hidden sizes (0 = the teacher's "
                                      "attention head count)")
        relations: List[str] = arg(help="relation types: pairs of q/k/v", factory=lambda: ["qq", "kk", "vv"])
        impl: str = arg("auto", "relation-KL implementation: auto | chunked | naive | triton")
        chunk_size: int = arg(0, "query rows per block of the chunked implementation (0 = automatic)")

    def __init__(self, options: "MiniLMv2Loss.Options", ctx: LossContext):
        super().__init__(options, ctx)
        t_hidden, s_hidden = ctx.teacher_config.hidden_size, ctx.student_config.hidden_size
        heads = options.num_relation_heads or ctx.teacher_config.num_attention_heads
        for side, hidden in (("teacher", t_hidden), ("student", s_hidden)):
            if heads < 1 or hidden % heads:
                raise ConfigError(f"{ctx.field}.num_relation_heads",
                                  f"{heads} relation heads do not divide the {side} hidden size {hidden}; pick a "
                                  f"divisor of both {t_hidden} and {s_hidden}")
        try:
            relations = validate_relations(options.relations)
        except ConfigError as e:
            raise ConfigError(f"{ctx.field}.relations", e.message) from None
        if options.chunk_size < 0:
            raise ConfigError(f"{ctx.field}.chunk_size", "must be >= 0 (0 = automatic)")
        try:
            self.relation = MiniLMv2RelationLoss(heads, relations=relations, chunk_size=options.chunk_size or None,
                                                 impl=options.impl)
        except ConfigError as e:
            raise ConfigError(f"{ctx.field}.{e.field}", e.message) from None
        self.num_relation_heads = heads
        self.s, self.t = ctx.student_layer, ctx.teacher_layer
        self.projections = frozenset("".join(relations))

    def needs(self) -> Needs:
        return Needs(student={self.s: self.projections}, teacher={self.t: self.projections})

    def forward(self, inputs: DistillInputs) -> Dict[str, Tensor]:
        return self.relation(inputs.student[self.s], inputs.teacher[self.t], inputs.attention_mask)
