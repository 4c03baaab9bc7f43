"""oneDNN GEMMs for the linear layers of fp32 CPU models (the ``onednn_linears`` speed-up).

torch sends an fp32 ``nn.Linear`` on x86 CPUs to MKL's sgemm; oneDNN's fp32 GEMM
(``torch.ops.mkldnn._linear_pointwise``, the op torch's own inductor uses for frozen CPU linears)
computes the same product and adds the bias inside the GEMM instead of copying it into the output
first, as ``addmm`` does. :func:`use_onednn_linears` switches every plain ``nn.Linear`` of a model
to :class:`OneDNNLinear` by changing the module's class: parameters, state-dict keys and
registered hooks (the Q/K/V captures, DeepSpeed's ZeRO-3 gather hooks) stay as they are;
:func:`restore_linears` switches them back.

* Without a gradient (the frozen teacher, any model in evaluation) the forward is one oneDNN call.
* With one, a small autograd function runs the forward and the input gradient ``dY @ W`` on
  oneDNN and the weight gradient ``dYᵀ X`` on MKL (``mm``). It saves what ``F.linear`` saves
  (the weight, and the input where the weight gets a gradient), so memory is unchanged, and it
  works under activation checkpointing and ZeRO-3 (the parameter itself is saved, not a view).
  It is differentiable once: a double backward raises.

Only fp32 CPU tensors outside CPU autocast take oneDNN; anything else runs ``nn.Linear``'s
forward, so a switched model that moves to a GPU, is cast to bf16 or runs under autocast keeps
working. The results differ from MKL's in the last bits. Before the first switch in a process
the op is checked against ``F.linear`` (the forward and the transposed-weight product of the
backward); a missing op or a failed check leaves the model alone
(:func:`onednn_unavailable_reason` says why).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

_CHECK: dict = {}


def onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ weight.T + bias`` for fp32 CPU tensors on oneDNN (``weight`` may be a strided view,
    e.g. a transpose)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinearFunction(torch.autograd.Function):
    """``F.linear`` with oneDNN's forward and input gradient; the weight and bias gradients from
    MKL's ``mm`` and a ``sum``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        # The input only for the weight gradient: a frozen layer keeps only its weight, as
        # F.linear's autograd does.
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        x, weight = ctx.saved_tensors
        return _linear_backward(grad, x, weight, *ctx.needs_input_grad[:2], ctx.has_bias and ctx.needs_input_grad[2])


def _linear_backward(grad: Tensor, x: Optional[Tensor], weight: Tensor, wants_x: bool, wants_w: bool,
                     wants_b: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(dX, dW, db)`` of ``y = x Wᵀ + b`` from ``grad = dL/dy``, each None unless wanted."""
    grad_x = onednn_linear(grad, weight.t(), None) if wants_x else None      # dY @ W
    grad_w = grad_b = None
    if wants_w or wants_b:
        grad2 = grad.reshape(-1, grad.shape[-1])
        if wants_w:
            grad_w = grad2.t().mm(x.reshape(-1, x.shape[-1]))                # dY^T X, summed over the tokens
        if wants_b:
            grad_b = grad2.sum(0)
    return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU forward (and backward) runs oneDNN's GEMM with the bias fused."""

    def forward(self, x: Tensor) -> Tensor:
        return linear_forward(x, self.weight, self.bias)


def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN (with its backward) for fp32 CPU tensors outside
    CPU autocast, else ``F.linear`` itself."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinearFunction.apply(x, weight, bias)
    return onednn_linear(x, weight, bias)


def onednn_unavailable_reason() -> Optional[str]:
    """None when :func:`use_onednn_linears` would switch layers here, else why not."""
    if "reason" not in _CHECK:
        _CHECK["reason"] = _check()
    return _CHECK["reason"]


def _check() -> Optional[str]:
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build has no oneDNN linear op"
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 7, 40, generator=gen)
        w, b = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
        g = torch.randn(3, 7, 24, generator=gen)
        errs = []
        for got, want in ((onednn_linear(x, w, b), F.linear(x.double(), w.double(), b.double())),
                          (onednn_linear(g, w.t(), None), g.double() @ w.double())):
            errs.append(float((got.double() - want).abs().max() / want.abs().max()))
        err = max(errs)
    except Exception as e:  # noqa: BLE001 - an optional fast path: any failure means "not here"
        return f"the oneDNN linear op failed: {type(e).__name__}: {e}"
    if not err <= 1e-5:
        return f"the oneDNN linear op differs from F.linear by {err:.1e}"
    return None


def use_onednn_linears(model: nn.Module, trainable: bool = False) -> int:
    """Switch the plain ``nn.Linear`` layers of a CPU fp32 model to oneDNN; returns how many.

    Without ``trainable`` only a frozen model is switched (no parameter requires a gradient):
    the teacher. With it, any CPU fp32 model (the engine's student or task model). Does nothing
    (returns 0) where :func:`onednn_unavailable_reason` gives a reason, or when the model lives
    off the CPU or is not fp32.
    """
    params = list(model.parameters())
    if not params or (not trainable and any(p.requires_grad for p in params)):
        return 0
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return 0
    if onednn_unavailable_reason() is not None:
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            n += 1
    return n


def count_onednn_linears(model: nn.Module) -> int:
    """How many of ``model``'s layers :func:`use_onednn_linears` switched."""
    return sum(type(m) is OneDNNLinear for m in model.modules())


def restore_linears(model: nn.Module) -> int:
    """Undo :func:`use_onednn_linears` (MKL's ``nn.Linear`` again); returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is OneDNNLinear:
            module.__class__ = nn.Linear
            n += 1
    return n
