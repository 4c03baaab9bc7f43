"""One GEMM for the Q, K and V projections of each self-attention block.

A BERT/ERNIE self-attention block projects the same hidden states three times, with three
``[H, H]`` linears (``attention.self.{query,key,value}``). One ``[3H, H]`` GEMM does the same
work with a wider output, which the GEMM libraries run faster: on the 2-core AMD hosts this
project measures, at 4096 tokens and H = 384, oneDNN's forward goes from ~186 to ~200 GFLOP/s,
the input gradient from ~184 to ~209 and MKL's weight gradient from ~159 to ~198 (and the
three input gradients need no adding up). ``benchmarks/bench_row_kernel_ab.py --switch
fused-qkv`` measures what it does to the whole distillation step.

:func:`fuse_qkv` changes no module, parameter or state-dict key. It replaces the ``forward``
of each block's three projection modules (instance attribute, like
:class:`toolkit.models.capture.ProjectionsOnly`): the first of the three to be called on a
hidden-state tensor computes all three products in one GEMM and returns its slice; the other two,
called on the same tensor, return theirs. The modules are still *called*, so forward hooks (the
Q/K/V captures of the relation losses) see the same ``[B, L, H]`` outputs as before, as strided
views of the fused ``[B, L, 3H]`` result. A call on a new tensor (another block's input, an
activation-checkpointing recompute) or a repeated call computes afresh, so the result is always
the plain linears' (to the GEMM's last bits).

* **Frozen** blocks (the teacher): at fusing time the three weights (and biases) are moved
  into one ``[3H, H]`` buffer, each parameter a view of its rows, so the forward reads the
  fused weight with no copy and no second copy of the weights is kept.
* **Trained** blocks: the forward concatenates the three weights (``3 H^2`` values, a few
  hundredths of the GEMM's time), so autograd hands each parameter its own gradient rows.
* The GEMM runs on oneDNN (:mod:`toolkit.models.onednn`) where the projections have been
  switched to it, else ``F.linear`` (GPUs, bf16, autocast).

Not under ZeRO-3: there each module's pre-forward hook gathers only its own partitioned
weight, so the engine leaves such models unfused. ``TOOLKIT_FUSED_QKV=0`` turns fusing off.
"""
from __future__ import annotations

import types
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from toolkit.utils.env import switched_off

_ROLES = ("query", "key", "value")
_STATE = "_toolkit_fused_qkv"


def fused_qkv_unavailable_reason() -> Optional[str]:
    """None unless ``TOOLKIT_FUSED_QKV`` turns fusing off (then why)."""
    env_off = switched_off("TOOLKIT_FUSED_QKV")
    return f"turned off by {env_off}" if env_off else None


def _adjacent_rows(tensors: List[Tensor]) -> Optional[Tensor]:
    """The concatenation along dim 0 of ``tensors`` as a view, if they already lie back to back
    in one contiguous storage (a frozen block after :func:`fuse_qkv`), else None."""
    first = tensors[0]
    if not all(t.is_contiguous() for t in tensors):
        return None
    offset = first.storage_offset()
    storage = first.untyped_storage().data_ptr()
    for t in tensors:
        if t.untyped_storage().data_ptr() != storage or t.storage_offset() != offset:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in tensors)
    return first.as_strided((rows,) + tuple(first.shape[1:]), first.stride(), first.storage_offset())


