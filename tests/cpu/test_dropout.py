"""FastDropout (toolkit/models/dropout.py): rate, scaling, gradient, reproducibility, swapping."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.models.dropout import FastDropout, fast_dropout, keep_mask, keep_threshold, use_fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_keep_rate_and_expectation(p):
    torch.manual_seed(0)
    n = 2_000_000
    y = fast_dropout(torch.ones(n), p)
    p_eff = keep_threshold(p) / 2 ** 15
    assert abs(p_eff - p) <= 2 ** -16
    kept = y != 0
    # 6 binomial standard deviations: a wrong rate or a biased half of the word fails by far more.
    tol = 6 * (p_eff * (1 - p_eff) / n) ** 0.5
    assert abs(1 - kept.float().mean().item() - p_eff) < tol
    # Kept elements carry exactly 1 / (1 - p_eff), so the expectation of the output is the input.
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / (1 - p_eff)), rtol=1e-6, atol=0)
    # The two 15-bit halves of each 32-bit word are used for neighbouring elements; both must
    # drop at the same rate and independently of each other.
    even, odd = kept[0::2].float(), kept[1::2].float()
    assert abs(even.mean().item() - odd.mean().item()) < 2 * tol
    corr = ((even - even.mean()) * (odd - odd.mean())).mean() / (even.std() * odd.std())
    assert abs(corr.item()) < 0.01


def test_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(1)
    x = torch.randn(64, 33, dtype=torch.float64, requires_grad=True)   # odd element count
    y = fast_dropout(x, 0.2)
    g = torch.randn_like(y)
    y.backward(g)
    factor = torch.where(y != 0, y / x.detach(), torch.zeros_like(y))
    assert torch.allclose(x.grad, g * factor)
    assert set(torch.unique(factor.round(decimals=6)).tolist()) <= {0.0, round(1 / (1 - keep_threshold(0.2) / 2 ** 15), 6)}

    def seeded(t):   # the same mask on every call, so finite differences see a fixed function
        torch.manual_seed(3)
        return fast_dropout(t, 0.3)

    assert torch.autograd.gradcheck(seeded, (torch.randn(5, 7, dtype=torch.float64, requires_grad=True),))


def test_seeded_and_replayable():
    torch.manual_seed(5)
    a = keep_mask(torch.Size([4, 100]), 0.1)
    state = torch.get_rng_state()
    b = keep_mask(torch.Size([4, 100]), 0.1)
    torch.manual_seed(5)
    assert torch.equal(keep_mask(torch.Size([4, 100]), 0.1), a)
    torch.set_rng_state(state)
    assert torch.equal(keep_mask(torch.Size([4, 100]), 0.1), b)
    assert not torch.equal(a, b)


def test_module_eval_zero_and_one():
    x = torch.randn(10, 10)
    m = FastDropout(0.5).eval()
    assert torch.equal(m(x), x)
    assert torch.equal(fast_dropout(x, 0.0), x)
    assert torch.count_nonzero(fast_dropout(x, 1.0)) == 0
    assert torch.equal(fast_dropout(x, 1e-6), x)   # rounds to a zero drop rate: identity
    assert torch.count_nonzero(fast_dropout(x, 1 - 1e-6)) == 0   # rounds to a drop rate of 1


def test_use_fast_dropout_swaps_plain_dropout_only():
    from transformers import BertConfig, BertModel

    cfg = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0)
    model = BertModel(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = sum(type(m) is nn.Dropout for m in model.modules())
    assert use_fast_dropout(model) == plain > 0
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert use_fast_dropout(model) == 0                      # idempotent
    ps = {m.p for m in model.modules() if isinstance(m, FastDropout)}
    assert ps == {0.1, 0.0}                                   # rates kept (attention dropout 0.0 too)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    model.train()
    ids = torch.randint(0, 50, (2, 8))
    torch.manual_seed(0)
    a = model(ids).last_hidden_state
    torch.manual_seed(0)
    assert torch.equal(model(ids).last_hidden_state, a)
