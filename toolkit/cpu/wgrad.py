"""A compiled CPU kernel for a linear layer's weight gradient (optional, with fallback to torch's ``mm``).

The trained student's linears run their forward and input gradient on oneDNN
(:mod:`toolkit.models.onednn`); the weight gradient ``dW = dYᵀ X`` is a product that reduces
over the tokens (4096 of them at batch 32 x seq 128) and went to MKL's sgemm, which runs it at
~87% of the oneDNN matmul peak in the step on the AMD hosts here, and oneDNN itself is slower
still for this shape. ``csrc/wgrad.c`` packs X per block of tokens and runs a register-blocked
micro-kernel (8 x 32 of dW in 16 AVX-512 accumulators) that broadcasts dY, which is already in
the layout a GEMM packs into. Each thread takes its own range of tokens (so dY and X, cold in a
backward pass, are read once, with software prefetches ahead of the micro-kernel) and the
threads' partial sums are added at the end. The bias gradient ``db = Σ dY`` comes from the same
packed slivers, so the separate ``sum`` pass goes too (docs/KERNELS.md has the figures).

Built, checked (against float64, with ragged tails and strided inputs) and loaded like the other
kernels (:mod:`toolkit.kernels.compiled`); anything that goes wrong is one warning and ``mm``
runs instead. ``TOOLKIT_CPU_WGRAD=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from toolkit.cpu.compiled import CompiledKernel, max_rel_error

SOURCE = Path(__file__).resolve().parent / "csrc" / "wgrad.c"
ABI_VERSION = 1


def _rows(t: Tensor) -> Tensor:
    """``t`` as ``[tokens, features]`` with a unit feature stride (a view where possible)."""
    t2 = t.reshape(math.prod(t.shape[:-1]), t.shape[-1])
    if t2.stride(-1) != 1:
        t2 = t2.contiguous()
    return t2


@dataclass
class WgradKernel:
    """A loaded build of ``wgrad.c``."""

    lib: ctypes.CDLL
    path: Path
    built_s: float

    def weight_grad(self, grad: Tensor, x: Tensor, with_bias: bool,
                    threads: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """``(dW, db)`` of ``y = x Wᵀ + b`` from ``grad = dL/dy``.

        Args:
            grad: fp32 CPU ``[..., out_features]``.
            x: fp32 CPU ``[..., in_features]``, the same leading shape.
            with_bias: also return ``db = grad`` summed over the leading dimensions (else None).
            threads: OpenMP threads (default: torch's).
        """
        if grad.dtype != torch.float32 or x.dtype != torch.float32 or grad.device.type != "cpu" \
                or x.device.type != "cpu":
            raise ValueError(f"cpu_wgrad: fp32 CPU tensors only, got {grad.dtype} on {grad.device} "
                             f"and {x.dtype} on {x.device}")
        g2, x2 = _rows(grad), _rows(x)
        if g2.shape[0] != x2.shape[0]:
            raise ValueError(f"cpu_wgrad: grad has {g2.shape[0]} rows and x {x2.shape[0]} "
                             f"(shapes {tuple(grad.shape)} and {tuple(x.shape)})")
        tokens, m, n = g2.shape[0], g2.shape[1], x2.shape[1]
        dw = torch.empty(m, n, dtype=torch.float32)
        db = torch.empty(m, dtype=torch.float32) if with_bias else None
        with torch.profiler.record_function("toolkit::cpu_wgrad"):
            rc = self.lib.wg_gemm(g2.data_ptr(), g2.stride(0), x2.data_ptr(), x2.stride(0), tokens, m, n,
                                  dw.data_ptr(), n, db.data_ptr() if db is not None else None,
                                  threads or torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"cpu_wgrad: no memory for the kernel's packing buffers ({self.path})")
        return dw, db


def _bind(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.wg_gemm.argtypes = [ptr, i64, ptr, i64, i64, i64, i64, ptr, i64, ptr, ctypes.c_int]
    lib.wg_gemm.restype = ctypes.c_int


def reference(grad: Tensor, x: Tensor) -> Tuple[Tensor, Tensor]:
    """``(dW, db)`` in float64."""
    g2 = grad.reshape(-1, grad.shape[-1]).double()
    return g2.t() @ x.reshape(-1, x.shape[-1]).double(), g2.sum(0)


def _self_check(kernel: WgradKernel) -> None:
    gen = torch.Generator().manual_seed(0)
    # Ragged tails in every dimension, more than one block of tokens per thread, a strided dY,
    # one thread and two (the token split and its partial sums), too few tokens to split.
    # Threads: one, and as many as torch uses (never more, so no core is oversubscribed).
    for tokens, m, n, threads in ((600, 13, 70, None), (300, 24, 20, 1), (40, 9, 33, None)):
        wide = torch.randn(tokens, m + 5, generator=gen)
        grad, x = wide[:, :m], torch.randn(tokens, n, generator=gen)
        dw, db = kernel.weight_grad(grad, x, True, threads=threads)
        want_w, want_b = reference(grad, x)
        err = max(max_rel_error(dw, want_w), max_rel_error(db, want_b))
        if not err <= 1e-5:
            raise RuntimeError(f"the weight gradient differs from float64 by {err:.1e} "
                               f"(tokens {tokens}, out {m}, in {n}, {threads or torch.get_num_threads()} threads)")


_KERNEL = CompiledKernel(SOURCE, ABI_VERSION, "wg", _bind, WgradKernel, _self_check,
                         what="the compiled CPU weight-gradient kernel", fallback="torch's mm runs instead")

# load() builds and checks the kernel on first use (None where it cannot run), unavailable_reason()
# says why, disabled() turns it off in a block (tests, comparisons), reset() forgets it.
load, unavailable_reason, disabled, reset = _KERNEL.entry_points()
