"""TinyBERT (Jiao et al. 2020) intermediate-layer distillation.

* Hidden-state MSE between ``W s_l`` and ``t_m`` for each configured layer pair ``(l, m)``,
  with one learned projection ``W: Hs -> Ht`` per pair (the projections are trained with the
  student and discarded after distillation).
* Attention-score MSE between the unnormalized scores ``Q_a K_a^T / sqrt(d_a)`` per head
  (needs equal head counts), only over (real query, real key) pairs.

Both are averaged over real tokens (padding never enters) and summed over layer pairs, as
in the paper.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from toolkit.errors import ConfigError, ToolkitError


def _scores(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """[B, L, H] query/key projections -> attention scores [B, A, L, L] (fp32)."""
    b, l, h = q.shape
    d = h // heads
    cdt = torch.promote_types(q.dtype, torch.float32)
    qh = q.to(cdt).view(b, l, heads, d).transpose(1, 2)
    kh = k.to(cdt).view(b, l, heads, d).transpose(1, 2)
    return qh @ kh.transpose(-1, -2) * d ** -0.5


class TinyBERTLoss(nn.Module):
    """Hidden-state MSE (learned projection) + attention-score MSE over layer pairs.

    Args:
        student_hidden_size: Hs.
        teacher_hidden_size: Ht.
        layer_pairs: ``[(student_layer, teacher_layer), ...]``: the keys under which the
            hidden states / Q-K projections are passed to ``forward`` (e.g. the
            0-based indices captured by :class:`toolkit.models.capture.QKVCapture`).
        student_heads: student attention heads (needed for the attention term).
        teacher_heads: teacher attention heads (must equal ``student_heads``).
    """

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int,
                 layer_pairs: Sequence[Tuple[int, int]], student_heads: Optional[int] = None,
                 teacher_heads: Optional[int] = None):
        super().__init__()
        pairs = [tuple(p) for p in layer_pairs]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ConfigError("layer_pairs", f"must be a non-empty list of [student_layer, teacher_layer] pairs, "
                              f"got {list(layer_pairs)!r}")
        if (student_heads is None) != (teacher_heads is None) or (
                student_heads is not None and student_heads != teacher_heads):
            raise ConfigError("num_attention_heads",
                              f"TinyBERT's attention loss compares heads one to one: student heads "
                              f"({student_heads}) must equal teacher heads ({teacher_heads})")
        self.layer_pairs = pairs
        self.num_heads = student_heads
        self.projections = nn.ModuleList(nn.Linear(student_hidden_size, teacher_hidden_size) for _ in pairs)

    def forward(self, student_hidden: Mapping[int, Tensor], teacher_hidden: Mapping[int, Tensor],
                attention_mask: Tensor,
                student_qk: Optional[Mapping[int, Mapping[str, Tensor]]] = None,
                teacher_qk: Optional[Mapping[int, Mapping[str, Tensor]]] = None) -> Dict[str, Tensor]:
        """Args:
            student_hidden: layer -> hidden state ``[B, L, Hs]``.
            teacher_hidden: layer -> hidden state ``[B, L, Ht]`` (no gradient).
            attention_mask: ``[B, L]``, 1 for real tokens.
            student_qk, teacher_qk: layer -> ``{"q", "k"}`` ``[B, L, H]``; when both given the
                attention-score term is added.

        Returns:
            ``{"loss": hidden + attn, "hidden": scalar, "attn": scalar}``.
        """
        valid = attention_mask.to(torch.bool)                                  # [B, L]
        n_tok = valid.sum().clamp_min(1)
        hidden = attention_mask.new_zeros((), dtype=torch.float32)
        for proj, (s_layer, t_layer) in zip(self.projections, self.layer_pairs):
            s, t = self._get(student_hidden, s_layer, "student hidden"), self._get(teacher_hidden, t_layer,
                                                                                    "teacher hidden")
            diff = proj(s).float() - t.detach().float()                        # [B, L, Ht]
            sq = (diff ** 2).masked_fill(~valid[..., None], 0.0)
            hidden = hidden + sq.sum() / (n_tok * diff.shape[-1])
        attn = torch.zeros_like(hidden)
        if student_qk is not None and teacher_qk is not None:
            if self.num_heads is None:
                raise ConfigError("num_attention_heads", "the attention-score loss needs student_heads and "
                                  "teacher_heads")
            pair_ok = valid[:, None, :, None] & valid[:, None, None, :]       # [B, 1, L, L]
            n_pairs = pair_ok.sum().clamp_min(1) * self.num_heads
            for s_layer, t_layer in self.layer_pairs:
                s = self._get(student_qk, s_layer, "student q/k")
                t = self._get(teacher_qk, t_layer, "teacher q/k")
                diff = _scores(s["q"], s["k"], self.num_heads) - _scores(t["q"].detach(), t["k"].detach(),
                                                                         self.num_heads)
                attn = attn + (diff ** 2).masked_fill(~pair_ok, 0.0).sum() / n_pairs
        return {"loss": hidden + attn, "hidden": hidden, "attn": attn}

    @staticmethod
    def _get(store: Mapping, layer: int, what: str):
        if layer not in store:
            raise ToolkitError(f"TinyBERT loss: no {what} captured for layer {layer}; captured layers: "
                               f"{sorted(store)}")
        return store[layer]
