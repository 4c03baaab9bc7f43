"""A compiled CPU attention for small head sizes, forward and backward (optional, with fallback to sdpa).

At the MiniLM shapes (head size 32, 128 tokens) torch's CPU flash-attention kernel runs at about
a third of the fp32 GEMM peak: its blocks go through a general GEMM whose inner dimension is the
head size. ``csrc/attention.c`` packs K^T once per (sample, head) and runs register-blocked
micro-kernels for ``Q K^T`` and ``P V`` around the row softmax, and for the backward's five
products (docs/KERNELS.md has the figures).

* **Forward**: ``out`` and ``logsumexp`` in the layouts of torch's CPU flash op
  ``aten::_scaled_dot_product_flash_attention_for_cpu``.
* **Backward**: from ``out`` and ``logsumexp`` (``S`` recomputed, as flash attention does), so
  the memory kept for the backward is what sdpa keeps (Q, K, V, out, logsumexp, the mask).

:func:`use_cpu_attention` switches a model's ``"sdpa"`` attention to the name this module
registers with transformers (``"toolkit_cpu"``, masks built as for sdpa; not saved by
``save_pretrained``). The attention function runs the kernel only where it applies (fp32 CPU
tensors outside autocast, no attention dropout in training, not causal, a boolean or no mask, the
same number of heads for Q, K and V) and hands everything else to transformers' sdpa function,
so a switched model that moves to a GPU, to bf16 or into training with attention dropout runs
as before.

The C file is built on first use like :mod:`toolkit.kernels.cpu_rows` (same compiler search and
cache) and checked against float64 attention before it is used; anything that goes wrong is
reported once as a warning and sdpa runs instead. ``TOOLKIT_CPU_ATTENTION=0`` turns it off.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from toolkit.cpu.compiled import CompiledKernel

SOURCE = Path(__file__).resolve().parent / "csrc" / "attention.c"
ABI_VERSION = 2
#: The attention-implementation name registered with transformers.
ATTN_NAME = "toolkit_cpu"


@dataclass
class AttentionKernel:
    """A loaded build of ``attention.c``."""

    lib: ctypes.CDLL
    path: Path
    built_s: float

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
        """``softmax(scale q k^T + mask) v`` and its logsumexp.

        Args:
            q, k, v: fp32 CPU ``[B, H, L, D]`` (``Lk`` for k and v), any strides with a
                contiguous last dimension (the transposed views of ``[B, L, H, D]`` projections).
            mask: None, or a bool tensor broadcastable to ``[B, H, Lq, Lk]``, True = attend.
            scale: the logits' scale.

        Returns:
            ``out`` ``[B, H, Lq, D]`` (memory ``[B, Lq, H, D]``) and ``lse`` ``[B, H, Lq]``
            (memory ``[B, Lq, H]``), as torch's CPU flash op returns them.
        """
        b, h, lq, d = q.shape
        lk = k.shape[2]
        for name, t in (("query", q), ("key", k), ("value", v)):
            if t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 4 or t.stride(-1) != 1:
                raise ValueError(f"cpu_attention: {name} must be a 4-D fp32 CPU tensor with a contiguous last "
                                 f"dimension, got {tuple(t.shape)} {t.dtype} strides {t.stride()}")
        if tuple(k.shape) != (b, h, lk, d) or tuple(v.shape) != (b, h, lk, d):
            raise ValueError(f"cpu_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} "
                             f"do not match")
        mask_ptr, mstrides = None, (0, 0, 0, 0)
        if mask is not None:
            if mask.dtype != torch.bool or mask.dim() != 4:
                raise ValueError(f"cpu_attention: the mask must be a 4-D bool tensor, got {tuple(mask.shape)} "
                                 f"{mask.dtype}")
            m = mask.expand(b, h, lq, lk)         # broadcast dims get stride 0
            mask_ptr = m.data_ptr()
            mstrides = tuple(m.stride())
        out = torch.empty(b, lq, h, d, dtype=torch.float32)
        lse = torch.empty(b, lq, h, dtype=torch.float32)
        rc = self.lib.attn_fwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), b, h, lq, lk, d,
                               q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                               v.stride(0), v.stride(1), v.stride(2), mask_ptr, *mstrides, float(scale),
                               out.data_ptr(), lse.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"cpu_attention: the kernel could not allocate its scratch memory "
                              f"(B={b}, H={h}, Lq={lq}, Lk={lk}, D={d})")
        return out.transpose(1, 2), lse.transpose(1, 2)

    def backward(self, grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                 mask: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor, Tensor]:
        """Gradients of Q, K and V (``[B, H, L, D]`` views of contiguous ``[B, L, H, D]``) from the
        output's gradient ``grad`` and what :meth:`forward` returned for these inputs."""
        b, h, lq, d = q.shape
        lk = k.shape[2]
        if grad.shape != q.shape or grad.dtype != torch.float32 or grad.stride(-1) != 1:
            grad = grad.to(torch.float32).contiguous()
        if not (out.transpose(1, 2).is_contiguous() and lse.transpose(1, 2).is_contiguous()):
            raise ValueError("cpu_attention: backward needs the out and logsumexp that forward returned")
        mask_ptr, mstrides = None, (0, 0, 0, 0)
        if mask is not None:
            m = mask.expand(b, h, lq, lk)
            mask_ptr, mstrides = m.data_ptr(), tuple(m.stride())
        dq = torch.empty(b, lq, h, d, dtype=torch.float32)
        dk = torch.empty(b, lk, h, d, dtype=torch.float32)
        dv = torch.empty(b, lk, h, d, dtype=torch.float32)
        rc = self.lib.attn_bwd(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), grad.data_ptr(),
                               lse.data_ptr(), b, h, lq, lk, d, q.stride(0), q.stride(1), q.stride(2), k.stride(0),
                               k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), grad.stride(0),
                               grad.stride(1), grad.stride(2), mask_ptr, *mstrides, float(scale), dq.data_ptr(),
                               dk.data_ptr(), dv.data_ptr(), torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"cpu_attention: the backward could not allocate its scratch memory "
                              f"(B={b}, H={h}, Lq={lq}, Lk={lk}, D={d})")
        return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _bind(lib: ctypes.CDLL) -> None:
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.attn_fwd.argtypes = [ptr, ptr, ptr] + [i64] * 5 + [i64] * 9 + [ptr] + [i64] * 4 + [ctypes.c_float, ptr, ptr,
                                                                                             cint]
    lib.attn_fwd.restype = cint
    lib.attn_bwd.argtypes = [ptr] * 6 + [i64] * 5 + [i64] * 12 + [ptr] + [i64] * 4 + [ctypes.c_float, ptr, ptr, ptr,
                                                                                       cint]
    lib.attn_bwd.restype = cint


