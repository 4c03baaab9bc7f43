"""oneDNN GEMMs for CPU models (toolkit/models/onednn.py): same numbers and gradients as nn.Linear to
fp32 rounding, hooks and state dicts untouched, only fp32 CPU models switched (frozen ones unless
asked for a trained one), and the ways it stays off."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

from toolkit.kernels import cpu_linear, cpu_wgrad

from toolkit.engine import prepare_frozen
from toolkit.models import onednn
from toolkit.models.onednn import OneDNNLinear, onednn_unavailable_reason, restore_linears, use_onednn_linears


@pytest.fixture
def available():
    reason = onednn_unavailable_reason()
    if reason is not None:
        pytest.skip(f"oneDNN linear not usable here: {reason}")


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 96), nn.GELU(), nn.Linear(96, 24, bias=False), nn.Linear(24, 24))


def test_frozen_model_switches_and_matches_linear(available):
    model = _mlp()
    x = torch.randn(4, 9, 40)
    ref = model(x).detach()
    model.requires_grad_(False)
    keys = list(model.state_dict())
    captured = []
    model[2].register_forward_hook(lambda m, i, o: captured.append(o))
    assert use_onednn_linears(model) == 3
    assert all(type(m) is OneDNNLinear for m in model if isinstance(m, nn.Linear))
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert list(model.state_dict()) == keys and len(captured) == 1 and captured[0].shape == (4, 9, 24)
    # Non-contiguous input, and the same numbers with grad mode on (no gradient is wanted).
    xt = torch.randn(9, 4, 40).transpose(0, 1)
    torch.testing.assert_close(model(xt), nn.Sequential(*[m for m in _mlp()])(xt).detach(), rtol=1e-5, atol=1e-5)
    assert restore_linears(model) == 3 and all(type(m) is not OneDNNLinear for m in model)


def test_prepare_frozen_switches_a_cpu_fp32_teacher(available):
    model = prepare_frozen(_mlp(), "cpu", torch.float32)
    assert sum(type(m) is OneDNNLinear for m in model.modules()) == 3
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_trainable_or_non_fp32_models_are_left_alone(available):
    model = _mlp()
    assert use_onednn_linears(model) == 0                       # requires grad: a student, not a teacher
    frozen64 = _mlp().double().requires_grad_(False)
    assert use_onednn_linears(frozen64) == 0                    # float64: MKL's path, exact reference runs
    bf = prepare_frozen(_mlp(), "cpu", torch.bfloat16)
    assert not any(type(m) is OneDNNLinear for m in bf.modules())


def test_a_switched_layer_that_needs_a_gradient_uses_linear(available):
    """Unfrozen later (or fed an input that requires grad): nn.Linear's forward, so autograd works."""
    model = _mlp().requires_grad_(False)
    use_onednn_linears(model)
    x = torch.randn(2, 40, requires_grad=True)
    model(x).sum().backward()
    ref = _mlp()
    x2 = x.detach().clone().requires_grad_(True)
    ref(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    model.requires_grad_(True)
    model(torch.randn(2, 40)).sum().backward()
    assert model[0].weight.grad is not None


def test_env_switch_and_a_failing_op_keep_mkl(monkeypatch):
    monkeypatch.setenv("TOOLKIT_ONEDNN_LINEAR", "0")
    assert onednn_unavailable_reason() == "turned off by TOOLKIT_ONEDNN_LINEAR=0"
    assert use_onednn_linears(_mlp().requires_grad_(False)) == 0
    monkeypatch.delenv("TOOLKIT_ONEDNN_LINEAR")
    # An op that gives wrong numbers is caught by the check before any model is switched.
    monkeypatch.setattr(onednn, "_CHECK", {})

    class _BadOps:
        @staticmethod
        def _linear_pointwise(x, w, b, *args):
            return torch.nn.functional.linear(x, w, b) * 1.01

    monkeypatch.setattr(torch.ops, "mkldnn", _BadOps())
    assert "differs from F.linear" in onednn_unavailable_reason()
    assert use_onednn_linears(_mlp().requires_grad_(False)) == 0
    monkeypatch.undo()
    onednn._CHECK.clear()


# ----- trained models (the engine's student / task model on a CPU fp32 run) ------------------
def _grads_f64(layer: nn.Linear, x: torch.Tensor, go: torch.Tensor):
    """Output and gradients of ``F.linear`` in float64: the reference."""
    x64 = x.detach().double().requires_grad_(x.requires_grad)
    w64 = layer.weight.detach().double().requires_grad_(layer.weight.requires_grad)
    b64 = None if layer.bias is None else layer.bias.detach().double().requires_grad_(layer.bias.requires_grad)
    y = torch.nn.functional.linear(x64, w64, b64)
    y.backward(go.double())
    return y.detach(), x64.grad, w64.grad, None if b64 is None else b64.grad


def _close(got, want):
    assert (got is None) == (want is None)
    if got is not None:
        assert got.dtype == torch.float32
        err = float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))
        assert err < 1e-5, err