class _FusedQKV:
    """The shared state of one block's three projections (attached to the attention module)."""

    def __init__(self, mods: Tuple[nn.Linear, nn.Linear, nn.Linear]):
        self.mods = mods
        self.sizes = [m.out_features for m in mods]
        self._x: Optional[Tensor] = None
        self._key: Optional[tuple] = None
        self._parts: Optional[Tuple[Tensor, ...]] = None
        self._served = [False, False, False]

    def _weights(self) -> Tuple[Tensor, Optional[Tensor]]:
        ws = [m.weight for m in self.mods]
        bs = [m.bias for m in self.mods]
        frozen = not torch.is_grad_enabled() or not any(t.requires_grad for t in ws + [b for b in bs if b is not None])
        w = _adjacent_rows(ws) if frozen else None
        if w is None:
            w = torch.cat(ws, 0)
        if bs[0] is None:
            return w, None
        b = _adjacent_rows(bs) if frozen else None
        return w, (torch.cat(bs, 0) if b is None else b)

    def _compute(self, x: Tensor) -> Tuple[Tensor, ...]:
        from toolkit.models.onednn import OneDNNLinear, linear_forward

        w, b = self._weights()
        if type(self.mods[0]) is OneDNNLinear:
            out = linear_forward(x, w, b)
        else:
            out = F.linear(x, w, b)
        return out.split(self.sizes, dim=-1)

    def serve(self, role: int, x: Tensor) -> Tensor:
        key = (x._version, torch.is_grad_enabled(), torch.is_autocast_enabled(x.device.type))
        if self._x is not x or self._key != key or self._served[role]:
            self._parts = self._compute(x)
            self._x, self._key, self._served = x, key, [False, False, False]
        out = self._parts[role]
        self._served[role] = True
        if all(self._served):     # all three handed out: keep no reference to the activations
            self._x = self._key = self._parts = None
        return out


def _fused_forward(self: nn.Module, x: Tensor) -> Tensor:
    """Forward of a fused projection module (bound by :func:`fuse_qkv`)."""
    state, role = self._toolkit_fused_role
    return state.serve(role, x)


def _blocks(model: nn.Module):
    for module in model.modules():
        mods = tuple(getattr(module, r, None) for r in _ROLES)
        if all(isinstance(m, nn.Linear) for m in mods):
            yield module, mods


def fuse_qkv(model: nn.Module) -> int:
    """Fuse the Q/K/V projections of every self-attention block of ``model``; returns how many blocks.

    A block qualifies when it has ``query``, ``key`` and ``value`` ``nn.Linear`` modules (or
    subclasses such as the oneDNN linear) with the same input size and all or none of them with a
    bias. Already fused blocks are skipped. Returns 0 when ``TOOLKIT_FUSED_QKV=0``.
    """
    if fused_qkv_unavailable_reason() is not None:
        return 0
    n = 0
    for module, mods in _blocks(model):
        if getattr(module, _STATE, None) is not None:
            continue
        if len({m.in_features for m in mods}) != 1 or len({m.bias is None for m in mods}) != 1:
            continue
        if any("forward" in m.__dict__ for m in mods):
            continue    # someone else replaced a projection's forward: leave the block alone
        if not any(p.requires_grad for m in mods for p in m.parameters()):
            _colocate(mods)
        state = _FusedQKV(mods)
        setattr(module, _STATE, state)
        for role, m in enumerate(mods):
            m._toolkit_fused_role = (state, role)
            m.forward = types.MethodType(_fused_forward, m)
        n += 1
    return n


def _colocate(mods: Tuple[nn.Linear, ...]) -> None:
    """Move frozen projections' weights (and biases) into one buffer each, parameters as row views."""
    with torch.no_grad():
        for name in ("weight", "bias"):
            params = [getattr(m, name) for m in mods]
            if params[0] is None or _adjacent_rows([p.data for p in params]) is not None:
                continue
            fused = torch.cat([p.data for p in params], 0)
            start = 0
            for p in params:
                rows = p.shape[0]
                p.data = fused[start:start + rows]
                start += rows


def count_fused_qkv(model: nn.Module) -> int:
    """How many self-attention blocks of ``model`` :func:`fuse_qkv` fused."""
    return sum(getattr(module, _STATE, None) is not None for module, _ in _blocks(model))


def unfuse_qkv(model: nn.Module) -> int:
    """Undo :func:`fuse_qkv` (three separate GEMMs again); returns how many blocks."""
    n = 0
    for module, mods in _blocks(model):
        if getattr(module, _STATE, None) is None:
            continue
        for m in mods:
            m.__dict__.pop("forward", None)
            m.__dict__.pop("_toolkit_fused_role", None)
        delattr(module, _STATE)
        n += 1
    return n

