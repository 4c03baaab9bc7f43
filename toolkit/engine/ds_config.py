"""Load and check a DeepSpeed JSON before DeepSpeed sees it.

The JSON is the single source of truth for engine settings (micro batch, accumulation,
precision, ZeRO). The toolkit builds the optimizer and LR schedule itself from the job
YAML, so ``optimizer``/``scheduler`` blocks are rejected instead of silently competing.
Batch sizes are resolved here for the actual world size so the shipped JSONs can leave
``train_batch_size`` out and work on any number of ranks.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Optional, Union

from toolkit.errors import ConfigError, DataError

MB = "train_micro_batch_size_per_gpu"
GAS = "gradient_accumulation_steps"
TBS = "train_batch_size"
_OWNED_BY_TOOLKIT = {
    "optimizer": "set lr, weight_decay, betas and eps in the job YAML (optim section) instead",
    "scheduler": "set warmup_steps/warmup_ratio/decay in the job YAML (optim section) instead",
}


def _read_json(path: Path) -> Dict[str, Any]:
    if not path.is_file():
        raise DataError(path, "DeepSpeed config file not found", hint="pass one of ds_configs/*.json")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON at column {e.colno}: {e.msg}", line=e.lineno,
                        hint="DeepSpeed configs are strict JSON: no comments or trailing commas") from None
    if not isinstance(data, dict):
        raise DataError(path, f"top level must be a JSON object, got {type(data).__name__}", line=1)
    return data


def _batch_value(cfg: Dict[str, Any], key: str, source: Optional[str]) -> Optional[int]:
    v = cfg.get(key)
    if v is None or v == "auto":
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(key, f"must be a positive integer or \"auto\", got {v!r}", source)
    return v


def _resolve_batch(cfg: Dict[str, Any], world_size: int, source: Optional[str]) -> None:
    mb, gas, tbs = (_batch_value(cfg, k, source) for k in (MB, GAS, TBS))
    ws = world_size
    if mb is not None and gas is not None and tbs is not None:
        if mb * gas * ws != tbs:
            raise ConfigError(TBS, f"{TBS}={tbs} != {MB}={mb} x {GAS}={gas} x world size {ws} "
                              f"(= {mb * gas * ws}); drop {TBS} to derive it", source)
    elif mb is not None and gas is not None:
        tbs = mb * gas * ws
    elif tbs is not None and (mb is not None or gas is not None):
        known_key, known = (MB, mb) if mb is not None else (GAS, gas)
        missing_key = GAS if mb is not None else MB
        if tbs % (known * ws):
            raise ConfigError(TBS, f"{TBS}={tbs} is not divisible by {known_key}={known} x world size "
                              f"{ws}, so {missing_key} cannot be derived; choose sizes that divide", source)
        if mb is not None:
            gas = tbs // (mb * ws)
        else:
            mb = tbs // (gas * ws)
    elif tbs is not None:
        if tbs % ws:
            raise ConfigError(TBS, f"{TBS}={tbs} is not divisible by world size {ws}; "
                              f"set {MB} and {GAS} instead", source)
        mb, gas = tbs // ws, 1
    elif mb is not None:
        gas = 1
        tbs = mb * ws
    else:
        raise ConfigError(MB, f"is required (with {GAS}, default 1); {TBS} is derived from them", source)
    cfg[MB], cfg[GAS], cfg[TBS] = mb, gas, tbs


def load_ds_config(path_or_dict: Union[str, Path, Dict[str, Any]], world_size: int) -> Dict[str, Any]:
    """Read, check and complete a DeepSpeed config for ``world_size`` data-parallel ranks.

    Returns a new dict with micro batch, accumulation and global batch all set and
    consistent. Raises DataError for an unreadable file (with the line of a JSON error)
    and ConfigError naming the field for contradictions.
    """
    if isinstance(path_or_dict, dict):
        cfg, source = copy.deepcopy(path_or_dict), None
    else:
        path = Path(path_or_dict)
        cfg, source = _read_json(path), str(path)
    if world_size < 1:
        raise ConfigError("world_size", f"must be >= 1, got {world_size}", source)
    for key, what in _OWNED_BY_TOOLKIT.items():
        if key in cfg:
            raise ConfigError(key, f"the toolkit builds the {key} itself; remove this block and {what}", source)
    _resolve_batch(cfg, world_size, source)

    def enabled(key: str) -> bool:
        block = cfg.get(key)
        if block is None:
            return False
        if not isinstance(block, dict):
            raise ConfigError(key, f"must be an object like {{\"enabled\": true}}, got {block!r}", source)
        return bool(block.get("enabled", False))

    if "bfloat16" in cfg and "bf16" in cfg:
        raise ConfigError("bfloat16", "give either \"bf16\" or its alias \"bfloat16\", not both", source)
    bf16 = enabled("bf16") or enabled("bfloat16")
    if bf16 and enabled("fp16"):
        raise ConfigError("fp16", "both bf16 and fp16 are enabled; enable one (bf16 on Ampere+ GPUs)", source)

    zero = cfg.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ConfigError("zero_optimization", f"must be an object, got {zero!r}", source)
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage <= 3:
        raise ConfigError("zero_optimization.stage", f"must be 0, 1, 2 or 3, got {stage!r}", source)

    clip = cfg.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ConfigError("gradient_clipping", f"must be a number >= 0 (0 = off), got {clip!r}", source)
    return cfg
