"""oneDNN GEMMs for frozen CPU models (toolkit/models/onednn.py): same numbers as nn.Linear to
fp32 rounding, hooks and state dicts untouched, only frozen fp32 CPU models switched, and the
ways it stays off."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from toolkit.engine import prepare_frozen
from toolkit.models import onednn
from toolkit.models.onednn import FrozenOneDNNLinear, onednn_unavailable_reason, restore_linears, use_onednn_linears


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
    assert all(type(m) is FrozenOneDNNLinear for m in model if isinstance(m, nn.Linear))
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert list(model.state_dict()) == keys and len(captured) == 1 and captured[0].shape == (4, 9, 24)
    # Non-contiguous input, and the same numbers with grad mode on (no gradient is wanted).
    xt = torch.randn(9, 4, 40).transpose(0, 1)
    torch.testing.assert_close(model(xt), nn.Sequential(*[m for m in _mlp()])(xt).detach(), rtol=1e-5, atol=1e-5)
    assert restore_linears(model) == 3 and all(type(m) is not FrozenOneDNNLinear for m in model)


def test_prepare_frozen_switches_a_cpu_fp32_teacher(available):
    model = prepare_frozen(_mlp(), "cpu", torch.float32)
    assert sum(type(m) is FrozenOneDNNLinear for m in model.modules()) == 3
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_trainable_or_non_fp32_models_are_left_alone(available):
    model = _mlp()
    assert use_onednn_linears(model) == 0                       # requires grad: a student, not a teacher
    frozen64 = _mlp().double().requires_grad_(False)
    assert use_onednn_linears(frozen64) == 0                    # float64: MKL's path, exact reference runs
    bf = prepare_frozen(_mlp(), "cpu", torch.bfloat16)
    assert not any(type(m) is FrozenOneDNNLinear for m in bf.modules())


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