def reference(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tuple[Tensor, Tensor]:
    """float64 attention (out ``[B, H, Lq, D]``, logsumexp ``[B, H, Lq]``); rows whose keys are
    all masked give 0 and 0, as torch's CPU flash kernel does."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    dead = torch.isinf(lse)
    p = torch.exp(s - lse.masked_fill(dead, 0.0)[..., None])
    out = p @ v.double()
    return out.masked_fill(dead[..., None], 0.0), lse.masked_fill(dead, 0.0)


def _self_check(kernel: AttentionKernel) -> None:
    """The build against float64 attention: ragged padding, a query-dependent mask with a fully
    masked row, a head size that is not a multiple of the vector width, strided inputs."""
    gen = torch.Generator().manual_seed(0)
    b, h, length, d = 2, 3, 37, 20
    x = torch.randn(b, length, 3 * h * d, generator=gen) * 2.0
    q, k, v = (t.view(b, length, h, d).transpose(1, 2) for t in x.split(h * d, dim=-1))
    valid = torch.ones(b, length, dtype=torch.bool)
    valid[1, 29:] = False
    tril = torch.ones(length, length, dtype=torch.bool).tril()
    tril[5] = False
    g = torch.randn(b, h, length, d, generator=gen)
    for mask in (None, valid[:, None, None, :], tril[None, None] & valid[:, None, None, :]):
        out, lse = kernel.forward(q, k, v, mask, d ** -0.5)
        ref_out, ref_lse = reference(q, k, v, mask, d ** -0.5)
        grads = kernel.backward(g, q, k, v, out, lse, mask, d ** -0.5)
        qkv = [t.double().requires_grad_() for t in (q, k, v)]
        ref_grads = torch.autograd.grad(reference(*qkv, mask, d ** -0.5)[0], qkv, g.double())
        checks = [("output", out, ref_out), ("logsumexp", lse, ref_lse)]
        checks += [(f"gradient of {n}", got, want) for n, got, want in zip("QKV", grads, ref_grads)]
        for what, got, want in checks:
            err = float((got.double() - want).abs().max())
            if not err <= 1e-5 * (1.0 + float(want.abs().max())):
                raise RuntimeError(f"{kernel.path}: {what} differs from float64 attention by {err:.2e}")


_KERNEL = CompiledKernel(SOURCE, ABI_VERSION, "attn", _bind, AttentionKernel, _self_check,
                         "attention: the compiled CPU attention kernel", "torch's sdpa runs instead")


# load() builds and checks the kernel on first use (None where it cannot run), unavailable_reason()
# says why, disabled() turns it off in a block (tests, comparisons), reset() forgets it.
load, unavailable_reason, disabled, reset = _KERNEL.entry_points()


class _CPUAttentionFunction(torch.autograd.Function):
    """The kernel's forward and backward (differentiable once, as sdpa's flash kernel)."""

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
        kernel = load()
        with torch.profiler.record_function("toolkit::cpu_attention_fwd"):
            out, lse = kernel.forward(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.scale = scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        q, k, v, out, lse, mask = ctx.saved_tensors
        with torch.profiler.record_function("toolkit::cpu_attention_bwd"):
            dq, dk, dv = load().backward(grad, q, k, v, out, lse, mask, ctx.scale)
        return dq, dk, dv, None, None


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, scale: Optional[float] = None) -> Tensor:
    """``scaled_dot_product_attention(q, k, v, mask, scale=scale)`` (no dropout, not causal) on the
    kernel, differentiable; torch's sdpa where the kernel does not apply (see :func:`applies`)."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if applies(q, k, v, mask):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _CPUAttentionFunction.apply(q, k, v, mask, scale)
        with torch.profiler.record_function("toolkit::cpu_attention_fwd"):
            return load().forward(q, k, v, mask, scale)[0]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def applies(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> bool:
    """True when the kernel can compute this attention: fp32 CPU ``[B, H, L, D]`` tensors with
    contiguous last dimensions, one head count and head size, outside CPU autocast, a bool or no
    mask, and a loaded kernel."""
    if q.device.type != "cpu" or torch.is_autocast_enabled("cpu"):
        return False
    if any(t.dtype != torch.float32 or t.dim() != 4 or t.stride(-1) != 1 for t in (q, k, v)):
        return False
    if k.shape != v.shape or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or 0 in q.shape or 0 in k.shape:
        return False
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4:
            return False
        try:
            torch.broadcast_shapes(mask.shape, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
        except RuntimeError:
            return False
    return load() is not None


def hf_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                 dropout: float = 0.0, scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                 **kwargs: Any) -> Tuple[Tensor, None]:
    """The attention function registered with transformers as ``"toolkit_cpu"``.

    Same contract as transformers' sdpa function (``query`` ``[B, H, L, D]``, returns
    ``[B, L, H, D]`` and no weights); the kernel runs where it applies and there is no dropout to
    do and nothing causal, anything else goes to that function unchanged.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(causal and query.shape[2] > 1 and attention_mask is None)
    drop = dropout if module.training else 0.0
    if (not causal and not drop and kwargs.get("position_bias") is None and kwargs.get("s_aux") is None
            and applies(query, key, value, attention_mask)):
        scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
        out = attention(query, key, value, attention_mask, scale)
        return out.transpose(1, 2).contiguous(), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register() -> None:
    """Register :func:`hf_attention` (and sdpa's mask builder) with transformers under ATTN_NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, hf_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _configs(model: nn.Module) -> Iterator[Any]:
    seen = set()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            yield cfg


def _top_models(model: nn.Module) -> List[Any]:
    """The transformers models in ``model`` that no other one contains (``set_attn_implementation``
    of each covers its submodels)."""
    from transformers import PreTrainedModel

    tops: List[Any] = []
    covered: set = set()
    for module in model.modules():      # a parent comes before its children
        if id(module) not in covered and isinstance(module, PreTrainedModel):
            tops.append(module)
            covered.update(id(m) for m in module.modules())
    return tops


def _switch(model: nn.Module, src: str, dst: str) -> int:
    n = 0
    for top in _top_models(model):
        if top.config._attn_implementation == src:
            top.set_attn_implementation(dst)
            n += 1
    return n


def use_cpu_attention(model: nn.Module) -> int:
    """Switch a CPU fp32 model's sdpa attention to the kernel's; returns how many models changed.

    Only models on ``"sdpa"`` change (a model on eager or flash attention stays as it is). Does
    nothing when the kernel cannot run here, or when the model lives off the CPU or is not fp32.
    """
    params = list(model.parameters())
    if not params or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return 0
    if load() is None:
        return 0
    register()
    return _switch(model, "sdpa", ATTN_NAME)


def uses_cpu_attention(model: nn.Module) -> bool:
    """Whether :func:`use_cpu_attention` switched ``model``."""
    return any(cfg._attn_implementation == ATTN_NAME for cfg in _configs(model))


def restore_attention(model: nn.Module) -> int:
    """Undo :func:`use_cpu_attention` (sdpa again); returns how many models changed."""
    return _switch(model, ATTN_NAME, "sdpa")
