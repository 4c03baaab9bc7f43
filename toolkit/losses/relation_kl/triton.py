"""Fused Triton relation KL (MiniLMv2) with a recomputing backward, flash-attention style.

Same contract as :func:`toolkit.losses.relation_kl.chunked.relation_kl_qk` (registered as
``triton`` in :mod:`toolkit.losses.relation_kl`, which calls it for CUDA tensors): for each
relation head ``r`` the teacher row ``i`` is ``p_t = softmax_j(tq_i . tk_j / sqrt(dt))`` over
real keys ``j``, the student row ``p_s`` likewise with ``sqrt(ds)``, and the loss is
``KL(p_t || p_s)`` averaged over the real query rows of the batch and the ``R`` heads.

One program handles one (batch, head, query block) and never holds more than a
``[BLOCK_M, BLOCK_N]`` tile of logits, in registers:

* pass 1 over key blocks: online max / sum-exp of teacher and student rows -> ``lse_t, lse_s``;
* pass 2 over key blocks: ``kl_i = sum_j p_t (log p_t - log p_s)`` from the stored LSEs.

The forward writes per-row KL and the two LSEs (``[B, R, L]`` each); the wrapper sums rows.
The backward recomputes logits block by block (as flash attention does). With
``c = grad / (n_valid * R)`` and ``dS_ij = c * (p_s_ij - p_t_ij)`` on real rows and keys,
``d s_q_i = sum_j dS_ij s_k_j / sqrt(ds)`` (one kernel gridded over query blocks) and
``d s_k_j = sum_i dS_ij s_q_i / sqrt(ds)`` (one kernel gridded over key blocks, so no atomics
and a deterministic result). For a self relation (``s_q is s_k``) autograd adds the two.

Memory: ``O(B*R*L)`` statistics plus the ``O(B*L*H)`` inputs and gradients; no ``L x L``
tensor ever reaches global memory. Statistics are fp32 (float64 for float64 inputs);
fp16/bf16 inputs enter ``tl.dot`` as they are (products are exact in fp32, accumulation is
fp32), fp32 inputs use IEEE fp32 dots (no TF32), so values match the chunked path.

Triton is optional: without it (or on CPU tensors outside the interpreter) the call falls
back to the chunked torch path. Tests run the kernels on CPU with ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from toolkit.errors import ConfigError, ToolkitError
from toolkit.losses.relation_kl.chunked import relation_kl_qk as _chunked_relation_kl_qk
from toolkit.losses.relation_kl.chunked import validate_relation_inputs

try:  # Triton is an optional GPU dependency; the module must import without it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

#: True when the ``triton`` package can be imported.
TRITON_AVAILABLE = triton is not None

#: Default query/key block sizes on the GPU (powers of two, >= 16 for ``tl.dot``).
DEFAULT_BLOCK_M = 64
DEFAULT_BLOCK_N = 64
#: Widest slice of the head dimension loaded at once; wider heads loop over slices.
MAX_BLOCK_D = 64

if TRITON_AVAILABLE:
    # Finite stand-in for -inf: a fully padded row stays finite (exp(NEG - NEG) = 1) instead of NaN.
    _NEG = tl.constexpr(-1.0e30)

    @triton.jit
    def _scores(XQ, XK, q_rows, k_rows, L, d, col0, stride_l, stride_h, scale,
                ACC: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_D: tl.constexpr):
        """Scaled logits ``[BLOCK_M, BLOCK_N]`` of one head: ``XQ[q_rows] . XK[k_rows]^T * scale``.

        ``XQ``/``XK`` point at one batch element ``[L, H]``; the head is columns
        ``col0 : col0 + d``, read ``BLOCK_D`` at a time so any head width fits in registers.
        """
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC)
        cols = tl.arange(0, BLOCK_D)
        q_in = q_rows < L
        k_in = k_rows < L
        for d0 in range(0, d, BLOCK_D):
            c = d0 + cols
            c_in = c < d
            q = tl.load(XQ + q_rows[:, None] * stride_l + (col0 + c)[None, :] * stride_h,
                        mask=q_in[:, None] & c_in[None, :], other=0.0)
            k = tl.load(XK + k_rows[:, None] * stride_l + (col0 + c)[None, :] * stride_h,
                        mask=k_in[:, None] & c_in[None, :], other=0.0)
            acc = tl.dot(q, tl.trans(k), acc, input_precision=PREC, out_dtype=acc.dtype)
        return acc * scale

    @triton.jit
    def _masked_pair(TQ, TK, SQ, SK, q_rows, k_rows, key_ok, L, dt, ds, col_t, col_s,
                     t_sl, t_sh, s_sl, s_sh, scale_t, scale_s,
                     ACC: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DT: tl.constexpr,
                     BLOCK_DS: tl.constexpr):
        """Teacher and student logits of one tile, padded keys set to ``_NEG``."""
        st = _scores(TQ, TK, q_rows, k_rows, L, dt, col_t, t_sl, t_sh, scale_t,
                     ACC, PREC_T, BLOCK_M, BLOCK_N, BLOCK_DT)
        ss = _scores(SQ, SK, q_rows, k_rows, L, ds, col_s, s_sl, s_sh, scale_s,
                     ACC, PREC_S, BLOCK_M, BLOCK_N, BLOCK_DS)
        st = tl.where(key_ok[None, :], st, _NEG)
        ss = tl.where(key_ok[None, :], ss, _NEG)
        return st, ss

    @triton.jit
    def _relation_kl_fwd(TQ, TK, SQ, SK, MASK, ROW_KL, LSE_T, LSE_S,
                         L, R, dt, ds, SCALES,
                         t_sb, t_sl, t_sh, s_sb, s_sl, s_sh, m_sb,
                         ACC: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DT: tl.constexpr,
                         BLOCK_DS: tl.constexpr):
        """Per-row KL and LSEs for one (batch x head, query block); grid ``(B*R, cdiv(L, BM))``.

        B*R is on grid axis 0 (up to 2^31 - 1 programs); axes 1 and 2 stop at 65535.
        """
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        scale_t = tl.load(SCALES)        # in the accumulator dtype: exact for float64 inputs
        scale_s = tl.load(SCALES + 1)
        b = (pid_bh // R).to(tl.int64)
        r = pid_bh % R
        TQ += b * t_sb
        TK += b * t_sb
        SQ += b * s_sb
        SK += b * s_sb
        MASK += b * m_sb
        col_t = r * dt
        col_s = r * ds
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)

        m_t = tl.full([BLOCK_M], _NEG, ACC)
        l_t = tl.zeros([BLOCK_M], dtype=ACC)
        m_s = tl.full([BLOCK_M], _NEG, ACC)
        l_s = tl.zeros([BLOCK_M], dtype=ACC)
        for n0 in range(0, L, BLOCK_N):
            keys = n0 + offs_n
            key_ok = tl.load(MASK + keys, mask=keys < L, other=0) != 0
            st, ss = _masked_pair(TQ, TK, SQ, SK, rows, keys, key_ok, L, dt, ds, col_t, col_s,
                                  t_sl, t_sh, s_sl, s_sh, scale_t, scale_s, ACC, PREC_T, PREC_S,
                                  BLOCK_M, BLOCK_N, BLOCK_DT, BLOCK_DS)
            new_t = tl.maximum(m_t, tl.max(st, axis=1))
            l_t = l_t * tl.exp(m_t - new_t) + tl.sum(tl.exp(st - new_t[:, None]), axis=1)
            m_t = new_t
            new_s = tl.maximum(m_s, tl.max(ss, axis=1))
            l_s = l_s * tl.exp(m_s - new_s) + tl.sum(tl.exp(ss - new_s[:, None]), axis=1)
            m_s = new_s
        lse_t = m_t + tl.log(l_t)
        lse_s = m_s + tl.log(l_s)

        kl = tl.zeros([BLOCK_M], dtype=ACC)
        for n0 in range(0, L, BLOCK_N):
            keys = n0 + offs_n
            key_ok = tl.load(MASK + keys, mask=keys < L, other=0) != 0
            st, ss = _masked_pair(TQ, TK, SQ, SK, rows, keys, key_ok, L, dt, ds, col_t, col_s,
                                  t_sl, t_sh, s_sl, s_sh, scale_t, scale_s, ACC, PREC_T, PREC_S,
                                  BLOCK_M, BLOCK_N, BLOCK_DT, BLOCK_DS)
            logp_t = st - lse_t[:, None]
            logp_s = ss - lse_s[:, None]
            # Padded keys: p_t = 0 there, but (logp_t - logp_s) is garbage-but-finite; drop them.
            terms = tl.where(key_ok[None, :], tl.exp(logp_t) * (logp_t - logp_s), 0.0)
            kl += tl.sum(terms, axis=1)

        row_in = rows < L
        row_ok = (tl.load(MASK + rows, mask=row_in, other=0) != 0) & row_in
        kl = tl.where(row_ok, kl, 0.0)
        out = pid_bh.to(tl.int64) * L + rows
        tl.store(ROW_KL + out, kl, mask=row_in)
        tl.store(LSE_T + out, lse_t, mask=row_in)
        tl.store(LSE_S + out, lse_s, mask=row_in)

    @triton.jit
    def _grad_logits(st, ss, lse_t, lse_s, row_ok, key_ok):
        """``p_s - p_t`` of one tile on real rows and keys (0 elsewhere).

        The constant factor (``grad / (n_real * R) / sqrt(ds)``) is applied to the fp32
        accumulator after the dots, not here: the tile is rounded to the input dtype for the
        dot, and at training sizes the scaled values fall below fp16's range.
        """
        p_t = tl.exp(st - lse_t[:, None])
        p_s = tl.exp(ss - lse_s[:, None])
        return tl.where(row_ok[:, None] & key_ok[None, :], p_s - p_t, 0.0)

    @triton.jit
    def _relation_kl_bwd_dq(TQ, TK, SQ, SK, MASK, LSE_T, LSE_S, COEF, DQ,
                            L, R, dt, ds, SCALES,
                            t_sb, t_sl, t_sh, s_sb, s_sl, s_sh, m_sb,
                            ACC: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DT: tl.constexpr,
                            BLOCK_DS: tl.constexpr):
        """Gradient of the student query side; grid ``(B*R, cdiv(L, BM), cdiv(ds, BLOCK_DS))``."""
        pid_bh = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_d = tl.program_id(2)
        scale_t = tl.load(SCALES)
        scale_s = tl.load(SCALES + 1)
        b = (pid_bh // R).to(tl.int64)
        r = pid_bh % R
        TQ += b * t_sb
        TK += b * t_sb
        SQ += b * s_sb
        SK += b * s_sb
        DQ += b * s_sb
        MASK += b * m_sb
        col_t = r * dt
        col_s = r * ds
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_in = rows < L
        row_ok = (tl.load(MASK + rows, mask=row_in, other=0) != 0) & row_in
        stat = pid_bh.to(tl.int64) * L + rows
        lse_t = tl.load(LSE_T + stat, mask=row_in, other=0.0)
        lse_s = tl.load(LSE_S + stat, mask=row_in, other=0.0)
        coef = tl.load(COEF)
        oc = pid_d * BLOCK_DS + tl.arange(0, BLOCK_DS)
        oc_in = oc < ds
        offs_n = tl.arange(0, BLOCK_N)

        acc = tl.zeros([BLOCK_M, BLOCK_DS], dtype=ACC)
        for n0 in range(0, L, BLOCK_N):
            keys = n0 + offs_n
            key_in = keys < L
            key_ok = tl.load(MASK + keys, mask=key_in, other=0) != 0
            st, ss = _masked_pair(TQ, TK, SQ, SK, rows, keys, key_ok, L, dt, ds, col_t, col_s,
                                  t_sl, t_sh, s_sl, s_sh, scale_t, scale_s, ACC, PREC_T, PREC_S,
                                  BLOCK_M, BLOCK_N, BLOCK_DT, BLOCK_DS)
            ds_tile = _grad_logits(st, ss, lse_t, lse_s, row_ok, key_ok)
            sk = tl.load(SK + keys[:, None] * s_sl + (col_s + oc)[None, :] * s_sh,
                         mask=key_in[:, None] & oc_in[None, :], other=0.0)
            # Half inputs: dS is rounded to the input type for a tensor-core dot (as flash attention).
            acc = tl.dot(ds_tile.to(sk.dtype), sk, acc, input_precision=PREC_S, out_dtype=acc.dtype)
        acc = acc * coef
        tl.store(DQ + rows[:, None] * s_sl + (col_s + oc)[None, :] * s_sh,
                 acc.to(DQ.dtype.element_ty), mask=row_in[:, None] & oc_in[None, :])

    @triton.jit
    def _relation_kl_bwd_dk(TQ, TK, SQ, SK, MASK, LSE_T, LSE_S, COEF, DK,
                            L, R, dt, ds, SCALES,
                            t_sb, t_sl, t_sh, s_sb, s_sl, s_sh, m_sb,
                            ACC: tl.constexpr, PREC_T: tl.constexpr, PREC_S: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DT: tl.constexpr,
                            BLOCK_DS: tl.constexpr):
        """Gradient of the student key side; grid ``(B*R, cdiv(L, BN), cdiv(ds, BLOCK_DS))``."""
        pid_bh = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_d = tl.program_id(2)
        scale_t = tl.load(SCALES)
        scale_s = tl.load(SCALES + 1)
        b = (pid_bh // R).to(tl.int64)
        r = pid_bh % R
        TQ += b * t_sb
        TK += b * t_sb
        SQ += b * s_sb
        SK += b * s_sb
        DK += b * s_sb
        MASK += b * m_sb
        col_t = r * dt
        col_s = r * ds
        keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        key_in = keys < L
        key_ok = tl.load(MASK + keys, mask=key_in, other=0) != 0
        coef = tl.load(COEF)
        oc = pid_d * BLOCK_DS + tl.arange(0, BLOCK_DS)
        oc_in = oc < ds
        offs_m = tl.arange(0, BLOCK_M)
        stat0 = pid_bh.to(tl.int64) * L

        acc = tl.zeros([BLOCK_N, BLOCK_DS], dtype=ACC)
        for m0 in range(0, L, BLOCK_M):
            rows = m0 + offs_m
            row_in = rows < L
            row_ok = (tl.load(MASK + rows, mask=row_in, other=0) != 0) & row_in
            lse_t = tl.load(LSE_T + stat0 + rows, mask=row_in, other=0.0)
            lse_s = tl.load(LSE_S + stat0 + rows, mask=row_in, other=0.0)
            st, ss = _masked_pair(TQ, TK, SQ, SK, rows, keys, key_ok, L, dt, ds, col_t, col_s,
                                  t_sl, t_sh, s_sl, s_sh, scale_t, scale_s, ACC, PREC_T, PREC_S,
                                  BLOCK_M, BLOCK_N, BLOCK_DT, BLOCK_DS)
            ds_tile = _grad_logits(st, ss, lse_t, lse_s, row_ok, key_ok)
            sq = tl.load(SQ + rows[:, None] * s_sl + (col_s + oc)[None, :] * s_sh,
                         mask=row_in[:, None] & oc_in[None, :], other=0.0)
            acc = tl.dot(tl.trans(ds_tile).to(sq.dtype), sq, acc, input_precision=PREC_S, out_dtype=acc.dtype)
        acc = acc * coef
        tl.store(DK + keys[:, None] * s_sl + (col_s + oc)[None, :] * s_sh,
                 acc.to(DK.dtype.element_ty), mask=key_in[:, None] & oc_in[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _block(n: Optional[int], default: int, field: str) -> int:
    """A power-of-two block size in ``[16, 128]`` (``tl.dot`` needs >= 16 per dimension)."""
    if n is None:
        return default
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ConfigError(field, f"must be a positive integer or null (default), got {n!r}")
    return min(128, max(16, _pow2(n)))


def _head_block(d: int) -> int:
    return min(MAX_BLOCK_D, max(16, _pow2(d)))


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not be rounded to TF32 (1e-3 relative per logit); the string is ignored
    # for half types, whose products are exact in the fp32 accumulator anyway.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def _check(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor, heads: int) -> None:
    """The chunked path's shape checks plus the dtypes the kernel takes; ToolkitError / ConfigError."""
    validate_relation_inputs(t_q, t_k, s_q, s_k, mask, heads, who="relation KL (triton)")
    for name, x in (("teacher", t_q), ("student", s_q)):
        if x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ToolkitError(f"relation KL (triton): {name} projections have dtype {x.dtype}; expected "
                               f"float16, bfloat16, float32 or float64")
    for name, q, k in (("teacher", t_q, t_k), ("student", s_q, s_k)):
        if q.dtype != k.dtype:
            raise ToolkitError(f"relation KL (triton): the {name}'s query side is {q.dtype} but its key side is "
                               f"{k.dtype}; cast both to one dtype")


