"""A compiled CPU GEMM for linear layers: the forward (bias and exact GELU fused) and the input
gradient (optional, with fallback to oneDNN).

The distillation step at seq 128 spends ~70% of its time in the linear layers' forward and
input-gradient GEMMs, which ran on oneDNN (:mod:`toolkit.models.onednn`) at 190-210 GFLOP/s on
the AMD hosts here, 5-12% under the matmul peak. ``csrc/linear.c`` packs the weight into
32-column slivers once per call and runs the shared register-blocked micro-kernel
(``csrc/microkernel.h``) straight on the activations' rows, with the bias and the GELU in its
epilogue (docs/KERNELS.md has the figures).

:func:`toolkit.models.onednn.onednn_linear` calls it for every fp32 CPU product it is given, so
it serves whatever :func:`toolkit.models.onednn.use_onednn_linears` switched: the frozen teacher
(including its feed-forward GEMM + GELU) and the trained student's forward and input gradient.
The same library has the GELU alone and its gradient (``gelu``, ``gelu_grad``: a rational erf, no
exp, as exact as torch's fp32 ``F.gelu`` and about twice as fast as ATen's): the trained
student's feed-forward runs its activation on them (:mod:`toolkit.models.onednn`).
Built, checked (against float64, with ragged tails, a transposed weight and the GELU) and loaded
like the other kernels (:mod:`toolkit.kernels.compiled`); anything that goes wrong is one warning
and oneDNN (and ATen's GELU) runs instead. ``TOOLKIT_CPU_LINEAR=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from toolkit.cpu.compiled import CompiledKernel, max_rel_error

SOURCE = Path(__file__).resolve().parent / "csrc" / "linear.c"
ABI_VERSION = 2
#: :func:`toolkit.models.onednn.onednn_linear` sends a product here from this many rows (tokens)
#: on; below, oneDNN's GEMM is as fast or faster (benchmarks/bench_gemm.py and the distillation step
#: A/B, benchmarks/RESULTS.md runs T and U).
MIN_ROWS = 4096


@dataclass
class LinearKernel:
    """A loaded build of ``linear.c``."""

    lib: ctypes.CDLL
    path: Path
    built_s: float

    def linear(self, x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, gelu: bool = False,
               threads: Optional[int] = None) -> Tensor:
        """``x @ weight.T + bias``, through the exact GELU when ``gelu``.

        Args:
            x: fp32 CPU ``[..., in]``.
            weight: fp32 CPU ``[out, in]`` at any strides (``W.t()`` for an input gradient ``dY @ W``).
            bias: None or fp32 ``[out]``.
            gelu: apply ``F.gelu`` (erf form) to the result.
            threads: OpenMP threads (default: torch's).
        Returns:
            a contiguous fp32 ``[..., out]``.
        """
        tensors = (x, weight) if bias is None else (x, weight, bias)
        if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors):
            raise ValueError("cpu_linear: fp32 CPU tensors only, got "
                             + ", ".join(f"{t.dtype} on {t.device}" for t in tensors))
        if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or (bias is not None and bias.shape != (weight.shape[0],)):
            raise ValueError(f"cpu_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)} and bias "
                             f"{None if bias is None else tuple(bias.shape)} do not make a linear layer")
        x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if bias is not None and bias.stride(0) != 1:
            bias = bias.contiguous()
        tokens, n_in, n_out = x2.shape[0], x2.shape[1], weight.shape[0]
        y = torch.empty(*x.shape[:-1], n_out, dtype=torch.float32)
        with torch.profiler.record_function("toolkit::cpu_linear"):
            rc = self.lib.lin_gemm(x2.data_ptr(), x2.stride(0), weight.data_ptr(), weight.stride(0), weight.stride(1),
                                   bias.data_ptr() if bias is not None else None, y.data_ptr(), tokens, n_in, n_out,
                                   int(gelu), threads or torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"cpu_linear: no memory for the kernel's packing buffers ({self.path})")
        return y

    def gelu(self, x: Tensor) -> Tensor:
        """``F.gelu(x)`` (erf form) of a contiguous fp32 CPU tensor, as a new tensor."""
        _check_elementwise("gelu", x)
        y = torch.empty_like(x)
        with torch.profiler.record_function("toolkit::cpu_gelu"):
            self.lib.lin_gelu(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
        return y

    def gelu_grad(self, h: Tensor, grad: Tensor) -> Tensor:
        """The gradient of ``F.gelu`` at its input ``h`` from its output's ``grad`` (both contiguous fp32 CPU)."""
        _check_elementwise("gelu_grad", h, grad)
        dx = torch.empty_like(h)
        with torch.profiler.record_function("toolkit::cpu_gelu_backward"):
            self.lib.lin_gelu_grad(h.data_ptr(), grad.data_ptr(), dx.data_ptr(), h.numel(), torch.get_num_threads())
        return dx


def _check_elementwise(what: str, *tensors: Tensor) -> None:
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() or t.shape != tensors[0].shape
           for t in tensors):
        raise ValueError(f"cpu_linear: {what} needs contiguous fp32 CPU tensors of one shape, got "
                         + ", ".join(f"{t.dtype} {tuple(t.shape)} on {t.device}" for t in tensors))


