"""MiniLM v1, TinyBERT and logit KD against small direct computations."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from toolkit.errors import ConfigError
from toolkit.losses import LogitKDLoss, MiniLMv1Loss, TinyBERTLoss


def _qkv(b, l, h, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(b, l, h, generator=g, dtype=torch.float64) for k in "qkv"}


MASK = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])


def _heads(x, a):
    b, l, h = x.shape
    return x.view(b, l, a, h // a).transpose(1, 2)


def _direct_kl(tq, tk, sq, sk, a):
    """Loop over (batch, head, real query) rows with F.kl_div on the real keys only."""
    total, n = 0.0, 0
    for bi in range(MASK.shape[0]):
        real = int(MASK[bi].sum())
        for h in range(a):
            def probs(q, k):
                qh, kh = _heads(q, a)[bi, h, :real], _heads(k, a)[bi, h, :real]
                return torch.softmax(qh @ kh.T / qh.shape[-1] ** 0.5, dim=-1)
            pt, ps = probs(tq, tk), probs(sq, sk)
            total += F.kl_div(ps.log(), pt, reduction="sum").item()
            n += real
    return total / n


def test_minilm_v1_matches_direct_loop():
    student, teacher = _qkv(2, 5, 8, 0), _qkv(2, 5, 12, 1)   # same 2 heads, head widths 4 vs 6
    out = MiniLMv1Loss(2, 2, chunk_size=2)(student, teacher, MASK)
    attn = _direct_kl(teacher["q"], teacher["k"], student["q"], student["k"], 2)
    vv = _direct_kl(teacher["v"], teacher["v"], student["v"], student["v"], 2)
    assert out["attn"].item() == pytest.approx(attn, rel=1e-9)
    assert out["vv"].item() == pytest.approx(vv, rel=1e-9)
    assert out["loss"].item() == pytest.approx(attn + vv, rel=1e-9)


def test_minilm_v1_needs_equal_heads():
    with pytest.raises(ConfigError, match="num_attention_heads"):
        MiniLMv1Loss(4, 6)


def test_tinybert_matches_direct_computation():
    torch.manual_seed(0)
    s_hidden = {0: torch.randn(2, 5, 8), 1: torch.randn(2, 5, 8)}
    t_hidden = {1: torch.randn(2, 5, 12), 3: torch.randn(2, 5, 12)}
    s_qk = {0: {"q": torch.randn(2, 5, 8), "k": torch.randn(2, 5, 8)},
            1: {"q": torch.randn(2, 5, 8), "k": torch.randn(2, 5, 8)}}
    t_qk = {1: {"q": torch.randn(2, 5, 12), "k": torch.randn(2, 5, 12)},
            3: {"q": torch.randn(2, 5, 12), "k": torch.randn(2, 5, 12)}}
    pairs = [(0, 1), (1, 3)]
    loss = TinyBERTLoss(8, 12, pairs, student_heads=2, teacher_heads=2)
    out = loss(s_hidden, t_hidden, MASK, s_qk, t_qk)
    hidden = attn = 0.0
    for proj, (sl, tl) in zip(loss.projections, pairs):
        for bi in range(2):
            real = int(MASK[bi].sum())
            # per-layer mean over all real tokens of the batch: accumulate sums, divide below
            hidden += ((proj(s_hidden[sl][bi, :real]) - t_hidden[tl][bi, :real]) ** 2).sum().item() / (8 * 12)
            for h in range(2):
                def scores(q, k):
                    qh, kh = _heads(q, 2)[bi, h, :real], _heads(k, 2)[bi, h, :real]
                    return qh @ kh.T / qh.shape[-1] ** 0.5
                diff = scores(s_qk[sl]["q"], s_qk[sl]["k"]) - scores(t_qk[tl]["q"], t_qk[tl]["k"])
                attn += (diff ** 2).sum().item() / (2 * (25 + 9))
    assert out["hidden"].item() == pytest.approx(hidden, rel=1e-5)
    assert out["attn"].item() == pytest.approx(attn, rel=1e-5)
    out["loss"].backward()
    assert loss.projections[0].weight.grad is not None


def test_tinybert_hidden_only_and_errors():
    loss = TinyBERTLoss(4, 4, [(0, 0)])
    x = torch.randn(2, 5, 4)
    loss.projections[0].weight.data.copy_(torch.eye(4))
    loss.projections[0].bias.data.zero_()
    out = loss({0: x}, {0: x.clone()}, MASK)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        TinyBERTLoss(4, 4, [(0, 0)], student_heads=2, teacher_heads=4)
    with pytest.raises(ConfigError, match="layer_pairs"):
        TinyBERTLoss(4, 4, [])


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_logit_kd_matches_direct_and_masks(temperature):
    torch.manual_seed(1)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    sel = torch.tensor([[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    got = LogitKDLoss(temperature)(s, t, sel)
    T = temperature
    rows = [F.kl_div(F.log_softmax(s[i, j] / T, -1), F.softmax(t[i, j] / T, -1), reduction="sum")
            for i, j in sel.nonzero().tolist()]
    assert got.item() == pytest.approx((torch.stack(rows).mean() * T * T).item(), rel=1e-5)
    # Changing unselected positions changes nothing; identical logits give 0.
    s2 = s.clone()
    s2[~sel] = 100.0
    assert LogitKDLoss(temperature)(s2, t, sel).item() == pytest.approx(got.item(), rel=1e-6)
    assert LogitKDLoss(temperature)(t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_logit_kd_bad_temperature():
    with pytest.raises(ConfigError, match="temperature"):
        LogitKDLoss(0.0)
