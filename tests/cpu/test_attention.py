"""The compiled CPU attention forward (toolkit/kernels/cpu_attention.py): it builds here, its
output and logsumexp against float64 attention, its own backward against float64 gradients, the
transformers integration, and every fallback."""
from __future__ import annotations

import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from toolkit.kernels import cpu_attention as ca


@pytest.fixture
def kernel():
    k = ca.load()
    if k is None:
        pytest.skip(f"the compiled CPU attention kernel does not run here: {ca.unavailable_reason()}")
    return k


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty kernel cache and no loaded kernel; the real state comes back afterwards."""
    monkeypatch.setenv("TOOLKIT_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TOOLKIT_CPU_ATTENTION", raising=False)
    ca.reset()
    yield tmp_path / "cache"
    ca.reset()


def _qkv(b, h, lq, d, lk=None, dtype=torch.float32, seed=0, fused=True):
    """Q/K/V as the model makes them: transposed views ``[B, H, L, D]`` of ``[B, L, H*D]``
    projections (with ``fused``: three slices of one ``[B, L, 3*H*D]`` tensor)."""
    gen = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    if fused and lk == lq:
        x = torch.randn(b, lq, 3 * h * d, generator=gen, dtype=dtype) * 1.5
        return [t.view(b, lq, h, d).transpose(1, 2) for t in x.split(h * d, dim=-1)]
    q = torch.randn(b, lq, h, d, generator=gen, dtype=dtype).transpose(1, 2)
    k = torch.randn(b, lk, h, d, generator=gen, dtype=dtype).transpose(1, 2)
    v = torch.randn(b, lk, h, d, generator=gen, dtype=dtype).transpose(1, 2)
    return q, k, v


def _key_padding(lengths, lk):
    valid = torch.arange(lk)[None, :] < torch.tensor(lengths)[:, None]
    return valid[:, None, None, :]                     # [B, 1, 1, Lk]


def _close(got, want, rel=1e-5):
    err = float((got.double() - want).abs().max())
    assert err <= rel * (1.0 + float(want.abs().max())), err


def test_kernel_builds_on_a_linux_host_with_a_c_compiler(fresh):
    """CI has gcc: the kernel must build and pass its self-check there, not quietly fall back."""
    from toolkit.kernels.cpu_rows import find_compiler

    if not sys.platform.startswith("linux") or find_compiler() is None:
        pytest.skip("needs Linux and a C compiler (the fallback is tested below)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k = ca.load()
    assert k is not None, ca.unavailable_reason()
    assert k.path.parent == fresh and k.path.name.startswith("attention-")
    assert ca.unavailable_reason() is None


@pytest.mark.parametrize("b,h,lq,lk,d", [(2, 3, 37, 37, 32), (1, 2, 1, 1, 32), (3, 4, 29, 29, 26),
                                         (2, 2, 70, 70, 64), (2, 1, 9, 45, 80), (1, 2, 33, 17, 8)])
def test_forward_matches_float64(kernel, b, h, lq, lk, d):
    """Output and logsumexp within 1e-5 of float64: head sizes that are and are not multiples of
    the vector width, query and key lengths off the blocking, cross lengths, ragged padding."""
    q, k, v = _qkv(b, h, lq, d, lk)
    lengths = [max(1, lk - 7 * i) for i in range(b)]
    for mask in (None, _key_padding(lengths, lk)):
        out, lse = kernel.forward(q, k, v, mask, d ** -0.5)
        ref_out, ref_lse = ca.reference(q, k, v, mask, d ** -0.5)
        assert out.shape == (b, h, lq, d) and lse.shape == (b, h, lq)
        _close(out, ref_out)
        _close(lse, ref_lse)


def test_layouts_match_torchs_flash_op(kernel):
    """out and logsumexp in the op's own memory layouts ([B, L, H, D] and [B, L, H]), and the
    same numbers as the op to fp32 rounding (a drop-in for it)."""
    q, k, v = _qkv(2, 3, 40, 32)
    mask = _key_padding([40, 31], 40)
    out, lse = kernel.forward(q, k, v, mask, 32 ** -0.5)
    add = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    ref_out, ref_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, attn_mask=add)
    assert out.stride() == ref_out.stride() and lse.stride() == ref_lse.stride()
    assert torch.allclose(out, ref_out, atol=2e-6) and torch.allclose(lse, ref_lse, atol=2e-6)


def test_query_dependent_mask_and_fully_masked_rows(kernel):
    """Any boolean mask, not only key padding: a causal-style mask per head, and rows with no key
    at all, which give 0 and logsumexp 0 as torch's kernel does."""
    b, h, length, d = 2, 3, 23, 16
    q, k, v = _qkv(b, h, length, d)
    mask = torch.rand(b, h, length, length, generator=torch.Generator().manual_seed(1)) < 0.6
    mask[0, 1, 4] = False
    mask[1, :, 0] = False
    out, lse = kernel.forward(q, k, v, mask, 0.3)
    ref_out, ref_lse = ca.reference(q, k, v, mask, 0.3)
    _close(out, ref_out)
    _close(lse, ref_lse)
    assert out[0, 1, 4].abs().max() == 0 and lse[0, 1, 4] == 0 and out[1, :, 0].abs().max() == 0