def _backend(name: str) -> contextlib.ExitStack:
    """``"kernels"``: the compiled GEMM and weight-gradient kernels (skipped where they do not
    build); ``"onednn"``: oneDNN's GEMM and MKL's weight gradient, the kernels turned off."""
    stack = contextlib.ExitStack()
    if name == "kernels":
        if cpu_linear.load() is None or cpu_wgrad.load() is None:
            pytest.skip(f"compiled kernels not here: {cpu_linear.unavailable_reason() or cpu_wgrad.unavailable_reason()}")
    else:
        stack.enter_context(cpu_linear.disabled())
        stack.enter_context(cpu_wgrad.disabled())
    return stack


@pytest.mark.parametrize("backend", ["kernels", "onednn"])
@pytest.mark.parametrize("case", ["2d", "3d", "transposed input", "no bias", "frozen weight", "input without grad"])
def test_trainable_linear_values_and_gradients_match_float64(available, case, backend):
    with _backend(backend):
        _check_trainable_linear(case)


def _check_trainable_linear(case: str) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(40, 24, bias=case != "no bias")
    shape = (13, 40) if case == "2d" else (3, 5, 40)
    x = torch.randn(*shape)
    if case == "transposed input":
        x = torch.randn(5, 3, 40).transpose(0, 1)
    if case == "frozen weight":
        layer.requires_grad_(False)
    x.requires_grad_(case != "input without grad")
    assert use_onednn_linears(layer, trainable=True) == 1 and type(layer) is OneDNNLinear
    go = torch.randn(*x.shape[:-1], 24)
    y = layer(x)
    assert y.grad_fn is not None and "OneDNNLinear" in type(y.grad_fn).__name__
    y.backward(go)
    want = _grads_f64(layer, x, go)
    _close(y.detach(), want[0])
    _close(x.grad, want[1])
    _close(layer.weight.grad, want[2])
    _close(None if layer.bias is None else layer.bias.grad, want[3])


def test_a_frozen_layer_keeps_only_its_weight_for_the_backward(available):
    """As F.linear's autograd: the input is saved only where the weight gets a gradient."""
    torch.manual_seed(0)
    layer = nn.Linear(40, 24)
    use_onednn_linears(layer, trainable=True)
    x = torch.randn(5, 40, requires_grad=True)
    saved = layer(x).grad_fn.saved_tensors
    assert any(t is not None and t.data_ptr() == x.data_ptr() for t in saved)
    layer.requires_grad_(False)
    y = layer(x)
    assert not any(t is not None and t.data_ptr() == x.data_ptr() for t in y.grad_fn.saved_tensors)
    y.sum().backward()
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(5, 40), rtol=1e-5, atol=1e-6)


