"""The MiniLMv2 relation KL and its implementations, looked up by name.

Every implementation computes the same scalar, ``KL(teacher || student)`` of the
``softmax(x_q x_k^T / sqrt(d))`` relations averaged over relation heads and real query tokens,
with the signature ``fn(t_q, t_k, s_q, s_k, mask, num_relation_heads, chunk_size) -> Tensor``:

=========  ==========================================================  =====================
name       what                                                        ``auto`` picks it
=========  ==========================================================  =====================
chunked    query-blocked PyTorch, memory linear in L                   always (the fallback)
naive      materializes ``[B, R, L, L]`` (short sequences, debugging)  never
triton     fused Triton kernel with a recomputing backward             on CUDA, with triton
=========  ==========================================================  =====================

Other code may add implementations with :func:`register_relation_kl`.
``auto`` runs, per call, the highest-priority implementation whose ``supports`` accepts the
tensors; one that fails at run time (a kernel that does not compile or launch on this machine)
is reported once and skipped from then on, while naming it explicitly makes the failure an error.
"""
from __future__ import annotations

import importlib
import importlib.util
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import Tensor

from toolkit.errors import ConfigError, ToolkitError
from toolkit.losses.relation_kl.chunked import (check_relation_heads, plan_blocks, relation_kl,
                                                relation_kl_qk, validate_relation_inputs)
from toolkit.losses.relation_kl.naive import relation_kl_naive

#: ``fn(t_q, t_k, s_q, s_k, mask, num_relation_heads, chunk_size) -> scalar``.
RelationKLFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, int, Optional[int]], Tensor]
#: ``supports(t_q, t_k, s_q, s_k) -> bool``: whether the implementation can take these tensors.
SupportsFn = Callable[[Tensor, Tensor, Tensor, Tensor], bool]
#: ``describe(batch, heads, seq_len, chunk_size, device) -> str``: one phrase for the job log.
DescribeFn = Callable[[int, int, int, Optional[int], torch.device], str]


@dataclass(frozen=True)
class RelationKLImpl:
    """One registered implementation (see :func:`register_relation_kl`)."""

    name: str
    fn: RelationKLFn
    supports: SupportsFn
    priority: Optional[int]
    describe: DescribeFn


_IMPLS: Dict[str, RelationKLImpl] = {}
#: Implementations ``auto`` stopped using after a run-time failure: name -> the error.
_FAILED: Dict[str, str] = {}


def register_relation_kl(name: str, fn: RelationKLFn, *, supports: Optional[SupportsFn] = None,
                         priority: Optional[int] = None, describe: Optional[DescribeFn] = None) -> None:
    """Add (or replace) the implementation ``name``.

    Args:
        name: what ``loss.impl`` calls it (not ``auto``).
        fn: the implementation, with the signature in the module docstring.
        supports: whether it can take given tensors (default: any).
        priority: ``auto`` runs the highest-priority supporting implementation; None = never
            picked by ``auto``, only by name.
        describe: one phrase for the job log (default: the name).
    """
    if not name or name == "auto":
        raise ValueError(f"cannot register a relation-KL implementation named {name!r}")
    _IMPLS[name] = RelationKLImpl(name, fn, supports or (lambda *_: True), priority,
                                  describe or (lambda *_: name))
    _FAILED.pop(name, None)


def unregister_relation_kl(name: str) -> None:
    """Remove ``name`` (no error when it is not registered)."""
    _IMPLS.pop(name, None)
    _FAILED.pop(name, None)


def relation_kl_names() -> List[str]:
    """``auto`` and every registered name."""
    return ["auto", *sorted(_IMPLS)]


def check_relation_kl_name(name: str, field: str = "impl") -> None:
    """ConfigError naming ``field`` unless ``name`` is ``auto`` or registered."""
    if name != "auto" and name not in _IMPLS:
        raise ConfigError(field, f"unknown relation-KL implementation {name!r}; choose one of "
                                 f"{', '.join(relation_kl_names())}")


def _candidates(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor) -> List[RelationKLImpl]:
    """What ``auto`` would try for these tensors, best first."""
    ranked = sorted((i for i in _IMPLS.values() if i.priority is not None and i.name not in _FAILED),
                    key=lambda i: -i.priority)
    return [i for i in ranked if i.supports(t_q, t_k, s_q, s_k)]