@pytest.mark.parametrize("b,h,lq,lk,d", [(2, 3, 37, 37, 32), (1, 2, 1, 1, 32), (2, 2, 13, 45, 26),
                                         (2, 2, 70, 70, 64), (1, 1, 40, 9, 80)])
def test_kernel_backward_matches_float64(kernel, b, h, lq, lk, d):
    """The kernel's own backward: dQ, dK, dV within 1e-5 of float64 autograd for head sizes on
    and off the vector width, lengths off the blocking, cross lengths, key padding and a
    query-dependent mask with fully masked rows, and an upstream gradient with any strides."""
    q, k, v = _qkv(b, h, lq, d, lk, seed=4)
    gen = torch.Generator().manual_seed(5)
    lengths = [max(1, lk - 5 * i) for i in range(b)]
    rand = torch.rand(b, h, lq, lk, generator=gen) < 0.7
    rand[:, :, 0] = False
    for mask in (None, _key_padding(lengths, lk), rand & _key_padding(lengths, lk)):
        grad = torch.randn(b, lq, h, d, generator=gen).transpose(1, 2)         # as the model hands it back
        out, lse = kernel.forward(q, k, v, mask, d ** -0.5)
        got = kernel.backward(grad, q, k, v, out, lse, mask, d ** -0.5)
        qkv = [t.double().requires_grad_() for t in (q, k, v)]
        want = torch.autograd.grad(ca.reference(*qkv, mask, d ** -0.5)[0], qkv, grad.double())
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.transpose(1, 2).is_contiguous()
            _close(g, w)


