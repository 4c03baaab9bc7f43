"""The compiled CPU relation KL (toolkit/cpu/relation.py): it builds here, the loss and the
student gradients match the float64 reference (padding, relation heads, head sizes that differ
between teacher and student and are not multiples of 32, the query/key form); registered as
``cpu_fused`` it is what ``auto`` runs for fp32 CPU tensors and gives the chunked path's numbers,
and every fallback."""
from __future__ import annotations

import pytest
import torch

from toolkit.cpu import relation as cpu_relation
from toolkit.losses import relation_kl as registry
from toolkit.losses.reference import relation_kl_reference
from toolkit.losses.relation_kl.chunked import relation_kl_qk


@pytest.fixture
def kernel(compiled_checks):
    return compiled_checks.loaded(cpu_relation)


def _inputs(b, l, ht, hs, seed=0, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(b, l, ht, generator=gen)
    s = (t[..., :hs] if hs <= ht else torch.randn(b, l, hs, generator=gen)) + 0.5 * torch.randn(b, l, hs, generator=gen)
    mask = torch.ones(b, l, dtype=torch.long)
    if lengths is not None:
        mask = (torch.arange(l)[None, :] < torch.tensor(lengths)[:, None]).long()
    return t, s, mask


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def test_builds_on_a_linux_host_with_a_c_compiler(compiled_checks):
    compiled_checks.builds(cpu_relation, "relation_kl_fused-")


@pytest.mark.parametrize("b,l,ht,hs,heads,lengths", [
    (2, 37, 48, 32, 4, [37, 20]),      # head sizes 12 and 8, ragged padding
    (3, 1, 32, 32, 1, None),           # one token
    (2, 70, 96, 64, 2, [70, 33]),      # head sizes 48 and 32 (two column tiles), L past 64
    (1, 128, 384, 384, 12, None),      # the MiniLM shapes
    (2, 9, 52, 78, 2, [9, 4]),         # head sizes 26 (ERNIE 3.0 Tiny) and 39
])
def test_loss_and_gradient_match_float64(kernel, b, l, ht, hs, heads, lengths):
    t, s, mask = _inputs(b, l, ht, hs, lengths=lengths)
    valid = mask.bool()
    key_valid = None if lengths is None else valid.to(torch.uint8)
    row_kl, d_q, d_k = kernel.forward(t, t, s, s, key_valid, heads, True, True)
    assert d_k is None and d_q.shape == s.shape                 # one tensor on both sides: one gradient
    n_rows = valid.sum() * heads
    s64 = s.double().requires_grad_(True)
    want = relation_kl_reference(t.double(), s64, mask, heads)
    want.backward()
    want = want.detach()
    assert abs(float(row_kl.sum() / n_rows) - float(want)) <= 1e-5 * abs(float(want))
    assert _rel(d_q / n_rows, s64.grad) < 1e-5
    assert torch.all(row_kl[~valid[:, None, :].expand_as(row_kl)] == 0)
    assert torch.all(d_q[~valid] == 0)                          # padded rows get no gradient


def test_query_key_form_matches_the_chunked_path_in_float64(kernel):
    """Different query- and key-side tensors (both gradients), against the chunked path in float64."""
    gen = torch.Generator().manual_seed(1)
    t_q, t_k = torch.randn(2, 21, 40, generator=gen), torch.randn(2, 21, 40, generator=gen)
    s_q, s_k = torch.randn(2, 21, 24, generator=gen), torch.randn(2, 21, 24, generator=gen)
    mask = (torch.arange(21)[None, :] < torch.tensor([21, 12])[:, None]).long()
    row_kl, d_q, d_k = kernel.forward(t_q, t_k, s_q, s_k, mask.to(torch.uint8), 4, True, True)
    n_rows = mask.sum() * 4
    q64, k64 = s_q.double().requires_grad_(True), s_k.double().requires_grad_(True)
    want = relation_kl_qk(t_q.double(), t_k.double(), q64, k64, mask, 4)
    want.backward()
    want = want.detach()
    assert abs(float(row_kl.sum() / n_rows) - float(want)) <= 1e-5 * abs(float(want))
    assert _rel(d_q / n_rows, q64.grad) < 1e-5 and _rel(d_k / n_rows, k64.grad) < 1e-5
    _, only_q, none_k = kernel.forward(t_q, t_k, s_q, s_k, mask.to(torch.uint8), 4, True, False)
    assert none_k is None and torch.allclose(only_q, d_q)
    rows_only, no_q, no_k = kernel.forward(t_q, t_k, s_q, s_k, mask.to(torch.uint8), 4, False, False)
    assert no_q is None and no_k is None and torch.allclose(rows_only, row_kl)


def test_a_fully_padded_sample_stays_finite(kernel):
    t, s, mask = _inputs(2, 10, 16, 16, lengths=[10, 0])
    row_kl, d_q, _ = kernel.forward(t, t, s, s, mask.to(torch.uint8), 2, True, True)
    assert torch.isfinite(row_kl).all() and torch.isfinite(d_q).all()
    assert torch.all(row_kl[1] == 0) and torch.all(d_q[1] == 0)


def test_registered_it_is_what_auto_runs_and_agrees_with_the_chunked_path(kernel, monkeypatch):
    """After register(), ``auto`` on fp32 CPU tensors runs the kernel (counted) and the chunked path
    gives the same loss and gradient to fp32 rounding; float64 tensors stay on the chunked path.
    Strided (non-contiguous) projections too."""
    assert "cpu_fused" not in registry.relation_kl_names()
    assert cpu_relation.register() and "cpu_fused" in registry.relation_kl_names()
    calls = []
    real = cpu_relation.RelationKernel.forward
    monkeypatch.setattr(cpu_relation.RelationKernel, "forward",
                        lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    t, s, mask = _inputs(3, 33, 64, 48, seed=2, lengths=[33, 30, 5])
    wide = torch.randn(3, 33, 80)
    wide[..., 10:58] = s
    results = []
    for impl in ("auto", "chunked"):
        for strided in (False, True):
            x = (wide.detach().clone()[..., 10:58] if strided else s.detach().clone()).requires_grad_(True)
            loss = registry.compute_relation_kl(impl, t, t, x, x, mask, 4)
            loss.backward()
            results.append((float(loss.detach()), x.grad.clone()))
    assert len(calls) == 2
    ref_loss, ref_grad = results[2]
    for loss, grad in results:
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss) and _rel(grad, ref_grad.double()) < 1e-5
    assert registry.resolve_relation_kl("auto", t, t, s, s) == "cpu_fused"
    assert registry.resolve_relation_kl("auto", t.double(), t.double(), s.double(), s.double()) == "chunked"
    assert registry.describe_relation_kl("auto", torch.device("cpu"), 3, 4, 33).startswith("cpu_fused")
    with pytest.raises(ValueError, match="fp32 CPU"):
        cpu_relation.relation_kl_fused(t.double(), t.double(), s.double(), s.double(), mask, 4)


def test_bad_input_is_refused_with_a_message(kernel):
    t, s, _ = _inputs(2, 5, 16, 16)
    with pytest.raises(ValueError, match="fp32 CPU"):
        kernel.forward(t.double(), t.double(), s, s, None, 2, True, True)
    with pytest.raises(ValueError, match="relation heads"):
        kernel.forward(t, t, s, s, None, 3, True, True)
    with pytest.raises(ValueError, match="key_valid"):
        kernel.forward(t, t, s, s, torch.ones(2, 5, dtype=torch.bool), 2, True, True)


def test_no_compiler_means_no_registration_and_the_chunked_path(compiled_checks):
    compiled_checks.no_compiler_and_disabled(cpu_relation)
    assert not cpu_relation.register() and "cpu_fused" not in registry.relation_kl_names()
    t, s, mask = _inputs(2, 12, 16, 16, lengths=[12, 7])
    assert registry.resolve_relation_kl("auto", t, t, s, s) == "chunked"
    want = float(relation_kl_reference(t, s, mask, 2))
    assert abs(float(registry.compute_relation_kl("auto", t, t, s, s, mask, 2)) - want) <= 1e-5 * abs(want)


def test_a_wrong_build_is_caught_by_the_self_check(compiled_checks):
    compiled_checks.wrong_build_is_caught(cpu_relation, 'klb[i] = relkl_row(ar, sr, L, kv, &st, &ss);',
                                          'klb[i] = 1.001f * relkl_row(ar, sr, L, kv, &st, &ss);')
