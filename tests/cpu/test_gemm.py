"""The compiled CPU linear GEMM (toolkit/kernels/cpu_linear.py): it builds here, the forward (bias,
exact GELU) and the input-gradient product match float64 for ragged shapes, strides and thread
counts, oneDNN-switched layers use it from MIN_ROWS tokens on, and every fallback."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from toolkit.kernels import cpu_linear
from toolkit.models import onednn


@pytest.fixture
def kernel(compiled_checks):
    return compiled_checks.loaded(cpu_linear)


def test_builds_on_a_linux_host_with_a_c_compiler(compiled_checks):
    compiled_checks.builds(cpu_linear, "linear-")


@pytest.mark.parametrize("tokens", [1, 7, 8, 65, 200])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_forward_matches_float64(kernel, tokens, threads):
    """Tokens past a multiple of 8 and of a work block (64), outputs past a multiple of 32, inputs
    past a block (384), with and without bias, through the GELU."""
    gen = torch.Generator().manual_seed(tokens * 10 + threads)
    for n_in, n_out in ((1, 1), (32, 32), (40, 70), (400, 33), (800, 96)):
        x = torch.randn(tokens, n_in, generator=gen) * 2.0
        w = torch.randn(n_out, n_in, generator=gen) / n_in ** 0.5
        b = torch.randn(n_out, generator=gen)
        for bias in (b, None):
            for gelu in (False, True):
                got = kernel.linear(x, w, bias, gelu=gelu, threads=threads)
                assert got.shape == (tokens, n_out) and got.is_contiguous()
                err = cpu_linear.max_rel_error(got, cpu_linear.reference(x, w, bias, gelu))
                assert err < 1e-5, (n_in, n_out, bias is not None, gelu, err)


@pytest.mark.parametrize("n_out", [32, 64, 70])
def test_input_gradient_reads_the_transposed_weight_in_place(kernel, n_out):
    """dY @ W through ``weight.t()`` (unit stride along the outputs: read without packing, but for a
    partial last tile), against float64."""
    gen = torch.Generator().manual_seed(n_out)
    w = torch.randn(n_out, 450, generator=gen)          # the layer's [out, in]
    dy = torch.randn(3, 41, n_out, generator=gen)
    got = kernel.linear(dy, w.t())
    assert got.shape == (3, 41, 450)
    assert cpu_linear.max_rel_error(got, dy.double() @ w.double()) < 1e-5


def test_the_gelu_is_as_exact_as_torchs_fp32_gelu_everywhere(kernel):
    """The erf GELU (the GEMM's epilogue and alone) and its gradient over the whole useful range,
    tails included, against F.gelu in float64: within 2e-6 absolute, within 1e-5 relative where
    |x| < 2, and no further off in the tails than torch's own fp32 F.gelu."""
    x = torch.linspace(-12, 12, 20001)
    want = F.gelu(x.double())
    torch_rel = (F.gelu(x).double() - want).abs() / want.abs().clamp_min(1e-30)
    for got in (kernel.linear(x.reshape(-1, 1), torch.ones(1, 1), None, gelu=True).squeeze(1), kernel.gelu(x)):
        assert float((got.double() - want).abs().max()) < 2e-6
        rel = (got.double() - want).abs() / want.abs().clamp_min(1e-30)
        assert float(rel[x.abs() < 2].max()) < 1e-5
        assert float(rel[x.abs() < 4].max()) <= float(torch_rel[x.abs() < 4].max())
    g = torch.randn(20001, generator=torch.Generator().manual_seed(1))
    xd = x.double().requires_grad_()
    F.gelu(xd).backward(g.double())
    assert float((kernel.gelu_grad(x, g).double() - xd.grad).abs().max()) < 1e-6
    with pytest.raises(ValueError, match="gelu_grad"):
        kernel.gelu_grad(x, g[:-1])
    with pytest.raises(ValueError, match="gelu needs contiguous"):
        kernel.gelu(x[:20000].reshape(2, -1)[:, ::2])


def test_strided_and_batched_inputs(kernel):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 9, 70, generator=gen)[..., 5:45]            # row stride 70
    xt = torch.randn(40, 4, 9, generator=gen).permute(1, 2, 0)      # feature stride != 1: copied
    w = torch.randn(24, 40, generator=gen)
    b = torch.randn(48, generator=gen)[::2]                         # a strided bias
    for xx in (x, xt):
        got = kernel.linear(xx, w, b)
        assert got.shape == (4, 9, 24)
        assert cpu_linear.max_rel_error(got, cpu_linear.reference(xx, w, b)) < 1e-5