def test_gradients_match_float64(kernel):
    """Gradients of Q, K, V through autograd (the kernel's forward and backward) within 1e-5 of
    float64 autograd, with padding and a fused-projection input."""
    b, h, length, d = 3, 4, 29, 26
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(b, length, 3 * h * d, generator=gen, dtype=torch.float64)
    mask = _key_padding([29, 20, 11], length)
    g = torch.randn(b, h, length, d, generator=gen, dtype=torch.float64)

    def run(xx, fn):
        xx = xx.clone().requires_grad_()
        q, k, v = (t.view(b, length, h, d).transpose(1, 2) for t in xx.split(h * d, dim=-1))
        out = fn(q, k, v)
        out.backward(g.to(out.dtype))
        return out.detach(), xx.grad

    ref_out, ref_grad = run(x, lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    out, grad = run(x.float(), lambda q, k, v: ca.attention(q, k, v, mask))
    assert out.dtype == torch.float32 and grad.dtype == torch.float32
    _close(out, ref_out)
    _close(grad, ref_grad)


def test_the_forward_keeps_what_sdpa_keeps(kernel):
    """No [L, L] tensor is kept for the backward: Q, K, V, out, logsumexp and the mask."""
    q, k, v = (t.detach().requires_grad_() for t in _qkv(2, 2, 64, 32, fused=False))
    mask = _key_padding([64, 50], 64)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        ca.attention(q, k, v, mask)
    want = [tuple(t.shape) for t in (q, k, v, q, mask)] + [(2, 2, 64)]
    assert sorted(saved) == sorted(want)


def test_applies_only_where_it_can(kernel):
    q, k, v = _qkv(2, 2, 8, 16)
    assert ca.applies(q, k, v, None) and ca.applies(q, k, v, _key_padding([8, 3], 8))
    assert not ca.applies(*(t.double() for t in (q, k, v)), None)
    assert not ca.applies(*(t.bfloat16() for t in (q, k, v)), None)
    assert not ca.applies(q, k, v, torch.zeros(2, 1, 1, 8))                 # additive float mask
    assert not ca.applies(q, k, v, torch.ones(3, 1, 1, 8, dtype=torch.bool))  # does not broadcast
    assert not ca.applies(q, k[:, :1], v[:, :1], None)                      # grouped heads
    assert not ca.applies(q.transpose(-1, -2), k, v, None)                  # strided last dimension
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not ca.applies(q, k, v, None)
    with ca.disabled():
        assert not ca.applies(q, k, v, None)
        out = ca.attention(q, k, v, None)                                   # sdpa, same numbers
    _close(out, ca.reference(q, k, v, None, 16 ** -0.5)[0])


def test_bad_input_is_refused_with_a_message(kernel):
    q, k, v = _qkv(1, 2, 8, 16)
    with pytest.raises(ValueError, match="query must be a 4-D fp32 CPU tensor"):
        kernel.forward(q.double(), k, v, None, 0.25)
    with pytest.raises(ValueError, match="do not match"):
        kernel.forward(q, k[..., :8], v, None, 0.25)
    with pytest.raises(ValueError, match="4-D bool"):
        kernel.forward(q, k, v, torch.zeros(1, 1, 1, 8), 0.25)


def _tiny_bert(dropout: float = 0.0, arch: str = "bert"):
    from toolkit.models.encoder import EncoderSpec, build_encoder

    spec = EncoderSpec(arch=arch, num_layers=2, hidden_size=64, num_heads=2, intermediate_size=96, vocab_size=99,
                       hidden_dropout=0.0, attention_dropout=dropout, use_task_id=arch == "ernie")
    torch.manual_seed(0)
    return build_encoder(spec)


def _count_kernel_calls(monkeypatch):
    calls = []
    real = ca.AttentionKernel.forward
    monkeypatch.setattr(ca.AttentionKernel, "forward", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


@pytest.mark.parametrize("arch", ["bert", "ernie"])
def test_a_switched_bert_matches_sdpa_and_trains(kernel, monkeypatch, arch):
    """use_cpu_attention on the toolkit's BERT and ERNIE encoders: the same outputs and gradients
    as sdpa (padding included), and the kernel really runs in each layer."""
    model = _tiny_bert(arch=arch)
    ids = torch.randint(1, 99, (3, 21), generator=torch.Generator().manual_seed(0))
    am = (torch.arange(21)[None, :] < torch.tensor([21, 15, 6])[:, None]).long()

    def run():
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=am).last_hidden_state
        (out * am[..., None]).square().sum().backward()
        return out.detach(), model.encoder.layer[0].attention.self.query.weight.grad.clone()

    want_out, want_grad = run()
    calls = _count_kernel_calls(monkeypatch)
    assert ca.use_cpu_attention(model) == 1 and ca.uses_cpu_attention(model)
    assert ca.attention_note(model) == "the CPU kernel"
    got_out, got_grad = run()
    assert len(calls) == 2                                  # one per layer
    keep = am.bool()
    assert torch.allclose(got_out[keep], want_out[keep], atol=2e-5)
    assert torch.allclose(got_grad, want_grad, rtol=1e-4, atol=1e-5)
    assert ca.restore_attention(model) == 1 and not ca.uses_cpu_attention(model)
    assert model.config._attn_implementation == "sdpa"


def test_switched_model_falls_back_where_the_kernel_does_not_apply(kernel, monkeypatch, tmp_path):
    """Attention dropout in training, bf16 and a saved config: sdpa, and nothing of the switch
    leaks into save_pretrained."""
    import json

    model = _tiny_bert(dropout=0.1)
    ca.use_cpu_attention(model)
    calls = _count_kernel_calls(monkeypatch)
    ids = torch.randint(1, 99, (2, 9))
    model.train()
    model(input_ids=ids)
    assert calls == []                       # dropout to do: sdpa
    model.eval()
    model(input_ids=ids)
    assert len(calls) == 2                   # eval: no dropout, the kernel
    model.to(torch.bfloat16)
    calls.clear()
    assert model(input_ids=ids).last_hidden_state.dtype == torch.bfloat16 and calls == []
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()).get("_attn_implementation") in (None, "sdpa")