def resolve_relation_kl(name: str, t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor) -> str:
    """The implementation ``name`` runs for these tensors (``auto`` resolved)."""
    check_relation_kl_name(name)
    if name != "auto":
        return name
    found = _candidates(t_q, t_k, s_q, s_k)
    return found[0].name if found else "chunked"


def compute_relation_kl(name: str, t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor,
                        num_relation_heads: int, chunk_size: Optional[int] = None) -> Tensor:
    """The relation KL on implementation ``name`` (``auto``: the best that supports the tensors)."""
    if name != "auto":
        check_relation_kl_name(name)
        return _IMPLS[name].fn(t_q, t_k, s_q, s_k, mask, num_relation_heads, chunk_size)
    for impl in _candidates(t_q, t_k, s_q, s_k):
        if impl.name == "chunked":
            break
        try:
            return impl.fn(t_q, t_k, s_q, s_k, mask, num_relation_heads, chunk_size)
        except (ConfigError, ToolkitError):
            raise   # the caller's inputs are wrong: the fallback would say the same
        except Exception as exc:  # noqa: BLE001 - an optional kernel that fails to compile or launch here
            _FAILED[impl.name] = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"relation KL: {impl.name} failed on this machine ({_FAILED[impl.name]}); using the "
                          f"next implementation from now on (loss.impl: chunked silences this, loss.impl: "
                          f"{impl.name} makes it an error)", RuntimeWarning, stacklevel=2)
    return relation_kl_qk(t_q, t_k, s_q, s_k, mask, num_relation_heads, chunk_size)


def describe_relation_kl(impl: str, device: torch.device, batch: int, heads: int, seq_len: int,
                         chunk_size: Optional[int] = None, dtype: torch.dtype = torch.float32) -> str:
    """What ``impl`` runs for ``[batch, seq_len]`` inputs of ``dtype`` on ``device``, for the job
    log, e.g. ``"chunked (blocks of 5 samples x 128 query rows)"``."""
    device = torch.device(device)
    probe = torch.empty(1, 1, heads, device=device, dtype=dtype)
    name = resolve_relation_kl(impl, probe, probe, probe, probe)
    return _IMPLS[name].describe(batch, heads, seq_len, chunk_size, device)


def failed_implementations() -> Dict[str, str]:
    """Implementations ``auto`` stopped using after a run-time failure, with the error."""
    return dict(_FAILED)


# ----- the built-in implementations ---------------------------------------------------------

def _describe_chunked(batch: int, heads: int, seq_len: int, chunk_size: Optional[int], device: torch.device) -> str:
    samples, rows = plan_blocks(batch, heads, seq_len, device.type == "cpu", chunk_size)
    return f"chunked (blocks of {samples} sample{'s' if samples > 1 else ''} x {rows} query rows)"


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _triton_supports(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor) -> bool:
    return s_q.is_cuda and _triton_importable()


def _relation_kl_triton(t_q: Tensor, t_k: Tensor, s_q: Tensor, s_k: Tensor, mask: Tensor,
                        num_relation_heads: int, chunk_size: Optional[int] = None) -> Tensor:
    # Imported on first use: the module imports triton, which is heavy and GPU-only.
    module = importlib.import_module("toolkit.losses.relation_kl.triton")
    return module.relation_kl_qk(t_q, t_k, s_q, s_k, mask, num_relation_heads, chunk_size)


register_relation_kl("chunked", relation_kl_qk, priority=0, describe=_describe_chunked)
register_relation_kl("naive", relation_kl_naive, describe=lambda *_: "naive (materializes [B, R, L, L])")
def _describe_triton(batch: int, heads: int, seq_len: int, chunk_size: Optional[int], device: torch.device) -> str:
    if device.type == "cuda":
        return "triton (fused kernel, recomputing backward)"
    # The kernel's entry hands CPU tensors to the chunked path.
    return _describe_chunked(batch, heads, seq_len, chunk_size, device) + "; triton runs on CUDA only"


register_relation_kl("triton", _relation_kl_triton, supports=_triton_supports, priority=20,
                     describe=_describe_triton)

__all__ = ["RelationKLFn", "RelationKLImpl", "check_relation_heads", "check_relation_kl_name",
           "compute_relation_kl", "describe_relation_kl", "failed_implementations", "register_relation_kl",
           "relation_kl", "relation_kl_naive", "relation_kl_names", "relation_kl_qk", "resolve_relation_kl",
           "unregister_relation_kl", "validate_relation_inputs"]
