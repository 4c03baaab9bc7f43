"""MiniLMv2 multi-head self-attention relation distillation loss.

Relation ``"qq"`` compares ``softmax(Q_r Q_r^T / sqrt(d_r))`` of teacher and student, per
relation head ``r`` (the hidden dim split into ``R`` heads, independent of the attention
head count, so teacher and student hidden sizes may differ). ``"kk"`` and ``"vv"`` likewise;
cross relations such as ``"qk"`` (query side Q, key side K) are accepted too. The loss per
relation is KL(teacher || student) averaged over relation heads and real query tokens; the
total is the plain sum over relations (weights across loss families live in the recipe).

Implementations are looked up in :data:`RELATION_KL_IMPLS`: ``"chunked"`` (portable default,
memory linear in L), ``"naive"`` (materializes ``[B, R, L, L]``; tiny inputs and debugging),
``"triton"`` (only when ``toolkit.kernels.relation_kl_triton`` exists and CUDA is present;
otherwise ``"auto"``/``"triton"`` fall back to ``"chunked"``).
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from toolkit.errors import ConfigError, ToolkitError
from toolkit.kernels.relation_kl_chunked import check_relation_heads, relation_kl_qk

#: Signature: (t_q, t_k, s_q, s_k, mask, num_relation_heads, chunk_size) -> scalar.
RelationKLFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, Optional[int]], Tensor]

_PROJECTIONS = ("q", "k", "v")


def relation_kl_naive(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor,
                      num_relation_heads: int, chunk_size: Optional[int] = None) -> Tensor:
    """Materializing relation KL with plain autograd (fp32 statistics). ``chunk_size`` is ignored.

    Shapes as :func:`toolkit.kernels.relation_kl_chunked.relation_kl_qk`; builds
    ``[B, R, L, L]`` tensors, so only for short sequences.
    """
    check_relation_heads(num_relation_heads, s_q.shape[-1], t_q.shape[-1])
    cdt = torch.promote_types(s_q.dtype, torch.float32)
    valid = mask.to(torch.bool)
    key_pad = ~valid[:, None, None, :]

    def rel_logits(q: Tensor, k: Tensor) -> Tensor:
        b, l, h = q.shape
        d = h // num_relation_heads
        qr = q.to(cdt).view(b, l, num_relation_heads, d).transpose(1, 2)
        kr = k.to(cdt).view(b, l, num_relation_heads, d).transpose(1, 2)
        logits = (qr @ kr.transpose(-1, -2)) * d ** -0.5
        return logits.masked_fill(key_pad, torch.finfo(cdt).min)

    t_logits = rel_logits(t_q.detach(), t_k.detach())
    logp_t = torch.log_softmax(t_logits, dim=-1)
    logp_s = torch.log_softmax(rel_logits(s_q, s_k), dim=-1)
    terms = (torch.softmax(t_logits, dim=-1) * (logp_t - logp_s)).masked_fill(key_pad, 0.0)
    row_kl = terms.sum(-1).masked_fill(~valid[:, None, :], 0.0)
    return row_kl.sum() / (valid.sum().clamp_min(1) * num_relation_heads)


def _triton_available() -> bool:
    return (torch.cuda.is_available()
            and importlib.util.find_spec("triton") is not None
            and importlib.util.find_spec("toolkit.kernels.relation_kl_triton") is not None)


def _relation_kl_triton(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor,
                        num_relation_heads: int, chunk_size: Optional[int] = None) -> Tensor:
    # The Triton kernel only handles CUDA tensors; CPU tensors take the portable path.
    if not _runs_triton("triton", s_q.device.type):
        return relation_kl_qk(t_q, t_k, s_q, s_k, mask, num_relation_heads, chunk_size)
    module = importlib.import_module("toolkit.kernels.relation_kl_triton")
    return module.relation_kl_qk(t_q, t_k, s_q, s_k, mask, num_relation_heads, chunk_size)


_TRITON_FAILED: Dict[str, str] = {}


def _runs_triton(impl: str, device_type: str) -> bool:
    """Whether ``impl`` runs the Triton kernel on ``device_type``: the one place that decides,
    for the loss and for the job log. ``auto`` stops trying after a failure; ``triton`` does not."""
    if impl not in ("auto", "triton") or device_type != "cuda" or not _triton_available():
        return False
    return impl == "triton" or not _TRITON_FAILED


def _relation_kl_auto(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor,
                      num_relation_heads: int, chunk_size: Optional[int] = None) -> Tensor:
    """Triton where it runs, else the chunked path. A kernel that fails to compile or launch on
    this GPU (driver, Triton version, architecture) is reported once and the job goes on with the
    chunked path; ``impl: triton`` raises instead."""
    if _runs_triton("auto", s_q.device.type):
        try:
            return _relation_kl_triton(t_q, t_k, s_q, s_k, mask, num_relation_heads, chunk_size)
        except (ConfigError, ToolkitError):
            raise   # the caller's inputs are wrong: the chunked path would say the same
        except Exception as exc:  # noqa: BLE001 - any compile/launch failure of an optional kernel
            _TRITON_FAILED["error"] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"relation KL: the Triton kernel failed on this machine ({_TRITON_FAILED['error']}); "
                          f"using the chunked torch path from now on (loss.impl: chunked silences this, "
                          f"loss.impl: triton makes it an error)", RuntimeWarning, stacklevel=2)
    return relation_kl_qk(t_q, t_k, s_q, s_k, mask, num_relation_heads, chunk_size)


#: Registry of relation-KL implementations by name.
RELATION_KL_IMPLS: Mapping[str, RelationKLFn] = {
    "chunked": relation_kl_qk,
    "naive": relation_kl_naive,
    "triton": _relation_kl_triton,
    "auto": _relation_kl_auto,
}


def describe_relation_kl(impl: str, device: torch.device, batch: int, heads: int, seq_len: int,
                         chunk_size: Optional[int] = None) -> str:
    """What ``impl`` will run for ``[batch, seq_len]`` inputs on ``device``, for the job log:
    ``"triton"``, or ``"chunked (blocks of b samples x r rows)"``, on CPUs followed by the block
    math (the compiled row kernel, or the torch passes and why), or the fused CPU kernel first
    where it builds."""
    from toolkit.kernels.relation_kl_chunked import plan_blocks

    if _runs_triton(impl, device.type):
        return "triton"
    if impl == "naive":
        return "naive (materializes [B, R, L, L])"
    on_cpu = device.type == "cpu"
    samples, rows = plan_blocks(batch, heads, seq_len, on_cpu, chunk_size)
    blocks = f"blocks of {samples} sample{'s' if samples > 1 else ''} x {rows} query rows"
    if on_cpu:
        from toolkit.kernels import cpu_relation, cpu_rows

        blocks += f"; {cpu_rows.describe()}"
        if cpu_relation.unavailable_reason() is None:
            return (f"chunked (the fused compiled CPU kernel for fp32 inputs, 8 query rows at a time per sample "
                    f"and relation head; other dtypes: {blocks})")
    return f"chunked ({blocks})"


def validate_relations(relations: Sequence[str]) -> tuple:
    """Normalize relation names (``"qq"``, ``"KK"``, ``"q-k"`` ...) or raise ConfigError('relations')."""
    if isinstance(relations, str):
        relations = [r for r in relations.split(",") if r.strip()]
    out = []
    for rel in relations:
        name = str(rel).strip().lower().replace("-", "")
        if len(name) != 2 or any(c not in _PROJECTIONS for c in name):
            raise ConfigError("relations", f"unknown relation {rel!r}; use pairs of q/k/v such as qq, kk, vv")
        if name in out:
            raise ConfigError("relations", f"relation {name!r} is listed twice")
        out.append(name)
    if not out:
        raise ConfigError("relations", "must name at least one relation, e.g. [qq, kk, vv]")
    return tuple(out)


class MiniLMv2RelationLoss(nn.Module):
    """Multi-head self-attention relation distillation (MiniLMv2).

    Args:
        num_relation_heads: R, shared by teacher and student; must divide both hidden sizes.
        relations: relation types; default ``("qq", "kk", "vv")``.
        chunk_size: query rows per block for the chunked path (None = auto).
        impl: ``"auto"`` | ``"chunked"`` | ``"naive"`` | ``"triton"`` (see module docstring).
    """

    def __init__(self, num_relation_heads: int, relations: Sequence[str] = ("qq", "kk", "vv"),
                 chunk_size: Optional[int] = None, impl: str = "auto"):
        super().__init__()
        if not isinstance(num_relation_heads, int) or num_relation_heads < 1:
            raise ConfigError("num_relation_heads", f"must be a positive integer, got {num_relation_heads!r}")
        if impl not in RELATION_KL_IMPLS:
            raise ConfigError("impl", f"unknown relation-KL implementation {impl!r}; choose one of "
                              f"{sorted(RELATION_KL_IMPLS)}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ConfigError("chunk_size", f"must be a positive integer or null (auto), got {chunk_size!r}")
        self.num_relation_heads = num_relation_heads
        self.relations = validate_relations(relations)
        self.chunk_size = chunk_size
        self.impl = impl

    def extra_repr(self) -> str:
        return (f"num_relation_heads={self.num_relation_heads}, relations={self.relations}, "
                f"chunk_size={self.chunk_size}, impl={self.impl!r}")

    def forward(self, student_qkv: Mapping[str, Tensor], teacher_qkv: Mapping[str, Tensor],
                attention_mask: Tensor) -> Dict[str, Tensor]:
        """Relation KL losses.

        Args:
            student_qkv: ``{"q", "k", "v"}`` projections of the student layer, each ``[B, L, Hs]``.
            teacher_qkv: same for the teacher layer, each ``[B, L, Ht]`` (no gradient).
            attention_mask: ``[B, L]``, 1 for real tokens.

        Returns:
            ``{"loss": sum over relations, "<relation>": per-relation scalar, ...}``.
        """
        fn = RELATION_KL_IMPLS[self.impl]
        out: Dict[str, Tensor] = {}
        for rel in self.relations:
            for side, qkv in (("student", student_qkv), ("teacher", teacher_qkv)):
                missing = [p for p in rel if p not in qkv]
                if missing:
                    raise ToolkitError(f"MiniLMv2 relation {rel!r} needs the {side}'s {missing[0]!r} projection; "
                                       f"capture it (QKVCapture what=...); got keys {sorted(qkv)}")
            out[rel] = fn(teacher_qkv[rel[0]], teacher_qkv[rel[1]], student_qkv[rel[0]], student_qkv[rel[1]],
                          attention_mask, self.num_relation_heads, self.chunk_size)
        total = out[self.relations[0]]
        for rel in self.relations[1:]:
            total = total + out[rel]
        out["loss"] = total
        return out
