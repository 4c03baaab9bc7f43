"""Task heads keyed by task type (:data:`HEADS`).

Every head has ``forward(sequence_output, pooled_output, **batch) -> logits`` and
``loss(logits, labels, **batch) -> scalar``. ``sequence_output`` is ``[N, L, H]`` and
``pooled_output`` ``[N, H]`` (the encoder's pooler), where ``N = B`` except for multiple
choice, whose ``[B, C, L]`` inputs the model flattens to ``N = B * C``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Type

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.errors import ConfigError
from toolkit.tasks.base import CLASSIFICATION, MULTIPLE_CHOICE, REGRESSION, SPAN, TOKEN_CLASSIFICATION

HEADS: Dict[str, Type["TaskHead"]] = {}

# Finite (not finfo.min) so logit-KD and MSE on masked choices stay finite in fp16/bf16 too.
MASKED_CHOICE_LOGIT = -1e4


def register_head(task_type: str) -> Callable[[Type["TaskHead"]], Type["TaskHead"]]:
    """Class decorator: make a head constructible by :func:`build_head` for ``task_type``."""

    def wrap(cls: Type["TaskHead"]) -> Type["TaskHead"]:
        HEADS[task_type] = cls
        cls.task_type = task_type
        return cls

    return wrap


class TaskHead(nn.Module):
    """Base head: a dropout and one linear layer ``hidden_size -> out_features``."""

    task_type: str = ""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1,
                 initializer_range: float = 0.02):
        super().__init__()
        self.num_labels = num_labels
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, self.out_features(num_labels))
        nn.init.normal_(self.classifier.weight, std=initializer_range)
        nn.init.zeros_(self.classifier.bias)

    @staticmethod
    def out_features(num_labels: int) -> int:
        return num_labels

    def forward(self, sequence_output: torch.Tensor, pooled_output: torch.Tensor, **batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **batch: Any) -> torch.Tensor:
        raise NotImplementedError


@register_head(CLASSIFICATION)
class ClassificationHead(TaskHead):
    """Pooled output -> ``[B, num_labels]`` logits; cross-entropy on label ids ``[B]``."""

    def forward(self, sequence_output: torch.Tensor, pooled_output: torch.Tensor, **batch: Any) -> torch.Tensor:
        return self.classifier(self.dropout(pooled_output))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **batch: Any) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels.long().view(-1))


@register_head(REGRESSION)
class RegressionHead(TaskHead):
    """Pooled output -> ``[B]`` scores; MSE against float labels ``[B]``."""

    @staticmethod
    def out_features(num_labels: int) -> int:
        return 1

    def forward(self, sequence_output: torch.Tensor, pooled_output: torch.Tensor, **batch: Any) -> torch.Tensor:
        return self.classifier(self.dropout(pooled_output)).squeeze(-1)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **batch: Any) -> torch.Tensor:
        return F.mse_loss(logits.float().view(-1), labels.float().view(-1))


@register_head(SPAN)
class SpanHead(TaskHead):
    """Every token -> ``[B, L, 2]`` (start, end) logits; labels ``[B, 2]`` token positions.

    Loss: mean of start and end cross-entropy. Positions outside the sequence (e.g. an
    answer truncated away) are clamped to ``L`` and ignored, as in ``transformers``.
    """

    @staticmethod
    def out_features(num_labels: int) -> int:
        return 2

    def forward(self, sequence_output: torch.Tensor, pooled_output: torch.Tensor, **batch: Any) -> torch.Tensor:
        # No dropout: extractive QA heads in BERT/ERNIE reference code use none.
        return self.classifier(sequence_output)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **batch: Any) -> torch.Tensor:
        seq_len = logits.size(1)
        labels = labels.long().view(-1, 2).clamp(0, seq_len)
        start = F.cross_entropy(logits[..., 0].float(), labels[:, 0], ignore_index=seq_len)
        end = F.cross_entropy(logits[..., 1].float(), labels[:, 1], ignore_index=seq_len)
        return (start + end) / 2


@register_head(TOKEN_CLASSIFICATION)
class TokenClassificationHead(TaskHead):
    """Every token -> ``[B, L, num_labels]``; cross-entropy on ``[B, L]`` ids, -100 ignored."""

    def forward(self, sequence_output: torch.Tensor, pooled_output: torch.Tensor, **batch: Any) -> torch.Tensor:
        return self.classifier(self.dropout(sequence_output))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **batch: Any) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), labels.long().reshape(-1),
                               ignore_index=-100)


@register_head(MULTIPLE_CHOICE)
class MultipleChoiceHead(TaskHead):
    """Pooled ``[B*C, H]`` -> one score per choice, ``[B, C]`` logits; cross-entropy on ``[B]``.

    ``batch`` must carry ``num_choices`` (C) or ``choice_mask`` ``[B, C]`` (1 = real choice);
    padded choices get :data:`MASKED_CHOICE_LOGIT`.
    """

    @staticmethod
    def out_features(num_labels: int) -> int:
        return 1

    def forward(self, sequence_output: torch.Tensor, pooled_output: torch.Tensor,
                choice_mask: Optional[torch.Tensor] = None, num_choices: Optional[int] = None,
                **batch: Any) -> torch.Tensor:
        if num_choices is None:
            if choice_mask is None:
                raise ValueError("multiple choice head needs num_choices or choice_mask")
            num_choices = choice_mask.size(-1)
        logits = self.classifier(self.dropout(pooled_output)).view(-1, num_choices)
        if choice_mask is not None:
            logits = logits.masked_fill(~choice_mask.bool(), MASKED_CHOICE_LOGIT)
        return logits

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, **batch: Any) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels.long().view(-1))


def build_head(task_type: str, hidden_size: int, num_labels: int, dropout: float = 0.1,
               initializer_range: float = 0.02) -> TaskHead:
    """Construct the head registered for ``task_type``."""
    if task_type not in HEADS:
        raise ConfigError("task_type", f"no head for task type {task_type!r}; known: {sorted(HEADS)}")
    if task_type in (CLASSIFICATION, TOKEN_CLASSIFICATION) and num_labels < 1:
        raise ConfigError("num_labels", f"a {task_type} head needs at least one label, got {num_labels}")
    return HEADS[task_type](hidden_size, num_labels, dropout=dropout, initializer_range=initializer_range)
