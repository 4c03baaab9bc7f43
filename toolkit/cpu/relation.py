"""The relation KL as one compiled CPU kernel, registered as ``cpu_fused`` in the relation-KL
registry (:mod:`toolkit.losses.relation_kl`).

The chunked PyTorch path runs, per block of query rows, two logits ``bmm`` (inner dimension:
the relation head size, 32 for MiniLM shapes, where a general GEMM is far from the matmul
peak), about ten elementwise passes over ``[b, R, rows, L]`` and one or two gradient ``bmm``,
after copying and scaling every input into ``[B, R, L, d]``. ``csrc/relation_kl_fused.c`` does
it all per (sample, relation head) with the shared register-blocked micro-kernel
(``csrc/microkernel.h``), reading the ``[B, L, R * d]`` projections in place: both logit rows
of 8 query rows, the row math (``csrc/relation_row.h``) on the 8 x L block in L1, then the
query-side gradient of those rows and rank-8 updates of the key-side gradient. Nothing of size
L x L exists; per thread the memory is O(L * d).

It computes what the chunked path computes (the mean row KL, and in the same pass the
student's gradient, which the backward only scales) for fp32 CPU inputs. Built and checked
(against the float64 reference with padding, head sizes that differ between teacher and student
and are not multiples of 32) on first use (:mod:`toolkit.cpu.compiled`); where it cannot run,
``auto`` keeps the chunked path.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

from toolkit.cpu.compiled import CompiledKernel, max_rel_error
from toolkit.losses.relation_kl import register_relation_kl, validate_relation_inputs

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


_KERNEL = CompiledKernel(SOURCE, ABI_VERSION, "relf", _bind, RelationKernel, _self_check,
                         what="the compiled CPU relation KL", fallback="the chunked path runs instead")

# load() builds and checks the kernel on first use (None where it cannot run), unavailable_reason()
# says why, disabled() turns it off in a block (tests, comparisons), reset() forgets it.
load, unavailable_reason, disabled, reset = _KERNEL.entry_points()


#: The name the kernel has in the relation-KL registry.
NAME = "cpu_fused"


class _FusedRelationKL(torch.autograd.Function):
    """The kernel's forward, which also computes the student's gradient; the backward scales it."""

    @staticmethod
    def forward(ctx, t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor, heads: int,  # noqa: ANN001
                want_q: bool, want_k: bool) -> Tensor:
        valid = mask.to(torch.bool)
        key_valid = None if bool(valid.all()) else valid.to(torch.uint8)
        row_kl, d_q, d_k = load().forward(t_q, t_k, s_q, s_k, key_valid, heads, want_q, want_k)
        n_rows = valid.sum().clamp_min(1).to(torch.float32) * heads
        grad_q = None if d_q is None else d_q.div_(n_rows)     # one tensor on both sides: summed in d_q
        grad_k = None if d_k is None else d_k.div_(n_rows)
        ctx.save_for_backward(*(x for x in (grad_q, grad_k) if x is not None))
        ctx.have = (grad_q is not None, grad_k is not None)
        return row_kl.sum() / n_rows

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:  # noqa: ANN001
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_out if has else None for has in ctx.have]
        return (None, None, grads[0], grads[1]) + (None,) * 4


def relation_kl_fused(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor, num_relation_heads: int,
                      chunk_size: Optional[int] = None) -> Tensor:
    """The relation KL (contract of :func:`toolkit.losses.relation_kl.chunked.relation_kl_qk`) on
    the compiled kernel; fp32 CPU tensors only (``chunk_size`` is ignored)."""
    validate_relation_inputs(t_q, t_k, s_q, s_k, mask, num_relation_heads, who="relation KL (cpu_fused)")
    if not supports(t_q, t_k, s_q, s_k):
        raise ValueError("relation KL (cpu_fused): needs fp32 CPU tensors and the compiled kernel "
                         f"({unavailable_reason() or 'not fp32 CPU tensors'})")
    t_q_d = t_q.detach()
    t_k_d = t_q_d if t_k is t_q else t_k.detach()
    grad_on = torch.is_grad_enabled()
    return _FusedRelationKL.apply(t_q_d, t_k_d, s_q, s_k, mask.detach(), num_relation_heads,
                                  grad_on and s_q.requires_grad, grad_on and s_k.requires_grad)


def supports(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor) -> bool:
    """fp32 CPU tensors, and a kernel that builds here."""
    return (all(x.device.type == "cpu" and x.dtype == torch.float32 for x in (t_q, t_k, s_q, s_k))
            and load() is not None)


def register() -> bool:
    """Add the kernel to the relation-KL registry when it builds here; whether it did."""
    if load() is None:
        return False
    register_relation_kl(NAME, relation_kl_fused, supports=supports, priority=10,
                         describe=lambda *_: f"{NAME} (the compiled CPU kernel, 8 query rows at a time per sample "
                                             f"and relation head)")
    return True
