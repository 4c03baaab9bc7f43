"""The compiled CPU weight-gradient kernel (toolkit/kernels/cpu_wgrad.py): it builds here, dW and
db match float64 for ragged shapes, strides, thread counts and token counts, the oneDNN linear's
backward gives F.linear's gradients with it, and every fallback."""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from toolkit.kernels import cpu_wgrad
from toolkit.models import onednn


@pytest.fixture
def kernel(compiled_checks):
    return compiled_checks.loaded(cpu_wgrad)


def test_builds_on_a_linux_host_with_a_c_compiler(compiled_checks):
    compiled_checks.builds(cpu_wgrad, "wgrad-")


@pytest.mark.parametrize("tokens", [1, 63, 64, 129, 300, 777])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matches_float64_for_ragged_shapes(kernel, tokens, threads):
    """Rows past a multiple of 8, columns past a multiple of 32, tokens past a block (256) and a
    thread's share, token counts too small to split among the threads."""
    gen = torch.Generator().manual_seed(tokens * 10 + threads)
    for m, n in ((1, 1), (8, 32), (13, 33), (40, 70), (7, 100)):
        grad, x = torch.randn(tokens, m, generator=gen), torch.randn(tokens, n, generator=gen)
        dw, db = kernel.weight_grad(grad, x, True, threads=threads)
        want_w, want_b = cpu_wgrad.reference(grad, x)
        assert dw.shape == (m, n) and db.shape == (m,)
        assert cpu_wgrad.max_rel_error(dw, want_w) < 1e-5, (m, n)
        assert cpu_wgrad.max_rel_error(db, want_b) < 1e-5, (m, n)
        dw2, none = kernel.weight_grad(grad, x, False, threads=threads)
        assert none is None and torch.equal(dw2, dw)


def test_many_tokens_stay_accurate(kernel):
    """20k tokens (blocked sums, two threads' partials) within 1e-5 of float64."""
    gen = torch.Generator().manual_seed(1)
    grad, x = torch.randn(20000, 48, generator=gen), torch.randn(20000, 96, generator=gen) + 0.5
    dw, db = kernel.weight_grad(grad, x, True, threads=2)
    want_w, want_b = cpu_wgrad.reference(grad, x)
    assert cpu_wgrad.max_rel_error(dw, want_w) < 1e-5 and cpu_wgrad.max_rel_error(db, want_b) < 1e-5


def test_batched_and_strided_inputs(kernel):
    """[B, L, H] activations, a dY that is a column slice of a wider tensor (row stride > M), and
    an x whose feature stride is not 1 (copied first)."""
    gen = torch.Generator().manual_seed(2)
    wide = torch.randn(3, 50, 29, generator=gen)
    grad = wide[..., 3:20]                                   # [3, 50, 17], row stride 29
    x = torch.randn(3, 24, 50, generator=gen).transpose(1, 2)  # [3, 50, 24], feature stride 50
    dw, db = kernel.weight_grad(grad, x, True)
    want_w, want_b = cpu_wgrad.reference(grad, x.contiguous())
    assert cpu_wgrad.max_rel_error(dw, want_w) < 1e-5 and cpu_wgrad.max_rel_error(db, want_b) < 1e-5


def test_no_tokens_gives_zeros(kernel):
    dw, db = kernel.weight_grad(torch.empty(0, 5), torch.empty(0, 40), True)
    assert torch.equal(dw, torch.zeros(5, 40)) and torch.equal(db, torch.zeros(5))


def test_bad_input_is_refused_with_a_message(kernel):
    with pytest.raises(ValueError, match="fp32 CPU"):
        kernel.weight_grad(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 5), True)
    with pytest.raises(ValueError, match="rows"):
        kernel.weight_grad(torch.randn(4, 3), torch.randn(6, 5), True)


@pytest.mark.parametrize("bias", [True, False])
def test_the_onednn_linear_backward_uses_it_and_matches_f_linear(kernel, monkeypatch, bias):
    """A switched nn.Linear: input, weight and bias gradients as F.linear's in float64, through the
    kernel (counted); a frozen weight never calls it."""
    if onednn.onednn_unavailable_reason() is not None:
        pytest.skip(onednn.onednn_unavailable_reason())
    calls = []
    real = cpu_wgrad.WgradKernel.weight_grad
    monkeypatch.setattr(cpu_wgrad.WgradKernel, "weight_grad", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    torch.manual_seed(0)
    layer = torch.nn.Linear(40, 24, bias=bias)
    ref = torch.nn.Linear(40, 24, bias=bias).double()
    ref.load_state_dict(layer.state_dict())
    assert onednn.use_onednn_linears(layer, trainable=True) == 1
    x = torch.randn(3, 70, 40, requires_grad=True)
    xd = x.detach().double().requires_grad_(True)
    g = torch.randn(3, 70, 24)
    layer(x).backward(g)
    ref(xd).backward(g.double())
    assert len(calls) == 1
    assert cpu_wgrad.max_rel_error(layer.weight.grad, ref.weight.grad) < 1e-5
    assert cpu_wgrad.max_rel_error(x.grad, xd.grad) < 1e-5
    if bias:
        assert cpu_wgrad.max_rel_error(layer.bias.grad, ref.bias.grad) < 1e-5
    layer.weight.requires_grad_(False)
    x.grad = None
    layer(x).backward(g)
    assert len(calls) == 1 and x.grad is not None


def test_same_gradients_with_the_kernel_off(kernel):
    """On and off (MKL's mm + sum) agree to float32 rounding, gradient accumulation included."""
    if onednn.onednn_unavailable_reason() is not None:
        pytest.skip(onednn.onednn_unavailable_reason())
    torch.manual_seed(1)
    layer = torch.nn.Linear(64, 96)
    onednn.use_onednn_linears(layer, trainable=True)
    x = torch.randn(8, 33, 64)
    grads = []
    for off in (False, True):
        layer.zero_grad(set_to_none=True)
        with cpu_wgrad.disabled() if off else contextlib.nullcontext():
            for _ in range(2):   # accumulation into .grad
                F.gelu(layer(x)).sum().backward()
        grads.append((layer.weight.grad.clone(), layer.bias.grad.clone()))
    (w_on, b_on), (w_off, b_off) = grads
    assert torch.allclose(w_on, w_off, rtol=1e-5, atol=1e-4) and torch.allclose(b_on, b_off, rtol=1e-5, atol=1e-4)


def test_env_switch_and_no_compiler_fall_back_to_mm(compiled_checks):
    compiled_checks.switched_off(cpu_wgrad)
    if onednn.onednn_unavailable_reason() is None:   # the fallback: mm and sum, the same numbers
        layer = torch.nn.Linear(16, 8)
        onednn.use_onednn_linears(layer, trainable=True)
        x = torch.randn(5, 16)
        layer(x).sum().backward()
        assert torch.allclose(layer.weight.grad, torch.ones(8, 5) @ x, atol=1e-5)
        assert torch.allclose(layer.bias.grad, torch.full((8,), 5.0))
    compiled_checks.no_compiler_and_disabled(cpu_wgrad)


def test_a_wrong_build_is_caught_by_the_self_check(compiled_checks):
    compiled_checks.wrong_build_is_caught(cpu_wgrad, 'for (int64_t n = 0; n < N; n++) o[n] += p[n];',
                                          'for (int64_t n = 1; n < N; n++) o[n] += p[n];')
