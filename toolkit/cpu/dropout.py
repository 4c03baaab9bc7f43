"""Dropout with a cheaper CPU mask.

``torch.nn.functional.dropout`` on CPU draws one Bernoulli sample per element from the single
MT19937 stream, 3% of a seq-128 distillation step (benchmarks/RESULTS.md, run D). :class:`FastDropout` draws half as many 32-bit words and cuts each
into two 15-bit uniforms, then keeps an element when its uniform is at least
``k = round(p * 2^15)``: several times cheaper for the whole dropout (forward and backward,
``benchmarks/bench_dropout.py``), with the same expectation
(outputs are scaled by ``1 / (1 - k / 2^15)``, the exact keep rate). The drop probability is
therefore ``p`` rounded to a multiple of ``2^-15`` (0.1 becomes 0.100006). On CPUs the uniforms
come from a compiled counter-based generator (splitmix64, every thread; ``toolkit/kernels/
cpu_dropout.py``, ``TOOLKIT_CPU_DROPOUT=0`` keeps ``random_()``) seeded from torch's. The mask is saved as
bool (1 byte per element), as PyTorch's own dropout does; the generator is torch's default CPU
generator, so ``torch.manual_seed``, checkpointed RNG states and activation checkpointing
(which replays the RNG state) reproduce it exactly. On other devices it is plain
``F.dropout`` (CUDA's fused Philox dropout is already fast).
"""
from __future__ import annotations

from typing import Any, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.cpu import dropout_kernel as cpu_dropout

_BITS = 15
_LEVELS = 1 << _BITS


def keep_threshold(p: float) -> int:
    """``k``: an element is kept when its 15-bit uniform is >= k, so the drop rate is k / 2^15."""
    return int(round(p * _LEVELS))


def keep_mask(shape: torch.Size, p: float) -> Tensor:
    """Bool mask of ``shape`` on CPU, each element True (kept) with probability ``1 - k / 2^15``.

    On CPUs with the compiled generator (:mod:`toolkit.kernels.cpu_dropout`) the uniforms come
    from a splitmix64 stream seeded from torch's generator, on every thread. Otherwise one
    ``int32.random_()`` word holds 31 uniform bits (``[0, 2^31)``); its low and high 16-bit
    halves each give 15 independent uniform bits after masking the top bit.
    """
    n = 1
    for s in shape:
        n *= int(s)
    kernel = cpu_dropout.load()
    if kernel is not None:
        # The compiled counter-based generator, seeded from torch's generator (reproducible).
        seed = int(torch.empty((), dtype=torch.int64).random_())
        return kernel.keep_mask(n, keep_threshold(p), seed).view(shape)
    words = torch.empty((n + 1) // 2, dtype=torch.int32).random_()
    halves = words.view(torch.int16)[:n]
    return torch.bitwise_and(halves, _LEVELS - 1).ge(keep_threshold(p)).view(shape)   # bool, 1 byte each


def _masked_scale(x: Tensor, keep: Tensor, scale: float) -> Tensor:
    # ``x * keep * scale``, forward and backward alike: one pass of the compiled kernel for fp32
    # (toolkit/kernels/cpu_dropout.py), else ATen's dropout-backward kernel (one call, cheaper than
    # a bool multiply plus a scale).
    kernel = (cpu_dropout.load() if x.dtype == torch.float32 and keep.dtype == torch.bool and x.is_contiguous()
              and keep.is_contiguous() else None)
    if kernel is not None:
        return kernel.masked_scale(x, keep, scale)
    return torch.ops.aten.native_dropout_backward(x, keep, scale)


class _MaskedScale(torch.autograd.Function):
    """``x * keep * scale`` saving only the bool mask for the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return _masked_scale(x, keep, scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None, None]:
        keep, = ctx.saved_tensors
        return _masked_scale(grad, keep, ctx.scale), None, None


def fast_dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Functional form of :class:`FastDropout`."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0 or not x.is_floating_point():
        return F.dropout(x, p, training)
    k = keep_threshold(p)
    if k == 0:
        return x
    if k >= _LEVELS:          # p within 2^-16 of 1: every element is dropped
        return x * 0.0
    keep = keep_mask(x.shape, p)
    return _MaskedScale.apply(x, keep, float(_LEVELS) / (_LEVELS - k))


class FastDropout(nn.Dropout):
    """Drop-in :class:`torch.nn.Dropout` with the cheaper CPU mask (see the module docstring).

    ``inplace=True`` modules keep torch's in-place dropout (the mask trick needs an output
    tensor of its own); BERT/ERNIE use none.
    """

    def forward(self, x: Tensor) -> Tensor:
        if self.inplace:
            return F.dropout(x, self.p, self.training, inplace=True)
        return fast_dropout(x, self.p, self.training)


def use_fast_dropout(model: nn.Module) -> int:
    """Swap every plain ``nn.Dropout`` in ``model`` for :class:`FastDropout` (same ``p``) in place.

    Returns:
        How many modules were swapped (parameters and state dict are unchanged: dropout has none).
    """
    swapped = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Dropout:
                setattr(module, child_name, FastDropout(child.p, inplace=child.inplace))
                swapped += 1
    return swapped


def restore_dropout(model: nn.Module) -> int:
    """Undo :func:`use_fast_dropout` (``nn.Dropout`` again, same ``p``); returns how many modules."""
    swapped = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is FastDropout:
                setattr(module, child_name, nn.Dropout(child.p, inplace=child.inplace))
                swapped += 1
    return swapped
