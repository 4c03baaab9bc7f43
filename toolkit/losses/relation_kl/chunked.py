"""Memory-bounded relation KL (MiniLMv2) whose forward also computes the student gradient.

For one relation type, teacher and student projections ``[B, L, H]`` are split into ``R``
relation heads ``[B, R, L, d]`` (``d = H / R``; teacher and student ``d`` may differ). Row
``i`` of a relation is ``softmax_j(x_i . x_j / sqrt(d))`` over real keys ``j``; the loss is
``KL(teacher || student)`` per row, averaged over heads and over the real query tokens of
the whole batch.

A naive implementation keeps several ``[B, R, L, L]`` tensors alive for the backward, which
dominates memory at long sequence lengths. Here query rows are processed in blocks (on CPUs
also slices of the batch, :func:`plan_blocks`): a block needs only ``[b, R, block, L]``
temporaries and nothing of size ``L x L`` outlives it. Because
the loss is a terminal scalar, the forward also computes the student gradient block by block
while the block's probabilities are at hand (when a gradient will be asked for), and the
backward only scales that ``[B, L, Hs]`` tensor: no block is recomputed. Extra memory is
``O(b*R*block*L + B*L*H)``, linear in ``L``. Each block is a few fused passes
(two ``softmax``, row maxima, a subtraction, a row dot product); masking passes run only
when the batch has padding.

The gradient is analytic: for a row, ``dKL/dlogit_s = p_s - p_t`` (zero on padded keys), and
because ``logit_ij = x_i . x_j / sqrt(d)`` uses the student tensor on both the query and the
key side, the gradient is accumulated into both. The teacher never receives a gradient.

Statistics are always computed in fp32 (float64 stays float64): bf16/fp16 inputs are upcast
once, because rounding the logits themselves to bf16 costs ~1e-2 absolute error per logit.

Plain PyTorch only: this is the ``chunked`` implementation of the relation-KL registry
(:mod:`toolkit.losses.relation_kl`) on every device and dtype.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

from toolkit.errors import ConfigError, ToolkitError

#: Default memory budget for one block's temporaries (bytes). Immutable module constant.
DEFAULT_BLOCK_BUDGET_BYTES = 256 * 1024 * 1024
#: On CPUs a block should stay near the caches (large blocks make the softmax/KL passes
#: miss the cache and run slower than the matmuls they feed).
CPU_BLOCK_BUDGET_BYTES = 24 * 1024 * 1024
#: Smallest query block on CPUs: thinner blocks leave the logits matmuls far from peak.
CPU_MIN_BLOCK_ROWS = 32
#: Largest query block on CPUs; the batch is sliced instead (a few samples of long row blocks
#: keep the matmuls wide and the temporaries in cache).
CPU_MAX_BLOCK_ROWS = 256
# Live [b, R, block, L] fp32 temporaries inside one block of the forward, with headroom (at
# most four at once: both sides' logits and probabilities; matmul workspace). The block sizes
# were tuned with this value: keep it when the block's math changes.
_LIVE_BLOCK_TENSORS = 6


def check_relation_heads(num_relation_heads: int, student_hidden: int, teacher_hidden: int) -> None:
    """Raise ConfigError unless both hidden sizes split evenly into ``num_relation_heads``.

    Args:
        num_relation_heads: shared number of relation heads R.
        student_hidden: student projection width Hs.
        teacher_hidden: teacher projection width Ht.
    """
    if not isinstance(num_relation_heads, int) or num_relation_heads < 1:
        raise ConfigError("num_relation_heads", f"must be a positive integer, got {num_relation_heads!r}")
    bad = [f"{who} hidden size {h}" for who, h in (("student", student_hidden), ("teacher", teacher_hidden))
           if h % num_relation_heads != 0]
    if bad:
        common = math.gcd(student_hidden, teacher_hidden)
        raise ConfigError(
            "num_relation_heads",
            f"{num_relation_heads} does not divide the {' and the '.join(bad)} (student hidden "
            f"{student_hidden}, teacher hidden {teacher_hidden}); use a divisor of both, e.g. {common} "
            f"or one of its divisors")


def auto_chunk_size(batch: int, heads: int, seq_len: int,
                    budget_bytes: int = DEFAULT_BLOCK_BUDGET_BYTES) -> int:
    """Largest query block whose ``[B, R, block, L]`` fp32 temporaries fit in ``budget_bytes``."""
    per_row = max(1, batch * heads * seq_len * 4 * _LIVE_BLOCK_TENSORS)
    return int(max(1, min(seq_len, budget_bytes // per_row)))


def plan_blocks(batch: int, heads: int, seq_len: int, on_cpu: bool, chunk_size: Optional[int] = None,
                budget_bytes: Optional[int] = None) -> Tuple[int, int]:
    """``(batch_block, rows)``: samples and query rows per block of the chunked loss.

    Accelerators (256 MiB default budget): every sample in each block, rows from the budget
    (:func:`auto_chunk_size`). CPUs (24 MiB): blocks that stay near the caches, with 32-256
    rows, and the batch sliced so the block's ``[b, R, rows, L]`` temporaries fit the budget:
    wide enough for the matmuls, small enough that the softmax/KL passes hit cache. An explicit
    ``chunk_size`` sets the rows (the batch is still sliced on CPUs).
    """
    if budget_bytes is None:
        budget_bytes = CPU_BLOCK_BUDGET_BYTES if on_cpu else DEFAULT_BLOCK_BUDGET_BYTES
    seq_len = max(seq_len, 1)
    if chunk_size is not None:
        if not (isinstance(chunk_size, int) and not isinstance(chunk_size, bool) and chunk_size >= 1):
            raise ConfigError("chunk_size", f"must be a positive integer or null (auto), got {chunk_size!r}")
        rows = min(chunk_size, seq_len)
    elif on_cpu:
        rows = auto_chunk_size(1, heads, seq_len, budget_bytes)     # one sample's rows in the budget
        rows = min(seq_len, CPU_MAX_BLOCK_ROWS, max(CPU_MIN_BLOCK_ROWS, rows))
    else:
        rows = auto_chunk_size(batch, heads, seq_len, budget_bytes)
    if not on_cpu:
        return batch, rows
    per_sample = heads * rows * seq_len * 4 * _LIVE_BLOCK_TENSORS
    return int(min(batch, max(1, budget_bytes // per_sample))), rows


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp32 statistics for every half type; float64 passes through (gradcheck, reference checks).
    return torch.promote_types(dtype, torch.float32)


def _split_heads(x: Tensor, heads: int, dtype: torch.dtype) -> Tensor:
    """[B, L, H] -> contiguous [B, R, L, H/R] in ``dtype``.

    Contiguous (one O(B*L*H) copy) so each query block is a plain strided batch for bmm;
    slicing blocks out of the transposed view made every block matmul copy its operands.
    """
    b, l, h = x.shape
    return x.to(dtype).view(b, l, heads, h // heads).transpose(1, 2).contiguous()


def _split_pair(q: Tensor, k: Tensor, heads: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """Split query- and key-side tensors, sharing one copy when they are the same tensor."""
    qh = _split_heads(q, heads, dtype)
    return qh, (qh if k is q else _split_heads(k, heads, dtype))


def _merge_heads(x: Tensor) -> Tensor:
    """[B, R, L, d] -> [B, L, R*d]."""
    b, r, l, d = x.shape
    return x.transpose(1, 2).reshape(b, l, r * d)


def _prepare(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor, heads: int, cdt: torch.dtype):
    """Head-split operands for the block loops: query sides pre-scaled by ``1/sqrt(d)`` (one
    ``O(B*L*H)`` pass instead of one per block), key sides transposed for the logits matmul,
    and the key mask, or None when the batch has no padding (packed corpora: the common case,
    which then skips every masking pass)."""
    tq, tk = _split_pair(t_q, t_k, heads, cdt)
    sq, sk = _split_pair(s_q, s_k, heads, cdt)
    tq_scaled = tq * tq.shape[-1] ** -0.5
    sq_scaled = sq * sq.shape[-1] ** -0.5
    valid = mask.to(torch.bool)
    key_pad = None if bool(valid.all()) else ~valid[:, None, None, :]
    return tq_scaled, tk.transpose(-1, -2), sq, sq_scaled, sk, valid, key_pad


def _block_logits(q_blk: Tensor, k_t: Tensor, key_pad: Optional[Tensor]) -> Tensor:
    """Logits ``[B, R, b, L]`` of one (pre-scaled) query block against ``k_t = k^T``.

    Padded keys get ``finfo.min`` (not -inf: a fully padded row stays finite, and is dropped).
    """
    logits = torch.matmul(q_blk, k_t)
    if key_pad is not None:
        logits.masked_fill_(key_pad, torch.finfo(logits.dtype).min)
    return logits


def _block_kl(tq_blk: Tensor, tk_t: Tensor, sq_blk: Tensor, sk_t: Tensor, key_pad: Optional[Tensor],
              want_grad: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """One query block: per-row ``KL(p_t || p_s)`` ``[B, R, b]`` and, if ``want_grad``, the
    block's ``dKL/dlogit_s = p_s - p_t`` ``[B, R, b, L]`` (zero on padded keys).

    With teacher logits ``a``, student logits ``s``, row maxima ``m`` and ``log p = x - lse``:
    ``KL_row = sum_j p_t,j ((a_j - s_j) - (m_t - m_s)) + log max p_t - log max p_s``, because
    ``lse = m - log max p`` (the largest probability sits at the largest logit and is at least
    ``1/L``, so its log is safe). Two softmaxes are the only ``exp`` passes; the row maxima are
    cheap reductions. Subtracting ``m_t - m_s`` per key, before the dot, keeps the cancellation
    small (values match the log_softmax form to float rounding against the float64 reference).
    Padded keys hold the same large negative logit on both sides, so ``a_j - s_j`` is 0 there.

    Each step is one pass over ``[B, R, b, L]`` (in place where possible).
    """
    a = _block_logits(tq_blk, tk_t, key_pad)
    # Probabilities come from softmax, never exp(log-probabilities): torch's CPU exp takes a
    # slow path for arguments below ~-88, which every padded key and every near-zero
    # probability produces; softmax's own exp does not.
    p_t = torch.softmax(a, dim=-1)
    s = _block_logits(sq_blk, sk_t, key_pad)
    p_s = torch.softmax(s, dim=-1)
    m_diff = a.amax(dim=-1, keepdim=True) - s.amax(dim=-1, keepdim=True)
    log_ratio = p_t.amax(dim=-1).log_() - p_s.amax(dim=-1).log_()
    row_kl = torch.linalg.vecdot(p_t, a.sub_(s).sub_(m_diff)) + log_ratio
    del a, s
    return row_kl, (p_s.sub_(p_t) if want_grad else None)


def validate_relation_inputs(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor, heads: int,
                             who: str = "relation KL") -> None:
    """Shape checks shared by the relation-KL implementations; ``who`` prefixes every message.

    Raises ToolkitError for wrong ranks or mismatched shapes, ConfigError for a relation-head
    count that does not divide both hidden sizes.
    """
    for name, x in (("teacher query-side", t_q), ("teacher key-side", t_k),
                    ("student query-side", s_q), ("student key-side", s_k)):
        if x.dim() != 3:
            raise ToolkitError(f"{who}: {name} tensor must be [batch, seq_len, hidden], got shape "
                               f"{tuple(x.shape)}")
    if t_q.shape != t_k.shape or s_q.shape != s_k.shape:
        raise ToolkitError(f"{who}: query-side and key-side shapes differ: teacher {tuple(t_q.shape)} vs "
                           f"{tuple(t_k.shape)}, student {tuple(s_q.shape)} vs {tuple(s_k.shape)}")
    if t_q.shape[:2] != s_q.shape[:2] or tuple(mask.shape) != tuple(s_q.shape[:2]):
        raise ToolkitError(
            f"{who}: teacher {tuple(t_q.shape)}, student {tuple(s_q.shape)} and attention_mask "
            f"{tuple(mask.shape)} must share [batch, seq_len]; feed teacher and student the same batch")
    check_relation_heads(heads, s_q.shape[-1], t_q.shape[-1])


class _RelationKLFunction(torch.autograd.Function):
    """Blocked relation KL; see the module docstring. Inputs [B, L, H]; output a scalar.

    Per query block the forward runs two logits matmuls and two ``softmax``, then ``KL_row``
    from the logits' difference and the row maxima (:func:`_block_kl`); nothing of size
    ``L x L`` outlives its block. The loss is a terminal scalar, so when a gradient is wanted the
    forward also turns the block's ``p_s - p_t`` (``dKL/dlogit_s``; zero on padded keys) into
    its share of the student gradient right away, while the block's probabilities are at hand:
    the backward then only scales the stored ``[B, L, Hs]`` gradient by the upstream value,
    instead of recomputing both logits matmuls and both softmaxes of every block. The constant
    factor (``1/rows``, ``1/sqrt(d)``) is applied once to the ``[B, R, L, d]`` results, and
    padded query rows are zeroed on the ``[B, R, L, d]`` operands rather than on every
    ``[B, R, b, L]`` block.
    """

    @staticmethod
    def forward(ctx: Any, t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor,
                heads: int, block: int, batch_block: int, want_q: bool, want_k: bool) -> Tensor:
        cdt = _compute_dtype(s_q.dtype)
        tq, tk_t, sq_raw, sq, sk, valid, key_pad = _prepare(t_q, t_k, s_q, s_k, mask, heads, cdt)
        sk_t = sk.transpose(-1, -2)
        b, r, l, _ = sq.shape
        row_kl = torch.empty(b, r, l, dtype=cdt, device=sq.device)
        # The key side of dKL/dlogit_s: padded query rows must add nothing, so they are zeroed
        # in the query-side operand of that matmul.
        row_valid = valid[:, None, :, None].to(cdt)           # [B, 1, L, 1]
        sq_rows = sq_raw * row_valid if (want_k and key_pad is not None) else sq_raw
        d_sq = torch.empty_like(sq_raw) if want_q else None   # [B, R, L, ds]
        d_sk = torch.zeros_like(sk) if want_k else None
        want_grad = d_sq is not None or d_sk is not None
        for b0 in range(0, b, batch_block):
            bs = slice(b0, min(b, b0 + batch_block))
            pad_b = None if key_pad is None else key_pad[bs]
            tk_tb, sk_b, sk_tb = tk_t[bs], sk[bs], sk_t[bs]
            for i0 in range(0, l, block):
                rows = slice(i0, min(l, i0 + block))
                row_kl[bs, :, rows], g = _block_kl(tq[bs, :, rows], tk_tb, sq[bs, :, rows], sk_tb, pad_b,
                                                   want_grad)
                if g is not None:                                # p_s - p_t
                    if d_sq is not None:
                        d_sq[bs, :, rows] = torch.matmul(g, sk_b)
                    if d_sk is not None:
                        d_sk[bs] += torch.matmul(g.transpose(-1, -2), sq_rows[bs, :, rows])
                    del g
        if key_pad is not None:
            row_kl.masked_fill_(~valid[:, None, :], 0.0)      # padded query rows count nothing
        n_rows = valid.sum().clamp_min(1).to(cdt) * heads
        coef = sq_raw.shape[-1] ** -0.5 / n_rows              # mean over rows * logit scale
        grad_q = grad_k = None
        if d_sq is not None:
            d_sq.mul_(coef)
            if key_pad is not None:
                d_sq.mul_(row_valid)
            grad_q = _merge_heads(d_sq)
        if d_sk is not None:
            grad_k = _merge_heads(d_sk.mul_(coef))
        if grad_q is not None and grad_k is not None and s_q is s_k:
            grad_q, grad_k = grad_q.add_(grad_k), None       # one tensor on both sides: one gradient
        # Saved in the fp32 compute dtype and cast only after the upstream factor is applied: under
        # fp16 loss scaling that factor is the loss scale, and rounding the unscaled gradient to fp16
        # first would flush most of it to zero (it is ~1/(tokens*heads) small).
        ctx.save_for_backward(*(x for x in (grad_q, grad_k) if x is not None))
        ctx.have = (grad_q is not None, grad_k is not None)
        ctx.dtypes = (s_q.dtype, s_k.dtype)
        return row_kl.sum() / n_rows

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Tuple[Optional[Tensor], ...]:
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_out).to(dt) if has else None for has, dt in zip(ctx.have, ctx.dtypes)]
        return (None, None, grads[0], grads[1]) + (None,) * 6


def relation_kl_qk(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor,
                   num_relation_heads: int, chunk_size: Optional[int] = None,
                   budget_bytes: Optional[int] = None) -> Tensor:
    """KL(teacher || student) of ``softmax(x_q x_k^T / sqrt(d))`` relations, query-blocked.

    The general form behind :func:`relation_kl`: query side and key side may be different
    projections (e.g. Q and K gives the attention distribution itself, as MiniLM v1 uses).

    Args:
        t_q, t_k: teacher query-/key-side projections ``[B, L, Ht]`` (no gradient).
        s_q, s_k: student query-/key-side projections ``[B, L, Hs]``.
        mask: ``[B, L]``, 1/True for real tokens.
        num_relation_heads: R; must divide Ht and Hs.
        chunk_size: query rows per block; ``None`` picks one from ``budget_bytes``.
        budget_bytes: memory budget for one block's temporaries when ``chunk_size`` is None
            (None: 256 MiB on accelerators, a cache-sized 24 MiB on CPUs).

    Returns:
        Scalar (fp32, or float64 for float64 inputs): mean over real query rows and heads.
    """
    validate_relation_inputs(t_q, t_k, s_q, s_k, mask, num_relation_heads)
    b, l, _ = s_q.shape
    batch_block, block = plan_blocks(b, num_relation_heads, l, s_q.device.type == "cpu", chunk_size, budget_bytes)
    # One detached teacher tensor for a self relation, so its heads are split once.
    t_q_d = t_q.detach()
    t_k_d = t_q_d if t_k is t_q else t_k.detach()
    # The gradient is computed in the forward (see _RelationKLFunction), so only when one will
    # be asked for: grad mode on and a student side that requires it.
    grad_on = torch.is_grad_enabled()
    return _RelationKLFunction.apply(t_q_d, t_k_d, s_q, s_k, mask.detach(), num_relation_heads, block, batch_block,
                                     grad_on and s_q.requires_grad, grad_on and s_k.requires_grad)


def relation_kl(t_x: Tensor, s_x: Tensor, mask: Tensor, num_relation_heads: int,
                chunk_size: Optional[int] = None,
                budget_bytes: Optional[int] = None) -> Tensor:
    """MiniLMv2 self-relation KL for one projection type (QQ, KK or VV), memory linear in L.

    Args:
        t_x: teacher projection ``[B, L, Ht]`` (detached; gets no gradient).
        s_x: student projection ``[B, L, Hs]`` (used as both query and key side).
        mask: ``[B, L]``, 1 for real tokens; padded keys are excluded from both softmaxes
            and padded query rows contribute nothing.
        num_relation_heads: R, shared by teacher and student; must divide Ht and Hs.
        chunk_size: query rows per block (need not divide L); None = auto from a memory budget.
        budget_bytes: budget for one block's ``[B, R, block, L]`` temporaries when auto.

    Returns:
        Scalar: KL averaged over relation heads and real query tokens of the batch
        (exactly 0 when ``s_x == t_x``).
    """
    return relation_kl_qk(t_x, t_x, s_x, s_x, mask, num_relation_heads, chunk_size, budget_bytes)