def test_trainable_linear_falls_back_off_its_path(available):
    """float64 (gradcheck), CPU autocast and no-grad each take the path that fits them."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    use_onednn_linears(layer, trainable=True)
    # float64: nn.Linear's own forward, so gradcheck holds exactly.
    layer64 = nn.Linear(6, 4).double()
    layer64.__class__ = OneDNNLinear
    assert torch.autograd.gradcheck(layer64, (torch.randn(3, 6, dtype=torch.float64, requires_grad=True),))
    # Under CPU autocast the layer computes in bf16 as nn.Linear does there.
    x = torch.randn(3, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    # No grad wanted: no graph.
    with torch.no_grad():
        assert layer(x).grad_fn is None


def test_trainable_linear_under_activation_checkpointing(available):
    from torch.utils.checkpoint import checkpoint

    model = _mlp()
    use_onednn_linears(model, trainable=True)
    x = torch.randn(4, 9, 40, requires_grad=True)
    model(x).square().sum().backward()
    plain = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    checkpoint(model, x, use_reentrant=False).square().sum().backward()
    for a, b in zip(plain, [p.grad for p in model.parameters()] + [x.grad]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _tiny_bert(hidden_act="gelu", kind="bert"):
    from transformers import BertConfig, BertModel, ErnieConfig, ErnieModel

    config_cls, model_cls = (BertConfig, BertModel) if kind == "bert" else (ErnieConfig, ErnieModel)
    cfg = config_cls(vocab_size=99, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                     intermediate_size=72, hidden_act=hidden_act, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return model_cls(cfg)


@pytest.mark.parametrize("backend", ["kernels", "onednn"])
def test_feed_forward_gemm_and_gelu_run_as_one_call_without_grad(available, monkeypatch, backend):
    """The feed-forward's GEMM + bias + erf GELU as one call (the compiled kernel's epilogue, or
    oneDNN's post-op) where nothing needs a gradient (the teacher; a trained model in evaluation):
    same numbers, and the block's own forward when a gradient is due or the activation is not
    the exact GELU."""
    if backend == "onednn" and onednn._gelu_postop_reason() is not None:
        pytest.skip(onednn._gelu_postop_reason())
    if backend == "kernels":   # the kernel's GELU epilogue runs where oneDNN's post-op fails its check
        monkeypatch.setitem(onednn._CHECK, "gelu", "post-op turned off by the test")
    with _backend(backend):
        _check_dense_gelu(monkeypatch)


def _check_dense_gelu(monkeypatch) -> None:
    model = _tiny_bert()
    ids = torch.randint(1, 99, (2, 11))
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __getattr__(self, name):
            return getattr(torch.ops.mkldnn, name)

        def _linear_pointwise(self, *args):
            calls.append(args[3])
            return real(*args)

    monkeypatch.setattr(torch.ops, "mkldnn", Spy(), raising=False)
    real_kernel = cpu_linear.LinearKernel.linear

    def kernel_spy(self, x, w, b=None, gelu=False, threads=None):
        calls.append("gelu" if gelu else "none")
        return real_kernel(self, x, w, b, gelu=gelu, threads=threads)

    monkeypatch.setattr(cpu_linear.LinearKernel, "linear", kernel_spy)
    model.requires_grad_(False)
    assert use_onednn_linears(model) > 0 and onednn.count_fused_gelu(model) == 2
    with torch.no_grad():
        got = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert calls.count("gelu") == 2
    # A trained model: fused in evaluation, the plain block (and autograd) while training.
    restore_linears(model)
    assert onednn.count_fused_gelu(model) == 0 and "forward" not in model.encoder.layer[0].intermediate.__dict__
    model.requires_grad_(True)
    use_onednn_linears(model, trainable=True)
    calls.clear()
    out = model(input_ids=ids).last_hidden_state
    out.sum().backward()
    assert "gelu" not in calls and model.encoder.layer[0].intermediate.dense.weight.grad is not None
    torch.testing.assert_close(out.detach(), want, rtol=1e-5, atol=1e-5)
    # Not the exact GELU: left alone.
    other = _tiny_bert("gelu_new").requires_grad_(False)
    use_onednn_linears(other)
    assert onednn.count_fused_gelu(other) == 0


@pytest.mark.parametrize("backend", ["kernels", "onednn"])
def test_a_trained_feed_forward_runs_its_gelu_forward_and_backward_on_the_kernel(available, monkeypatch, backend):
    """With a gradient due, the feed-forward's GELU and its backward run on the compiled kernel
    (the GEMMs as before, the GELU's output recomputed in the backward); values and every
    parameter's gradient match the plain model in float64. With the kernel off ("onednn"), the
    layer's own methods (F.gelu) run, with the same numbers."""
    import copy

    model = _tiny_bert()
    ref = copy.deepcopy(model).double()
    ids = torch.randint(1, 99, (2, 11), generator=torch.Generator().manual_seed(0))
    calls = []
    with _backend(backend):   # (loads the kernel, and runs its self-check, before the spies go in)
        for name in ("gelu", "gelu_grad"):
            real = getattr(cpu_linear.LinearKernel, name)
            monkeypatch.setattr(cpu_linear.LinearKernel, name,
                                lambda self, *a, _real=real, _name=name: calls.append(_name) or _real(self, *a))
        assert use_onednn_linears(model, trainable=True) > 0 and onednn.count_fused_gelu(model) == 2
        out = model(input_ids=ids).last_hidden_state
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        (out * weights).sum().backward()
    want = ref(input_ids=ids).last_hidden_state
    (want * weights.double()).sum().backward()
    # Per layer: the GELU forward, and in the backward the GELU again (its output is recomputed,
    # not kept) and its gradient.
    assert calls == (["gelu", "gelu", "gelu", "gelu_grad", "gelu", "gelu_grad"] if backend == "kernels" else [])
    assert onednn.count_recomputed_feed_forward(model) == (2 if backend == "kernels" else 0)
    if backend == "kernels":   # an intermediate block called alone: its GELU on the kernel too
        assert "CompiledGelu" in type(model.encoder.layer[0].intermediate(torch.randn(3, 32)).grad_fn).__name__
    _close(out.detach(), want.detach())
    for (name, p), p64 in zip(model.named_parameters(), ref.parameters()):
        if p64.grad is None or p64.grad.abs().max() < 1e-9:   # the key bias: zero up to rounding
            continue
        err = float((p.grad.double() - p64.grad).abs().max() / p64.grad.abs().max())
        assert err < 1e-4, (name, err)


def _saved_bytes(model, ids) -> int:
    """Bytes of the distinct tensors autograd saves in ``model``'s forward (parameters included)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.numel(), t.dtype)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids).last_hidden_state
    # A weighted sum: a plain one is constant through the last LayerNorm (no gradient to compare).
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["bert", "ernie"])
def test_a_trained_feed_forward_keeps_the_gelus_input_not_its_output(available, kind):
    """The feed-forward saves x and the GELU's input h, not its output g = gelu(h): per layer one
    [tokens, intermediate] tensor less than the layer's own methods keep, with the same gradients
    (BERT, and ERNIE 3.0's encoder, the Chinese track's)."""
    import copy

    if cpu_linear.load() is None:
        pytest.skip(f"compiled kernels not here: {cpu_linear.unavailable_reason()}")
    model = _tiny_bert(kind=kind)
    plain = copy.deepcopy(model)
    ids = torch.randint(1, 99, (2, 11), generator=torch.Generator().manual_seed(0))
    use_onednn_linears(model, trainable=True)
    use_onednn_linears(plain, trainable=True)
    onednn.unfuse_dense_gelu(plain)          # the layer's own feed_forward_chunk, F.gelu's autograd
    assert onednn.count_recomputed_feed_forward(model) == 2 and onednn.count_recomputed_feed_forward(plain) == 0
    g_bytes = 2 * 11 * 72 * 4               # one layer's GELU output [2, 11, 72] fp32
    assert _saved_bytes(plain, ids) - _saved_bytes(model, ids) == 2 * g_bytes
    for a, b in zip(model.parameters(), plain.parameters()):    # (F.gelu against the kernel's GELU)
        if b.grad is not None and b.grad.abs().max() > 1e-9:   # (the pooler: none; the key bias: ~0)
            _close(a.grad, b.grad.double())
    # Turned off by the environment: the layers' own methods.
    other = _tiny_bert(kind=kind)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOOLKIT_FFN_RECOMPUTE", "0")
        use_onednn_linears(other, trainable=True)
    assert onednn.count_recomputed_feed_forward(other) == 0 and onednn.count_fused_gelu(other) == 2
    assert onednn.restore_feed_forward(model) == 2 and onednn.recompute_feed_forward_gelu(model) == 2
    # Hooks on the blocks (as DeepSpeed's ZeRO-3 gathers use): the layer's own method runs.
    model.zero_grad()
    handle = model.encoder.layer[0].output.dense.register_forward_pre_hook(lambda m, a: None)
    assert _saved_bytes(model, ids) - _saved_bytes(plain, ids) == -g_bytes
    handle.remove()


def test_a_switched_model_pickles_whole_and_loads_with_its_switches(available, tmp_path):
    """torch.save of a whole switched model (trained: the GELU and feed-forward bindings; frozen:
    the one-call GEMM + GELU) loads again, still switched, bound to the loaded modules, same output."""
    for trainable in (True, False):
        model = _tiny_bert().eval()
        if not trainable:
            model.requires_grad_(False)
        use_onednn_linears(model, trainable=trainable)
        fused, recomputed = onednn.count_fused_gelu(model), onednn.count_recomputed_feed_forward(model)
        assert fused == 2 or cpu_linear.load() is None and onednn._gelu_postop_reason() is not None
        torch.save(model, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
        assert onednn.count_fused_gelu(loaded) == fused and onednn.count_recomputed_feed_forward(loaded) == recomputed
        layer = loaded.encoder.layer[0]
        assert layer.intermediate.forward.__self__ is layer.intermediate
        ids = torch.randint(1, 99, (2, 7), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                                   rtol=0, atol=0)
