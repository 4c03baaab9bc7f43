"""Temperature-scaled logit distillation (e.g. MLM head logits of a teacher)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from toolkit.config import arg
from toolkit.errors import ConfigError, ToolkitError
from toolkit.losses.registry import DistillInputs, DistillLoss, LossContext, Needs, register_loss


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


def student_mlm_head(student: nn.Module) -> nn.Module:
    """A fresh BERT MLM head for ``student`` whose decoder is tied to its word embeddings (as BERT's)."""
    from transformers.models.bert.modeling_bert import BertOnlyMLMHead

    head = BertOnlyMLMHead(student.config)
    head.predictions.decoder.weight = student.embeddings.word_embeddings.weight
    return head


@register_loss("logit_kd")
class LogitKD(DistillLoss):
    """MLM-logit distillation on masked input: the teacher's full-depth MLM head against a student
    MLM head (tied to the student's word embeddings, trained with it) on the student's last layer.
    The teacher directory must hold an MLM head (``cls.predictions``)."""

    @dataclass
    class Options:
        temperature: float = arg(1.0, "softmax temperature T (the loss is scaled by T^2)")

    def __init__(self, options: "LogitKD.Options", ctx: LossContext):
        super().__init__(options, ctx)
        try:
            self.kd = LogitKDLoss(options.temperature)
        except ConfigError as e:
            raise ConfigError(f"{ctx.field}.temperature", e.message) from None
        if ctx.student is None:
            raise ToolkitError("logit_kd needs the student encoder to tie its MLM head to")
        if ctx.student_config.vocab_size != ctx.teacher_config.vocab_size:
            raise ConfigError(ctx.field, f"logit KD needs one vocabulary: the student has "
                              f"{ctx.student_config.vocab_size} tokens, the teacher {ctx.teacher_config.vocab_size}")
        self.mlm_head = student_mlm_head(ctx.student)
        self.last = ctx.student_config.num_hidden_layers - 1

    def needs(self) -> Needs:
        return Needs(student={self.last: {"hidden"}}, mlm=True)

    def forward(self, inputs: DistillInputs) -> Dict[str, Tensor]:
        logits = self.mlm_head(inputs.student[self.last]["hidden"])
        return {"loss": self.kd(logits, inputs.teacher_logits, inputs.mlm_mask)}
