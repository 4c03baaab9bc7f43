"""Seeding and RNG state capture for exact resume.

``rng_state()`` returns every generator the training loop draws from (Python, NumPy, torch
CPU and, where present, all CUDA devices) so a checkpoint can put them back bit for bit. It
holds only tensors and plain types, so it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch

from toolkit.errors import ToolkitError


def set_seed(seed: int, rank: int = 0) -> int:
    """Seed Python, NumPy and torch (CPU and CUDA) with ``seed + rank``.

    Adding the rank keeps dropout masks and sampling independent across data-parallel
    ranks while staying reproducible. Returns the effective seed.
    """
    eff = int(seed) + int(rank)
    random.seed(eff)
    # NumPy only accepts 32-bit seeds.
    np.random.seed(eff % (2 ** 32))
    torch.manual_seed(eff)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(eff)
    return eff


def _numpy_state() -> Dict[str, Any]:
    """NumPy's global MT19937 state with its key as a tensor (no numpy objects in a checkpoint)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"name": str(name), "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos),
            "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)}


def _numpy_legacy(state: Any) -> Any:
    if isinstance(state, dict):
        key = np.asarray(state["key"].numpy() if hasattr(state["key"], "numpy") else state["key"], dtype=np.uint32)
        return state["name"], key, state["pos"], state["has_gauss"], state["cached_gaussian"]
    return state   # the tuple np.random.get_state() returns


def rng_state() -> Dict[str, Any]:
    """Snapshot of all RNG states: ``{"python", "numpy", "torch", "cuda"?}``."""
    state: Dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore a snapshot from :func:`rng_state`.

    A snapshot taken with CUDA restores on a CPU-only machine (the CUDA part is skipped);
    the reverse leaves CUDA generators as they are.
    """
    missing = [k for k in ("python", "numpy", "torch") if k not in state]
    if missing:
        raise ToolkitError(f"RNG state in the checkpoint lacks {missing}; it was not written by rng_state()")
    random.setstate(state["python"])
    np.random.set_state(_numpy_legacy(state["numpy"]))
    torch.set_rng_state(state["torch"].cpu() if hasattr(state["torch"], "cpu") else state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        # A job resumed on fewer GPUs per node restores the devices it has.
        n = min(len(cuda_states), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda_states[i].cpu(), device=i)
