"""Every head: logits shapes and losses against hand-computed references."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from toolkit.errors import ConfigError
from toolkit.models.heads import HEADS, MASKED_CHOICE_LOGIT, build_head
from toolkit.tasks.base import TASK_TYPES

B, L, H = 3, 5, 8


@pytest.fixture
def outs():
    torch.manual_seed(0)
    return torch.randn(B, L, H), torch.randn(B, H)


def test_registry_covers_every_task_type():
    assert set(HEADS) == set(TASK_TYPES)
    with pytest.raises(ConfigError):
        build_head("ranking", H, 2)


def test_classification(outs):
    head = build_head("classification", H, 4).eval()
    logits = head(*outs)
    assert logits.shape == (B, 4)
    labels = torch.tensor([0, 3, 1])
    torch.testing.assert_close(head.loss(logits, labels), F.cross_entropy(logits, labels))
    # pooled output drives it, not the sequence
    torch.testing.assert_close(head(torch.zeros(B, L, H), outs[1]), logits)


def test_regression(outs):
    head = build_head("regression", H, 1).eval()
    logits = head(*outs)
    assert logits.shape == (B,)
    y = torch.tensor([0.5, 1.0, 4.0])
    torch.testing.assert_close(head.loss(logits, y), ((logits - y) ** 2).mean())


def test_span_ignores_out_of_range(outs):
    head = build_head("span", H, 2)
    logits = head(*outs)
    assert logits.shape == (B, L, 2)
    labels = torch.tensor([[1, 2], [0, 0], [7, 9]])  # last one is outside the sequence -> ignored
    expect = (F.cross_entropy(logits[:2, :, 0], labels[:2, 0]) + F.cross_entropy(logits[:2, :, 1], labels[:2, 1])) / 2
    torch.testing.assert_close(head.loss(logits, labels), expect)


def test_token_classification(outs):
    head = build_head("token_classification", H, 3).eval()
    logits = head(*outs)
    assert logits.shape == (B, L, 3)
    labels = torch.full((B, L), -100)
    labels[0, 1], labels[2, 3] = 2, 0
    expect = F.cross_entropy(torch.stack([logits[0, 1], logits[2, 3]]), torch.tensor([2, 0]))
    torch.testing.assert_close(head.loss(logits, labels), expect)


def test_multiple_choice_with_mask():
    torch.manual_seed(0)
    C = 4
    head = build_head("multiple_choice", H, 1).eval()
    pooled = torch.randn(B * C, H)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    logits = head(torch.randn(B * C, L, H), pooled, choice_mask=mask)
    assert logits.shape == (B, C)
    assert (logits[mask == 0] == MASKED_CHOICE_LOGIT).all()
    unmasked = head(None, pooled, num_choices=C)
    torch.testing.assert_close(logits[mask == 1], unmasked[mask == 1])
    labels = torch.tensor([3, 1, 0])
    loss = head.loss(logits, labels)
    # masked choices carry no probability mass: same loss as CE over only the real choices
    ref = torch.stack([F.cross_entropy(unmasked[i, :int(mask[i].sum())][None], labels[i:i + 1]) for i in range(B)]).mean()
    torch.testing.assert_close(loss, ref)