def _bind(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.lin_gemm.argtypes = [ptr, i64, ptr, i64, i64, ptr, ptr, i64, i64, i64, ctypes.c_int, ctypes.c_int]
    lib.lin_gemm.restype = ctypes.c_int
    lib.lin_gelu.argtypes = [ptr, ptr, i64, ctypes.c_int]
    lib.lin_gelu.restype = None
    lib.lin_gelu_grad.argtypes = [ptr, ptr, ptr, i64, ctypes.c_int]
    lib.lin_gelu_grad.restype = None


def reference(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, gelu: bool = False) -> Tensor:
    """What :meth:`LinearKernel.linear` computes, in float64."""
    y = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    return F.gelu(y) if gelu else y


def _self_check(kernel: LinearKernel) -> None:
    gen = torch.Generator().manual_seed(0)
    # Tails of tokens (not a multiple of 8), outputs (of 32) and inputs (two blocks of 384), a
    # strided x, a transposed weight (the input gradient), the GELU.
    x = torch.randn(45, 430, generator=gen)[:, :400] * 2.0
    w, b = torch.randn(70, 400, generator=gen) / 20.0, torch.randn(70, generator=gen)
    # Threads: one, and as many as torch uses (never more, so no core is oversubscribed).
    cases = ((x, w, b, False, None), (x, w, b, True, None), (x, w, None, True, 1),
             (x[:, :70], torch.randn(70, 33, generator=gen).t(), None, False, None))
    for xx, ww, bb, gelu, threads in cases:
        err = max_rel_error(kernel.linear(xx, ww, bb, gelu=gelu, threads=threads), reference(xx, ww, bb, gelu))
        if not err <= 1e-5:
            raise RuntimeError(f"the linear GEMM differs from float64 by {err:.1e} (x {tuple(xx.shape)}, weight "
                               f"{tuple(ww.shape)}, bias {bb is not None}, gelu {gelu}, {threads or torch.get_num_threads()} threads)")
    # The GELU and its gradient alone, over the range where they are not flat (tails included).
    h = torch.linspace(-7.0, 7.0, 1001)
    g = torch.randn(1001, generator=gen)
    hd = h.double().requires_grad_()
    torch.nn.functional.gelu(hd).backward(g.double())
    for what, got, want in (("GELU", kernel.gelu(h), F.gelu(h.double())),
                            ("GELU gradient", kernel.gelu_grad(h, g), hd.grad)):
        err = float((got.double() - want).abs().max())
        if not err <= 2e-6:
            raise RuntimeError(f"the {what} differs from float64 by {err:.1e} (absolute, inputs in [-7, 7])")


_KERNEL = CompiledKernel(SOURCE, ABI_VERSION, "lin", _bind, LinearKernel, _self_check,
                         what="the compiled CPU linear GEMM and GELU",
                         fallback="oneDNN's GEMM and ATen's GELU run instead")

# load() builds and checks the kernel on first use (None where it cannot run), unavailable_reason()
# says why, disabled() turns it off in a block (tests, comparisons), reset() forgets it.
load, unavailable_reason, disabled, reset = _KERNEL.entry_points()
