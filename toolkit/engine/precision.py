"""Decide the compute precision from the DeepSpeed JSON and the hardware.

bf16/fp16 on a CPU without native bf16 instructions are emulated and orders of magnitude
slower than fp32, and DeepSpeed rejects fp16 on CPU outright, so
such configs are switched to fp32 with one clear warning instead of crawling or crashing.
DeepSpeed's own ``is_bf16_supported()`` says True on such CPUs; PyTorch's mkldnn check is right.
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Dict, Optional, Tuple, Union

import torch

from toolkit.utils.logging import get_logger

Device = Union[str, torch.device]


def _dev(device: Device) -> torch.device:
    return torch.device(device)


def native_bf16_supported(device: Device) -> bool:
    """True when ``device`` runs bf16 matmuls natively (CUDA Ampere+, CPUs with AVX512-BF16/AMX)."""
    dev = _dev(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _enabled(cfg: Dict[str, Any], key: str) -> bool:
    block = cfg.get(key)
    return isinstance(block, dict) and bool(block.get("enabled", False))


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    # lru_cache is the "once": the same message is logged a single time per process.
    get_logger("engine.precision").warning(message)


def resolve_precision(ds_config: Dict[str, Any], device: Device
                      ) -> Tuple[Dict[str, Any], torch.dtype, Optional[str]]:
    """Return ``(config_copy, compute_dtype, note)`` for ``device``.

    On CUDA bf16/fp16 are kept. On a CPU without native bf16 a bf16 or fp16 config is
    switched to fp32 and ``note`` explains it (also logged once). On a CPU with native bf16
    bf16 is kept and fp16 (unsupported by DeepSpeed on CPU) becomes bf16.
    """
    cfg = copy.deepcopy(ds_config)
    dev = _dev(device)
    # DeepSpeed accepts "bfloat16" as an alias of "bf16".
    if "bfloat16" in cfg and "bf16" not in cfg:
        cfg["bf16"] = cfg.pop("bfloat16")
    bf16, fp16 = _enabled(cfg, "bf16"), _enabled(cfg, "fp16")
    if dev.type == "cuda":
        if bf16:
            note = None
            if not native_bf16_supported(dev):
                note = ("the DeepSpeed config asks for bf16, but this GPU has no native bf16 (before "
                        "Ampere it is emulated and slow); use ds_configs/zero2_fp16.json (or ds_config: auto)")
                _warn_once(note)
            return cfg, torch.bfloat16, note
        if fp16:
            return cfg, torch.float16, None
        return cfg, torch.float32, None
    if not (bf16 or fp16):
        return cfg, torch.float32, None
    asked = "bf16" if bf16 else "fp16"
    if native_bf16_supported(dev):
        if fp16:
            cfg["fp16"] = {"enabled": False}
            cfg["bf16"] = {"enabled": True}
            note = ("the DeepSpeed config asks for fp16, which DeepSpeed does not support on CPU; "
                    "using bf16 (this CPU has native bf16)")
            _warn_once(note)
            return cfg, torch.bfloat16, note
        return cfg, torch.bfloat16, None
    for key in ("bf16", "fp16"):
        if key in cfg:
            cfg[key] = {"enabled": False}
    note = (f"the DeepSpeed config asks for {asked}, but this CPU has no native bf16/fp16 "
            f"(it would be emulated, ~400x slower); training in fp32 instead. Use "
            f"ds_configs/cpu_fp32.json on CPU to silence this.")
    _warn_once(note)
    return cfg, torch.float32, note


def teacher_dtype(device: Device, compute_dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """Dtype for a frozen teacher.

    CUDA: bf16 where supported, else fp16, whatever the job's precision (a frozen teacher needs
    no fp32 master weights). CPU: bf16 when the job itself computes in bf16 (``compute_dtype``
    from :func:`resolve_precision`, which allows it only on CPUs with native bf16), else fp32.
    """
    dev = _dev(device)
    if dev.type == "cuda":
        return torch.bfloat16 if native_bf16_supported(dev) else torch.float16
    return torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32