_SCALES: dict = {}


def _scales(dt: int, ds: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``[1/sqrt(dt), 1/sqrt(ds)]`` on ``device``, made once per shape: building it per launch
    would be a blocking host-to-device copy in every forward and backward."""
    key = (dt, ds, dtype, device)
    if key not in _SCALES:
        _SCALES[key] = torch.tensor([dt ** -0.5, ds ** -0.5], dtype=dtype, device=device)
    return _SCALES[key]


class _Launch:
    """Kernel arguments shared by the forward and both backward kernels (no state of its own)."""

    def __init__(self, t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor, heads: int,
                 block_m: int, block_n: int):
        b, l, ht = t_q.shape
        hs = s_q.shape[-1]
        self.acc_torch = torch.promote_types(s_q.dtype, torch.float32)
        self.acc = tl.float64 if self.acc_torch == torch.float64 else tl.float32
        self.b, self.l, self.heads = b, l, heads
        self.dt, self.ds = ht // heads, hs // heads
        self.block_m, self.block_n = block_m, block_n
        self.block_dt, self.block_ds = _head_block(self.dt), _head_block(self.ds)
        self.prec_t, self.prec_s = _dot_precision(t_q.dtype), _dot_precision(s_q.dtype)
        self.scale_s = self.ds ** -0.5
        # A tensor, not Python floats: compiled Triton types float arguments as fp32, which would
        # cap float64 runs at ~1e-8.
        self.scales = _scales(self.dt, self.ds, self.acc_torch, s_q.device)
        # fp32/fp64 dots run on CUDA cores with 4 warps' registers spilling at 64x64 tiles, and
        # 128-row tiles spill in every dtype: 8 warps there (compiled for sm_90: no spills).
        wide = self.acc_torch == torch.float64 or s_q.dtype == torch.float32 or max(block_m, block_n) >= 128
        self.num_warps = 8 if wide else 4
        self.tensors = (t_q, t_k, s_q, s_k, mask)

    def common(self) -> Tuple[Any, ...]:
        t_q, _, s_q, _, mask = self.tensors
        return (self.l, self.heads, self.dt, self.ds, self.scales,
                t_q.stride(0), t_q.stride(1), t_q.stride(2), s_q.stride(0), s_q.stride(1), s_q.stride(2),
                mask.stride(0))

    def meta(self) -> dict:
        return dict(ACC=self.acc, PREC_T=self.prec_t, PREC_S=self.prec_s, BLOCK_M=self.block_m,
                    BLOCK_N=self.block_n, BLOCK_DT=self.block_dt, BLOCK_DS=self.block_ds,
                    num_warps=self.num_warps)


def _on_device(x: Tensor) -> Any:
    """Launch context: Triton launches on the current CUDA device, which may not be ``x``'s."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _prepare(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor) -> Tuple[Tensor, ...]:
    """Contiguous inputs with a shared stride layout; teacher cast only when float64 is mixed in."""
    cdt = torch.promote_types(s_q.dtype, torch.float32)
    # tl.dot needs fp64 on both sides or neither; other teacher dtypes are read as they are.
    if (t_q.dtype == torch.float64) != (cdt == torch.float64):
        t_q, t_k = t_q.to(cdt), t_k.to(cdt)
    same_t = t_k is t_q
    t_q = t_q.contiguous()
    t_k = t_q if same_t else t_k.contiguous()
    s_q_c = s_q.contiguous()
    s_k_c = s_q_c if s_k is s_q else s_k.contiguous()
    return t_q, t_k, s_q_c, s_k_c, mask.to(torch.int32).contiguous()


class _TritonRelationKL(torch.autograd.Function):
    """Fused relation KL; inputs ``[B, L, H]``, output a scalar (see module docstring)."""

    @staticmethod
    def forward(ctx: Any, t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor,
                heads: int, block_m: int, block_n: int) -> Tensor:
        tq, tk, sq, sk, m32 = _prepare(t_q, t_k, s_q, s_k, mask)
        run = _Launch(tq, tk, sq, sk, m32, heads, block_m, block_n)
        stats = torch.empty(3, run.b, heads, run.l, dtype=run.acc_torch, device=sq.device)
        row_kl, lse_t, lse_s = stats.unbind(0)
        grid = (run.b * heads, triton.cdiv(run.l, block_m))
        with _on_device(sq):
            _relation_kl_fwd[grid](tq, tk, sq, sk, m32, row_kl, lse_t, lse_s, *run.common(), **run.meta())
        n_rows = m32.sum().clamp_min(1).to(run.acc_torch) * heads
        ctx.save_for_backward(tq, tk, sq, sk, m32, lse_t, lse_s, n_rows)
        ctx.heads, ctx.blocks = heads, (block_m, block_n)
        ctx.same_s = s_q is s_k
        return row_kl.sum() / n_rows

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        tq, tk, sq, sk, m32, lse_t, lse_s, n_rows = ctx.saved_tensors
        need_q, need_k = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        if ctx.same_s:
            # One tensor on both sides: autograd sums the two returned gradients.
            need_q = need_k = need_q or need_k
        if not (need_q or need_k):
            return (None,) * 8
        run = _Launch(tq, tk, sq, sk, m32, ctx.heads, *ctx.blocks)
        # Device-side scalar: no host sync to read the incoming gradient.
        coef = (grad_out.to(run.acc_torch) * run.scale_s / n_rows).reshape(1).contiguous()
        n_d = triton.cdiv(run.ds, run.block_ds)
        args = (tq, tk, sq, sk, m32, lse_t, lse_s, coef)
        grad_q = grad_k = None
        with _on_device(sq):
            if need_q:
                grad_q = torch.empty_like(sq)
                grid = (run.b * run.heads, triton.cdiv(run.l, run.block_m), n_d)
                _relation_kl_bwd_dq[grid](*args, grad_q, *run.common(), **run.meta())
            if need_k:
                grad_k = torch.empty_like(sk)
                grid = (run.b * run.heads, triton.cdiv(run.l, run.block_n), n_d)
                _relation_kl_bwd_dk[grid](*args, grad_k, *run.common(), **run.meta())
        return None, None, grad_q, grad_k, None, None, None, None


def relation_kl_qk(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor,
                   num_relation_heads: int, chunk_size: Optional[int] = None, *,
                   block_m: Optional[int] = None, block_n: Optional[int] = None) -> Tensor:
    """Fused KL(teacher || student) of ``softmax(x_q x_k^T / sqrt(d))`` relations.

    Drop-in for :func:`toolkit.losses.relation_kl.chunked.relation_kl_qk` on CUDA tensors
    (or any tensors with ``TRITON_INTERPRET=1``); without Triton, or for CPU tensors outside
    the interpreter, it falls back to that chunked path with a warning.

    Args:
        t_q, t_k: teacher query-/key-side projections ``[B, L, Ht]`` (no gradient).
        s_q, s_k: student query-/key-side projections ``[B, L, Hs]`` (fp16/bf16/fp32/fp64).
        mask: ``[B, L]``, 1/True for real tokens.
        num_relation_heads: R; must divide Ht and Hs.
        chunk_size: the chunked path's query block; here a hint for ``block_m`` (rounded up to
            a power of two in [16, 64]) when ``block_m`` is not given.
        block_m, block_n: query/key rows per tile (powers of two in [16, 128]; default 64).

    Returns:
        Scalar (fp32, or float64 for float64 inputs): mean over real query rows and heads.
    """
    _check(t_q, t_k, s_q, s_k, mask, num_relation_heads)
    on_device = s_q.is_cuda or _interpreting()
    if not (TRITON_AVAILABLE and on_device):
        why = "triton is not installed" if not TRITON_AVAILABLE else "the tensors are not on a CUDA device"
        warnings.warn(f"relation KL: Triton kernel unavailable ({why}); using the chunked torch path",
                      RuntimeWarning, stacklevel=2)
        return _chunked_relation_kl_qk(t_q, t_k, s_q, s_k, mask, num_relation_heads, chunk_size)
    devices = {t_q.device, t_k.device, s_q.device, s_k.device, mask.device}
    if len(devices) > 1:
        raise ToolkitError(f"relation KL (triton): teacher, student and mask must be on one device, got "
                           f"{sorted(str(d) for d in devices)}; move the teacher outputs to the student's device")
    if block_m is not None:
        bm = _block(block_m, DEFAULT_BLOCK_M, "block_m")
    else:
        # chunk_size is sized for the chunked path's memory (CPU caches): only a hint here, capped
        # at the default tile (128-row tiles spill registers at 4 warps).
        bm = min(DEFAULT_BLOCK_M, _block(chunk_size, DEFAULT_BLOCK_M, "chunk_size"))
    bn = _block(block_n, DEFAULT_BLOCK_N, "block_n")
    if s_q.dtype in (torch.float32, torch.float64):
        # float64 128x128 tiles exceed an H100's shared memory; fp32 ones (CUDA-core dots) spill
        # 2.5 KB of registers per thread even at 8 warps (scripts/triton_aot_check.py).
        bm, bn = min(bm, 64), min(bn, 64)
    return _TritonRelationKL.apply(t_q.detach(), t_k.detach(), s_q, s_k, mask.detach(),
                                   num_relation_heads, bm, bn)


def relation_kl(t_x: Tensor, s_x: Tensor, mask: Tensor, num_relation_heads: int,
                chunk_size: Optional[int] = None, *, block_m: Optional[int] = None,
                block_n: Optional[int] = None) -> Tensor:
    """MiniLMv2 self-relation KL (QQ, KK or VV), fused; see :func:`relation_kl_qk`.

    Args:
        t_x: teacher projection ``[B, L, Ht]`` (gets no gradient).
        s_x: student projection ``[B, L, Hs]``, used as both query and key side.
        mask: ``[B, L]``, 1 for real tokens.
        num_relation_heads: R, dividing Ht and Hs.
        chunk_size, block_m, block_n: tile sizes as in :func:`relation_kl_qk`.

    Returns:
        Scalar: KL averaged over relation heads and real query tokens of the batch.
    """
    return relation_kl_qk(t_x, t_x, s_x, s_x, mask, num_relation_heads, chunk_size,
                          block_m=block_m, block_n=block_n)
