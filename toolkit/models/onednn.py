"""oneDNN GEMMs for a frozen model's linear layers on CPUs (the distillation teacher).

torch sends an fp32 ``nn.Linear`` on x86 CPUs to MKL's sgemm. On the AMD EPYC hosts this
project runs on, oneDNN's fp32 GEMM (``torch.ops.mkldnn._linear_pointwise``, the op torch's
own inductor uses for frozen CPU linears) is ~17% faster for the same product: 2048^2 at 2
threads 214.8 against 183.9 GFLOP/s (the benchmark's own probe), and the distillation step
1-4% shorter (benchmarks/RESULTS.md run N). It also adds the bias inside the GEMM instead of copying it into the output first, as ``addmm`` does.

:func:`use_onednn_linears` switches every plain ``nn.Linear`` of a *frozen* model to
:class:`FrozenOneDNNLinear` by changing the module's class: parameters, state-dict keys and
registered hooks (the Q/K/V captures) stay as they are. Its forward takes the oneDNN op only
for fp32 CPU tensors with no gradient wanted, and ``nn.Linear``'s otherwise, so a model that
moves to a GPU or is unfrozen keeps working. The results differ from MKL's in the last bits
(~2e-6 relative on the teacher's Q/K/V). Before the first switch in a process the op is
checked against ``F.linear``; a missing op, a failed check or ``TOOLKIT_ONEDNN_LINEAR=0``
leaves the model alone (the reason is in :func:`onednn_unavailable_reason`).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_DISABLE_VALUES = ("0", "false", "off", "no")
_CHECK: dict = {}


class FrozenOneDNNLinear(nn.Linear):
    """``nn.Linear`` whose no-grad fp32 CPU forward runs oneDNN's GEMM with the bias fused."""

    def forward(self, x: Tensor) -> Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return super().forward(x)


def onednn_unavailable_reason() -> Optional[str]:
    """None when :func:`use_onednn_linears` would switch layers here, else why not."""
    value = os.environ.get("TOOLKIT_ONEDNN_LINEAR", "").strip().lower()
    if value in _DISABLE_VALUES:
        return f"turned off by TOOLKIT_ONEDNN_LINEAR={value}"
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
        got = torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        want = F.linear(x.double(), w.double(), b.double())
        err = float((got.double() - want).abs().max() / want.abs().max())
    except Exception as e:  # noqa: BLE001 - an optional fast path: any failure means "not here"
        return f"the oneDNN linear op failed: {type(e).__name__}: {e}"
    if not err <= 1e-5:
        return f"the oneDNN linear op differs from F.linear by {err:.1e}"
    return None


def use_onednn_linears(model: nn.Module) -> int:
    """Switch the plain ``nn.Linear`` layers of a frozen CPU fp32 model to oneDNN; returns how many.

    Does nothing (returns 0) where :func:`onednn_unavailable_reason` gives a reason, or when the
    model has parameters that require gradients, or lives off the CPU, or is not fp32.
    """
    params = list(model.parameters())
    if not params or any(p.requires_grad for p in params):
        return 0
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return 0
    if onednn_unavailable_reason() is not None:
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FrozenOneDNNLinear
            n += 1
    return n


def restore_linears(model: nn.Module) -> int:
    """Undo :func:`use_onednn_linears` (e.g. before training a model that was frozen)."""
    n = 0
    for module in model.modules():
        if type(module) is FrozenOneDNNLinear:
            module.__class__ = nn.Linear
            n += 1
    return n