def test_empty_shapes(kernel):
    assert kernel.linear(torch.empty(0, 5), torch.randn(3, 5)).shape == (0, 3)
    b = torch.randn(3)
    got = kernel.linear(torch.empty(4, 0), torch.empty(3, 0), b, gelu=True)
    torch.testing.assert_close(got, F.gelu(b).expand(4, 3))


def test_bad_input_is_refused_with_a_message(kernel):
    with pytest.raises(ValueError, match="fp32 CPU"):
        kernel.linear(torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 3))
    with pytest.raises(ValueError, match="do not make a linear layer"):
        kernel.linear(torch.randn(4, 3), torch.randn(5, 4))
    with pytest.raises(ValueError, match="do not make a linear layer"):
        kernel.linear(torch.randn(4, 3), torch.randn(5, 3), torch.randn(4))


def test_switched_layers_use_it_from_min_rows_tokens(kernel, monkeypatch):
    """onednn_linear: the kernel from MIN_ROWS rows on (forward and input gradient), oneDNN below;
    the same gradients as F.linear in float64 either way."""
    if onednn.onednn_unavailable_reason() is not None:
        pytest.skip(onednn.onednn_unavailable_reason())
    calls = []
    real = cpu_linear.LinearKernel.linear
    monkeypatch.setattr(cpu_linear.LinearKernel, "linear",
                        lambda self, *a, **k: calls.append(a[0].shape) or real(self, *a, **k))
    monkeypatch.setattr(cpu_linear, "MIN_ROWS", 64)
    torch.manual_seed(0)
    layer = torch.nn.Linear(40, 24)
    ref = torch.nn.Linear(40, 24).double()
    ref.load_state_dict(layer.state_dict())
    onednn.use_onednn_linears(layer, trainable=True)
    for rows, used in ((63, False), (64, True)):
        calls.clear()
        layer.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        x = torch.randn(rows, 40, requires_grad=True)
        xd = x.detach().double().requires_grad_(True)
        g = torch.randn(rows, 24)
        y = layer(x)
        y.backward(g)
        ref(xd).backward(g.double())
        assert len(calls) == (2 if used else 0)                 # forward and dY @ W
        assert cpu_linear.max_rel_error(y.detach(), ref(xd).detach()) < 1e-5
        assert cpu_linear.max_rel_error(x.grad, xd.grad) < 1e-5
        assert cpu_linear.max_rel_error(layer.weight.grad, ref.weight.grad) < 1e-5


def test_env_switch_and_no_compiler_fall_back_to_onednn(compiled_checks):
    compiled_checks.switched_off(cpu_linear)
    if onednn.onednn_unavailable_reason() is None:   # the fallback: oneDNN, the same numbers
        x, w, b = torch.randn(5000, 16), torch.randn(8, 16), torch.randn(8)
        torch.testing.assert_close(onednn.onednn_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    compiled_checks.no_compiler_and_disabled(cpu_linear)


def test_a_wrong_build_is_caught_by_the_self_check(compiled_checks):
    compiled_checks.wrong_build_is_caught(cpu_linear, 'p = p * u + 5.308678585813584e-02f;',
                                          'p = p * u + 5.318678585813584e-02f;')