def test_only_sdpa_cpu_fp32_models_are_switched(kernel):
    model = _tiny_bert()
    model.config._attn_implementation = "eager"
    assert ca.use_cpu_attention(model) == 0 and "eager" in ca.attention_note(model)
    model = _tiny_bert().double()
    assert ca.use_cpu_attention(model) == 0 and "not fp32" in ca.attention_note(model)


def test_env_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("TOOLKIT_CPU_ATTENTION", "0")
    assert ca.load() is None and "TOOLKIT_CPU_ATTENTION=0" in ca.unavailable_reason()
    model = _tiny_bert()
    assert ca.use_cpu_attention(model) == 0 and "TOOLKIT_CPU_ATTENTION=0" in ca.attention_note(model)
    monkeypatch.setenv("TOOLKIT_CPU_ATTENTION", "sometimes")
    from toolkit.errors import ConfigError

    with pytest.raises(ConfigError, match="TOOLKIT_CPU_ATTENTION"):
        ca.load()


def test_no_compiler_falls_back_with_one_warning(fresh, monkeypatch):
    from toolkit.kernels import cpu_rows

    monkeypatch.setattr(cpu_rows, "find_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match="no C compiler"):
        assert ca.load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ca.load() is None            # reported once
    assert "no C compiler" in ca.unavailable_reason()
    q, k, v = _qkv(1, 2, 5, 8)
    _close(ca.attention(q, k, v), ca.reference(q, k, v, None, 8 ** -0.5)[0])


def test_a_build_that_fails_its_check_is_not_used(fresh, monkeypatch, tmp_path):
    """A kernel that computes wrong numbers is caught by the self-check before any use."""
    from toolkit.kernels.cpu_rows import find_compiler

    if not sys.platform.startswith("linux") or find_compiler() is None:
        pytest.skip("needs Linux and a C compiler")
    src = ca.SOURCE.read_text()
    for wrong, message in (("*lrow = mx + logf(sum);", "logsumexp differs from float64"),
                           ("mk_outer(pb, lkp, dop + i0 * dp + c0, dp, dva + c0, dp, Lk);", "gradient of V differs")):
        assert wrong in src
        bad = tmp_path / "attention.c"
        bad.write_text(src.replace(wrong, wrong.replace("logf(sum)", "logf(sum) + 0.5f").replace("Lk);", "Lk - 1);")))
        monkeypatch.setattr(ca._KERNEL, "source", bad)
        ca.reset()
        with pytest.warns(RuntimeWarning, match=message):
            assert ca.load() is None


def test_a_compile_error_falls_back(fresh, monkeypatch, tmp_path):
    from toolkit.kernels.cpu_rows import find_compiler

    if not sys.platform.startswith("linux") or find_compiler() is None:
        pytest.skip("needs Linux and a C compiler")
    bad = tmp_path / "attention.c"
    bad.write_text("this is not C\n")
    monkeypatch.setattr(ca._KERNEL, "source", bad)
    with pytest.warns(RuntimeWarning, match="could not compile"):
        assert ca.load() is None
