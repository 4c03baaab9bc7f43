"""Float64 reference for the MiniLMv2 relation loss, written straight from the formula.

Materializes every ``[B, R, L, L]`` relation; meant for tests and as the benchmark baseline,
never for training. Differentiable (plain autograd), so tests also compare gradients.
"""
from __future__ import annotations

from typing import Dict, Mapping, Sequence

import torch
from torch import Tensor


def _relations(x: Tensor, heads: int, valid: Tensor) -> Tensor:
    """Relation distributions ``[B, R, L, L]`` in float64 from ``x`` ``[B, L, H]``."""
    b, l, h = x.shape
    d = h // heads
    xr = x.to(torch.float64).reshape(b, l, heads, d).permute(0, 2, 1, 3)      # [B, R, L, d]
    logits = xr @ xr.transpose(-1, -2) / d ** 0.5                            # [B, R, L, L]
    logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    return torch.softmax(logits, dim=-1)


def relation_kl_reference(t_x: Tensor, s_x: Tensor, mask: Tensor, num_relation_heads: int) -> Tensor:
    """KL(teacher || student) of self-relations, averaged over heads and real query tokens.

    Args:
        t_x: teacher projection ``[B, L, Ht]``.
        s_x: student projection ``[B, L, Hs]``.
        mask: ``[B, L]``, 1 for real tokens.
        num_relation_heads: R (divides Ht and Hs).

    Returns:
        float64 scalar.
    """
    valid = mask.to(torch.bool)
    p_t = _relations(t_x.detach(), num_relation_heads, valid)
    p_s = _relations(s_x, num_relation_heads, valid)
    key_ok = valid[:, None, None, :].expand_as(p_t)
    # Only real keys enter the sum; there p_t > 0 so the logs are finite.
    terms = torch.where(key_ok, p_t * (torch.log(torch.where(key_ok, p_t, 1.0))
                                       - torch.log(torch.where(key_ok, p_s, 1.0))), 0.0)
    row_kl = terms.sum(dim=-1)                                               # [B, R, L]
    row_kl = torch.where(valid[:, None, :], row_kl, 0.0)
    n_rows = valid.sum().clamp_min(1) * num_relation_heads
    return row_kl.sum() / n_rows


def minilm_v2_reference(student_qkv: Mapping[str, Tensor], teacher_qkv: Mapping[str, Tensor],
                        mask: Tensor, num_relation_heads: int,
                        relations: Sequence[str] = ("qq", "kk", "vv")) -> Dict[str, Tensor]:
    """Sum of self-relation KLs (e.g. QQ + KK + VV) in float64.

    Args:
        student_qkv: ``{"q", "k", "v"}`` each ``[B, L, Hs]``.
        teacher_qkv: ``{"q", "k", "v"}`` each ``[B, L, Ht]``.
        mask: ``[B, L]``, 1 for real tokens.
        num_relation_heads: R.
        relations: self-relation names, each a doubled letter of q/k/v.

    Returns:
        ``{"loss": total, "<relation>": value, ...}`` float64 scalars.
    """
    out: Dict[str, Tensor] = {}
    for rel in relations:
        key = rel[0]
        out[rel] = relation_kl_reference(teacher_qkv[key], student_qkv[key], mask, num_relation_heads)
    out["loss"] = sum(out[r] for r in relations)
    return out
