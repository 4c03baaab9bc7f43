"""oneDNN GEMMs for CPU models (toolkit/cpu/onednn.py): same numbers and gradients as nn.Linear to
fp32 rounding, hooks and state dicts untouched, only fp32 CPU models switched (frozen ones unless
asked for a trained one), an engine's model at ZeRO-3, and the ways it stays off."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.cpu import onednn
from toolkit.cpu.onednn import OneDNNLinear, onednn_unavailable_reason, restore_linears, use_onednn_linears
from toolkit.engine import prepare_frozen


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


def test_trainable_or_non_fp32_models_are_left_alone(available):
    model = _mlp()
    assert use_onednn_linears(model) == 0                       # requires grad: a student, not a teacher
    frozen64 = _mlp().double().requires_grad_(False)
    assert use_onednn_linears(frozen64) == 0                    # float64: MKL's path, exact reference runs
    bf = prepare_frozen(_mlp(), "cpu", torch.bfloat16)
    assert use_onednn_linears(bf) == 0 and not any(type(m) is OneDNNLinear for m in bf.modules())


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


def test_a_failing_op_keeps_mkl(monkeypatch):
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


@pytest.mark.parametrize("case", ["2d", "3d", "transposed input", "no bias", "frozen weight", "input without grad"])
def test_trainable_linear_values_and_gradients_match_float64(available, case):
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


def test_a_switched_model_pickles_whole_and_loads_switched(available, tmp_path):
    model = _mlp()
    use_onednn_linears(model, trainable=True)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert sum(type(m) is OneDNNLinear for m in loaded.modules()) == 3
    x = torch.randn(3, 40)
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("stage", [0, 3])
def test_an_engine_model_switched_after_the_engine_trains_like_mkl(available, stage):
    """The recipes switch the engine's module after deepspeed.initialize (ZeRO-3 included: the
    weight is gathered before the backward reads it); three steps land where MKL's do."""
    from toolkit.engine import Engine, OptimConfig

    def engine():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
        zero = {"stage": stage, "stage3_param_persistence_threshold": 0} if stage == 3 else {"stage": stage}
        ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "zero_optimization": zero}
        return Engine(net, ds, OptimConfig(lr=1e-2), total_steps=4)

    def run(e, steps):
        gen = torch.Generator().manual_seed(1)
        out = []
        for _ in range(steps):
            x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 1, generator=gen)
            loss = ((e(x) - y) ** 2).mean()
            e.backward(loss)
            e.step()
            out.append(float(loss))
        return out

    dnn, mkl = engine(), engine()
    assert use_onednn_linears(dnn.module, trainable=True) == 2
    for a, b in zip(run(dnn, 3), run(mkl, 3)):
        assert a == pytest.approx(b, rel=1e-5)
    for k, v in mkl.consolidated_state_dict().items():
        torch.testing.assert_close(dnn.consolidated_state_dict()[k], v, rtol=1e-5, atol=1e-6)
