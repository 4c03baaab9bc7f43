"""A compiled CPU relation KL, forward and the student's gradient in one pass (optional, with
fallback to the chunked path's blocks).

The chunked path (:mod:`toolkit.kernels.relation_kl_chunked`) on CPUs runs, per block of query
rows, two logits ``bmm`` (inner dimension: the relation head size, 32 for MiniLM shapes, where
a general GEMM runs at half the matmul peak), the compiled row kernel and one or two gradient
``bmm``, after copying and scaling every input into ``[B, R, L, d]``. ``csrc/relation_kl_fused.c``
does it all per (sample, relation head) with the shared register-blocked micro-kernel
(``csrc/microkernel.h``), reading the ``[B, L, R * d]`` projections in place: both logit rows
of 8 query rows, the row math of the row kernel on the 8 x L block in L1, then the query-side
gradient of those rows and rank-8 updates of the key-side gradient. Nothing of size L x L
exists; per thread the memory is O(L * d) (docs/KERNELS.md has the figures).

It computes what the chunked path computes (per-row KL, ``dKL/dsq``, ``dKL/dsk``) for fp32
inputs on CPUs. Built, checked (against the float64 reference with padding, head sizes that
differ between teacher and student and are not multiples of 32, the query/key form) and loaded
like the other kernels (:mod:`toolkit.kernels.compiled`); anything that goes wrong is one
warning and the chunked blocks run. ``TOOLKIT_CPU_RELATION=0`` turns it off.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from toolkit.kernels.compiled import CompiledKernel, max_rel_error

SOURCE = Path(__file__).resolve().parent / "csrc" / "relation_kl_fused.c"
ABI_VERSION = 1


def _rows(x: Tensor) -> Tensor:
    """``[B, L, H]`` with a unit stride along H (a copy only where it has not)."""
    return x if x.stride(-1) == 1 else x.contiguous()


@dataclass
class RelationKernel:
    """A loaded build of ``relation_kl_fused.c``."""

    lib: ctypes.CDLL
    path: Path
    built_s: float

    def forward(self, t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, key_valid: Optional[Tensor], heads: int,
                want_q: bool, want_k: bool,
                threads: Optional[int] = None) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """Per-row KL ``[B, R, L]`` and the gradients of its sum w.r.t. ``s_q`` and ``s_k``.

        Args:
            t_q, t_k: fp32 CPU teacher ``[B, L, Ht]``; s_q, s_k: student ``[B, L, Hs]`` (a tensor
                may be both sides: ``s_q is s_k`` gives one gradient, returned as the query side).
            key_valid: None (no padding) or ``[B, L]`` uint8, 1 for a real token.
            heads: relation heads R (divides Ht and Hs).
            want_q, want_k: which gradients to compute.
        Returns:
            ``(row_kl, d_q, d_k)``: padded query rows give 0 and no gradient; ``d_k`` is None
            when not wanted or summed into ``d_q`` (``s_q is s_k``).
        """
        tensors = (t_q, t_k, s_q, s_k)
        if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.dim() != 3 for t in tensors):
            raise ValueError("cpu_relation: fp32 CPU [B, L, H] tensors only, got "
                             + ", ".join(f"{tuple(t.shape)} {t.dtype} on {t.device}" for t in tensors))
        b, l, ht = t_q.shape
        hs = s_q.shape[-1]
        if t_k.shape != t_q.shape or s_q.shape[:2] != (b, l) or s_k.shape != s_q.shape or ht % heads or hs % heads:
            raise ValueError(f"cpu_relation: teacher {tuple(t_q.shape)}/{tuple(t_k.shape)} and student "
                             f"{tuple(s_q.shape)}/{tuple(s_k.shape)} do not split into {heads} relation heads")
        if key_valid is not None and (key_valid.dtype != torch.uint8 or key_valid.shape != (b, l)):
            raise ValueError(f"cpu_relation: key_valid must be uint8 [B, L] = {(b, l)}, got "
                             f"{key_valid.dtype} {tuple(key_valid.shape)}")
        merged = s_q is s_k and want_q and want_k
        t_q, t_k, s_q2 = _rows(t_q), _rows(t_k), _rows(s_q)
        s_k2 = s_q2 if s_k is s_q else _rows(s_k)
        row_kl = torch.empty(b, heads, l, dtype=torch.float32)
        d_q = torch.empty(b, l, hs, dtype=torch.float32) if (want_q or merged) else None
        d_k = d_q if merged else (torch.empty(b, l, hs, dtype=torch.float32) if want_k else None)
        kv = None if key_valid is None else key_valid.contiguous()
        with torch.profiler.record_function("toolkit::cpu_relation"):
            rc = self.lib.relf_forward(
                t_q.data_ptr(), t_q.stride(0), t_q.stride(1), t_k.data_ptr(), t_k.stride(0), t_k.stride(1),
                s_q2.data_ptr(), s_q2.stride(0), s_q2.stride(1), s_k2.data_ptr(), s_k2.stride(0), s_k2.stride(1),
                b, l, heads, ht // heads, hs // heads, None if kv is None else kv.data_ptr(), row_kl.data_ptr(),
                None if d_q is None else d_q.data_ptr(), None if d_k is None else d_k.data_ptr(),
                threads or torch.get_num_threads())
        if rc != 0:
            raise MemoryError(f"cpu_relation: no memory for the kernel's buffers ({self.path})")
        return row_kl, d_q, (None if merged else d_k)


def _bind(lib: ctypes.CDLL) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.relf_forward.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, i64, i64,
                                 i64, i64, i64, i64, i64, ptr, ptr, ptr, ptr, ctypes.c_int]
    lib.relf_forward.restype = ctypes.c_int


def _self_check(kernel: RelationKernel) -> None:
    from toolkit.losses.reference import relation_kl_reference

    gen = torch.Generator().manual_seed(0)
    # Ragged padding, relation head sizes 12 / 8 and 26 / 13 (not multiples of 32, teacher and
    # student apart), a length past two column tiles.
    for b, l, ht, hs, heads, lengths in ((2, 37, 48, 32, 4, (37, 20)), (2, 70, 52, 26, 2, (70, 61))):
        t = torch.randn(b, l, ht, generator=gen)
        s = torch.randn(b, l, hs, generator=gen)
        mask = (torch.arange(l)[None, :] < torch.tensor(lengths)[:, None]).long()
        for threads in (1, None):   # one thread, and as many as torch uses (never more: no oversubscription)
            row_kl, d_q, _ = kernel.forward(t, t, s, s, mask.to(torch.uint8), heads, True, True, threads=threads)
            n_rows = float(mask.sum()) * heads
            s64 = s.double().requires_grad_(True)
            want = relation_kl_reference(t.double(), s64, mask, heads)
            want.backward()
            w = float(want.detach())
            err = max(abs(float(row_kl.sum()) / n_rows - w) / abs(w),
                      max_rel_error(d_q / n_rows, s64.grad))
            if not err <= 1e-5:
                raise RuntimeError(f"the relation KL differs from float64 by {err:.1e} (B {b}, L {l}, "
                                   f"teacher {ht}, student {hs}, {heads} heads, {threads or torch.get_num_threads()} threads)")


_KERNEL = CompiledKernel(SOURCE, ABI_VERSION, "relf", "TOOLKIT_CPU_RELATION", _bind, RelationKernel, _self_check,
                         what="the compiled CPU relation KL", fallback="the chunked path's blocks run instead")

# load() builds and checks the kernel on first use (None where it cannot run), unavailable_reason()
# says why, disabled() turns it off in a block (tests, comparisons), reset() forgets it.
load, unavailable_reason, disabled, reset = _KERNEL.entry_points()
