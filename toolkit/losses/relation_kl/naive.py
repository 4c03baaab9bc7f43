"""The materializing relation KL: plain autograd over ``[B, R, L, L]`` tensors.

Registered as ``naive`` in :mod:`toolkit.losses.relation_kl`: for short sequences, debugging and
as a reference the other implementations are compared with in the tests.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from toolkit.losses.relation_kl.chunked import check_relation_heads


def relation_kl_naive(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor,
                      num_relation_heads: int, chunk_size: Optional[int] = None) -> Tensor:
    """Materializing relation KL with plain autograd (fp32 statistics). ``chunk_size`` is ignored.

    Shapes as :func:`toolkit.losses.relation_kl.chunked.relation_kl_qk`; builds
    ``[B, R, L, L]`` tensors, so only for short sequences.
    """
    check_relation_heads(num_relation_heads, s_q.shape[-1], t_q.shape[-1])
    cdt = torch.promote_types(s_q.dtype, torch.float32)
    valid = mask.to(torch.bool)
    key_pad = ~valid[:, None, None, :]

    def rel_logits(q: Tensor, k: Tensor) -> Tensor:
        b, l, h = q.shape
        d = h // num_relation_heads
        qr = q.to(cdt).view(b, l, num_relation_heads, d).transpose(1, 2)
        kr = k.to(cdt).view(b, l, num_relation_heads, d).transpose(1, 2)
        logits = (qr @ kr.transpose(-1, -2)) * d ** -0.5
        return logits.masked_fill(key_pad, torch.finfo(cdt).min)

    t_logits = rel_logits(t_q.detach(), t_k.detach())
    logp_t = torch.log_softmax(t_logits, dim=-1)
    logp_s = torch.log_softmax(rel_logits(s_q, s_k), dim=-1)
    terms = (torch.softmax(t_logits, dim=-1) * (logp_t - logp_s)).masked_fill(key_pad, 0.0)
    row_kl = terms.sum(-1).masked_fill(~valid[:, None, :], 0.0)
    return row_kl.sum() / (valid.sum().clamp_min(1) * num_relation_heads)
