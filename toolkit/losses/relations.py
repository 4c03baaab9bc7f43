"""MiniLMv2 multi-head self-attention relation distillation loss.

Relation ``"qq"`` compares ``softmax(Q_r Q_r^T / sqrt(d_r))`` of teacher and student, per
relation head ``r`` (the hidden dim split into ``R`` heads, independent of the attention
head count, so teacher and student hidden sizes may differ). ``"kk"`` and ``"vv"`` likewise;
cross relations such as ``"qk"`` (query side Q, key side K) are accepted too. The loss per
relation is KL(teacher || student) averaged over relation heads and real query tokens; the
total is the plain sum over relations (weights across loss families live in the recipe).

The relation KL itself runs on the implementation named by ``impl``, looked up in the
registry of :mod:`toolkit.losses.relation_kl` (``auto``: the best one the tensors allow).
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

from torch import Tensor, nn

from toolkit.errors import ConfigError, ToolkitError
from toolkit.losses.relation_kl import check_relation_kl_name, compute_relation_kl, describe_relation_kl

__all__ = ["MiniLMv2RelationLoss", "describe_relation_kl", "validate_relations"]

_PROJECTIONS = ("q", "k", "v")


def validate_relations(relations: Sequence[str]) -> tuple:
    """Normalize relation names (``"qq"``, ``"KK"``, ``"q-k"`` ...) or raise ConfigError('relations')."""
    if isinstance(relations, str):
        relations = [r for r in relations.split(",") if r.strip()]
    out = []
    for rel in relations:
        name = str(rel).strip().lower().replace("-", "")
        if len(name) != 2 or any(c not in _PROJECTIONS for c in name):
            raise ConfigError("relations", f"unknown relation {rel!r}; use pairs of q/k/v such as qq, kk, vv")
        if name in out:
            raise ConfigError("relations", f"relation {name!r} is listed twice")
        out.append(name)
    if not out:
        raise ConfigError("relations", "must name at least one relation, e.g. [qq, kk, vv]")
    return tuple(out)


class MiniLMv2RelationLoss(nn.Module):
    """Multi-head self-attention relation distillation (MiniLMv2).

    Args:
        num_relation_heads: R, shared by teacher and student; must divide both hidden sizes.
        relations: relation types; default ``("qq", "kk", "vv")``.
        chunk_size: query rows per block for the chunked path (None = auto).
        impl: a relation-KL implementation (:mod:`toolkit.losses.relation_kl`): ``"auto"``,
            ``"chunked"``, ``"naive"``, ``"triton"`` or one another package registered.
    """

    def __init__(self, num_relation_heads: int, relations: Sequence[str] = ("qq", "kk", "vv"),
                 chunk_size: Optional[int] = None, impl: str = "auto"):
        super().__init__()
        if not isinstance(num_relation_heads, int) or num_relation_heads < 1:
            raise ConfigError("num_relation_heads", f"must be a positive integer, got {num_relation_heads!r}")
        check_relation_kl_name(impl)
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ConfigError("chunk_size", f"must be a positive integer or null (auto), got {chunk_size!r}")
        self.num_relation_heads = num_relation_heads
        self.relations = validate_relations(relations)
        self.chunk_size = chunk_size
        self.impl = impl

    def extra_repr(self) -> str:
        return (f"num_relation_heads={self.num_relation_heads}, relations={self.relations}, "
                f"chunk_size={self.chunk_size}, impl={self.impl!r}")

    def forward(self, student_qkv: Mapping[str, Tensor], teacher_qkv: Mapping[str, Tensor],
                attention_mask: Tensor) -> Dict[str, Tensor]:
        """Relation KL losses.

        Args:
            student_qkv: ``{"q", "k", "v"}`` projections of the student layer, each ``[B, L, Hs]``.
            teacher_qkv: same for the teacher layer, each ``[B, L, Ht]`` (no gradient).
            attention_mask: ``[B, L]``, 1 for real tokens.

        Returns:
            ``{"loss": sum over relations, "<relation>": per-relation scalar, ...}``.
        """
        out: Dict[str, Tensor] = {}
        for rel in self.relations:
            for side, qkv in (("student", student_qkv), ("teacher", teacher_qkv)):
                missing = [p for p in rel if p not in qkv]
                if missing:
                    raise ToolkitError(f"MiniLMv2 relation {rel!r} needs the {side}'s {missing[0]!r} projection; "
                                       f"capture it (QKVCapture what=...); got keys {sorted(qkv)}")
            out[rel] = compute_relation_kl(self.impl, teacher_qkv[rel[0]], teacher_qkv[rel[1]], student_qkv[rel[0]],
                                           student_qkv[rel[1]], attention_mask, self.num_relation_heads,
                                           self.chunk_size)
        total = out[self.relations[0]]
        for rel in self.relations[1:]:
            total = total + out[rel]
        out["loss"] = total
        return out
