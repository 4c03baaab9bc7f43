"""Temperature-scaled logit distillation (e.g. MLM head logits of a teacher)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from toolkit.errors import ConfigError, ToolkitError


class LogitKDLoss(nn.Module):
    """``KL(softmax(t/T) || softmax(s/T)) * T^2``, averaged over the selected positions.

    Args:
        temperature: T > 0. The ``T^2`` factor keeps gradient scale independent of T.
    """

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError("temperature", f"must be a positive number, got {temperature!r}")
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor,
                mask: Optional[Tensor] = None) -> Tensor:
        """Args:
            student_logits: ``[..., V]`` (e.g. ``[B, L, V]``).
            teacher_logits: ``[..., V]``, same shape (no gradient).
            mask: ``[...]`` (e.g. ``[B, L]``) bool/0-1 selecting positions (e.g. the masked
                MLM tokens); None = all positions.

        Returns:
            Scalar fp32 (0 when no position is selected).
        """
        if student_logits.shape != teacher_logits.shape:
            raise ToolkitError(f"logit KD: student logits {tuple(student_logits.shape)} and teacher logits "
                               f"{tuple(teacher_logits.shape)} differ; teacher and student need the same vocabulary")
        if mask is not None and tuple(mask.shape) != tuple(student_logits.shape[:-1]):
            raise ToolkitError(f"logit KD: mask {tuple(mask.shape)} must match logits without the vocab dim "
                               f"{tuple(student_logits.shape[:-1])}")
        v = student_logits.shape[-1]
        s = student_logits.reshape(-1, v)
        t = teacher_logits.detach().reshape(-1, v)
        if mask is not None:
            keep = mask.reshape(-1).to(torch.bool)
            s, t = s[keep], t[keep]
        if s.shape[0] == 0:
            return student_logits.sum() * 0.0
        temp = self.temperature
        cdt = torch.promote_types(s.dtype, torch.float32)
        logp_s = torch.log_softmax(s.to(cdt) / temp, dim=-1)
        t_scaled = t.to(cdt) / temp
        logp_t = torch.log_softmax(t_scaled, dim=-1)
        # softmax rather than logp_t.exp(): torch's CPU exp takes a slow path on the large negative
        # log-probabilities of a vocabulary's unlikely entries.
        kl = torch.linalg.vecdot(torch.softmax(t_scaled, dim=-1), logp_t - logp_s)
        return kl.mean() * temp ** 2
