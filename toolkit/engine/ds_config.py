"""Load and check a DeepSpeed JSON before DeepSpeed sees it.

The JSON is the single source of truth for engine settings (micro batch, accumulation,
precision, ZeRO). The toolkit builds the optimizer and LR schedule itself from the job
YAML, so ``optimizer``/``scheduler`` blocks are rejected instead of silently competing.
Batch sizes are resolved here for the actual world size so the shipped JSONs can leave
``train_batch_size`` out and work on any number of ranks.

Every key is checked against the keys the installed DeepSpeed accepts (:func:`check_ds_keys`),
found from DeepSpeed itself: the top-level and key-by-key blocks by recording what its
``DeepSpeedConfig`` reads, the pydantic blocks (``zero_optimization``, ``bf16``, ...) from
their models' fields. A typo is one ``ConfigError`` naming the key, the file and the nearest
accepted key, before any model is built.
"""
from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import json
import logging
import typing
from pathlib import Path
from typing import Any, Dict, FrozenSet, Iterator, List, Optional, Set, Tuple, Union

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


def load_ds_config(path_or_dict: Union[str, Path, Dict[str, Any]], world_size: int,
                   check_keys: bool = True) -> Dict[str, Any]:
    """Read, check and complete a DeepSpeed config for ``world_size`` data-parallel ranks.

    Returns a new dict with micro batch, accumulation and global batch all set and
    consistent. Raises DataError for an unreadable file (with the line of a JSON error)
    and ConfigError naming the field for contradictions, unknown keys (``check_keys``,
    :func:`check_ds_keys`) and values DeepSpeed's own config models refuse.
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
    if check_keys:
        check_ds_keys(cfg, source)
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
    if check_keys:
        # DeepSpeed's own parsing last, on the completed batch sizes: its config models'
        # type checks and cross-field rules, as one line each.
        deepspeed_view(cfg, source)
    return cfg


# -- keys DeepSpeed accepts --------------------------------------------------------------------
#: A batch set-up every DeepSpeed config parse needs (one rank, no accumulation).
_PROBE_BATCH = {MB: 1, GAS: 1}
_PROBE_KEY = "toolkit_probe_key"


class _Recorder(dict):
    """A dict that records every key DeepSpeed looks up in it (``get``, ``[]``, ``in``,
    ``keys()``), as dotted paths into one shared set; nested dicts record too."""

    def __init__(self, data: Dict[str, Any], log: Set[str], path: str = ""):
        super().__init__()
        self._log, self._path = log, path
        for k, v in data.items():
            dict.__setitem__(self, k, _Recorder(v, log, f"{path}{k}.") if isinstance(v, dict) else v)

    def _read(self, key: Any) -> None:
        self._log.add(f"{self._path}{key}")

    def get(self, key: Any, default: Any = None) -> Any:
        self._read(key)
        return dict.get(self, key, default)

    def __getitem__(self, key: Any) -> Any:
        self._read(key)
        return dict.__getitem__(self, key)

    def __contains__(self, key: Any) -> bool:
        self._read(key)
        return dict.__contains__(self, key)

    def keys(self) -> Any:  # ``KEY in param_dict.keys()`` is how some blocks are looked up
        return _RecordingKeys(self)

    def __copy__(self) -> "_Recorder":
        out = _Recorder({}, self._log, self._path)
        dict.update(out, self)
        return out

    copy = __copy__


class _RecordingKeys:
    def __init__(self, owner: _Recorder):
        self._owner = owner

    def __contains__(self, key: Any) -> bool:
        return key in self._owner

    def __iter__(self) -> Iterator[Any]:
        return iter(dict.keys(self._owner))

    def __len__(self) -> int:
        return dict.__len__(self._owner)


@contextlib.contextmanager
def _quiet_deepspeed() -> Iterator[None]:
    """DeepSpeed logs its parse (and deprecation notes, repeated when the engine is built)."""
    from deepspeed.utils import logger

    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _parse(cfg: Dict[str, Any]) -> Tuple[Any, Set[str]]:
    """``DeepSpeedConfig(cfg)`` on a recording copy: (the parsed config, the keys it read)."""
    from deepspeed.runtime.config import DeepSpeedConfig

    log: Set[str] = set()
    with _quiet_deepspeed():
        parsed = DeepSpeedConfig(_Recorder(cfg, log))
    return parsed, log


@functools.lru_cache(maxsize=None)
def accepted_top_keys() -> FrozenSet[str]:
    """The top-level keys the installed DeepSpeed reads (its ``DeepSpeedConfig``)."""
    _, log = _parse(dict(_PROBE_BATCH))
    return frozenset(k for k in log if "." not in k) | frozenset(_OWNED_BY_TOOLKIT)


@functools.lru_cache(maxsize=None)
def _block_schema(key: str) -> Tuple[str, Optional[str], FrozenSet[str]]:
    """How DeepSpeed reads the block under top-level ``key``:

    ``("model", title, {})`` for a pydantic config model of the block (it refuses unknown keys
    itself; the title names the model), ``("rooted", title, {})`` for a model over the whole
    config whose errors start at the block's key (the monitors), ``("reads", None, keys)`` for a
    block read key by key (``keys``: what it read with the block enabled), ``("open", None, {})``
    when nothing nested is read.
    """
    from pydantic import ValidationError

    try:
        _, log = _parse({**_PROBE_BATCH, key: {"enabled": True, _PROBE_KEY: 0}})
    except ValidationError as e:
        for err in e.errors():
            loc = tuple(err["loc"])
            if loc == (_PROBE_KEY,):
                return "model", e.title, frozenset()
            if loc == (key, _PROBE_KEY):
                return "rooted", e.title, frozenset()
        return "open", None, frozenset()
    except Exception:  # noqa: BLE001 - a removed/refused block: DeepSpeed's own message comes later
        return "open", None, frozenset()
    prefix = key + "."
    nested = frozenset(k[len(prefix):].split(".")[0] for k in log if k.startswith(prefix))
    nested -= {_PROBE_KEY}
    return ("reads", None, nested) if nested else ("open", None, frozenset())


@functools.lru_cache(maxsize=None)
def _deepspeed_constants() -> Tuple[Tuple[str, str], ...]:
    """``(NAME, "key")`` of every key-like string constant in DeepSpeed's loaded config and
    constants modules (``FP16_LOSS_SCALE_WINDOW = "loss_scale_window"``)."""
    import sys

    accepted_top_keys()   # DeepSpeed's config modules are loaded by its parse
    out = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("deepspeed.") or not name.endswith(("constants", "config")):
            continue
        for attr, value in vars(module).items():
            if attr.isupper() and isinstance(value, str) and value.isidentifier():
                out.append((attr, value))
    return tuple(out)


def _constant_children(key: str) -> FrozenSet[str]:
    """Keys DeepSpeed names under block ``key`` in its constants: for ``FP16 = "fp16"``, the
    values of ``FP16_*`` (defaults excluded). Covers keys it reads only in some set-ups."""
    consts = _deepspeed_constants()
    prefixes = {name + "_" for name, value in consts if value == key}
    return frozenset(value for name, value in consts
                     if not name.endswith("_DEFAULT") and any(name.startswith(p) for p in prefixes))


def _read_by(cfg: Dict[str, Any]) -> Set[str]:
    """The keys DeepSpeed reads when it parses ``cfg`` itself (some only when others are set);
    a parse that fails reads what it read so far (the failure is reported later)."""
    log: Set[str] = set()
    probe = {k: v for k, v in cfg.items() if k not in (MB, GAS, TBS)}
    try:
        from deepspeed.runtime.config import DeepSpeedConfig

        with _quiet_deepspeed():
            DeepSpeedConfig(_Recorder({**probe, **_PROBE_BATCH}, log))
    except Exception:  # noqa: BLE001 - deepspeed_view reports DeepSpeed's refusal, with the key
        pass
    return log


def _did_you_mean(key: str, candidates: Any) -> str:
    close = difflib.get_close_matches(str(key), sorted(str(c) for c in candidates), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def check_ds_keys(cfg: Dict[str, Any], source: Optional[str] = None) -> None:
    """Raise one ConfigError for the first key of ``cfg`` the installed DeepSpeed does not
    accept: top-level keys, keys of the blocks DeepSpeed reads key by key, and keys of its
    pydantic blocks (``zero_optimization.offload_param.pin_memory``, ...), with the nearest
    accepted key ("did you mean ...").
    """
    top = accepted_top_keys()
    for key in cfg:
        if key not in top:
            raise ConfigError(str(key), "not a DeepSpeed config key (DeepSpeed would ignore it)"
                              + _did_you_mean(key, top), source)
    blocks = [k for k, v in cfg.items() if isinstance(v, dict) and _block_schema(k)[0] == "reads"]
    read = _read_by(cfg) if blocks else set()
    for key in blocks:
        nested = (_block_schema(key)[2] | _constant_children(key)
                  | {r[len(key) + 1:].split(".")[0] for r in read if r.startswith(key + ".")})
        for sub in cfg[key]:
            if sub not in nested:
                raise ConfigError(f"{key}.{sub}", "not a DeepSpeed config key (DeepSpeed would ignore it)"
                                  + _did_you_mean(sub, nested), source)


def _model_class(title: str) -> Any:
    """The DeepSpeed pydantic config model named ``title`` (a ValidationError's title)."""
    from pydantic import BaseModel

    stack, seen = [BaseModel], set()
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            if sub in seen:
                continue
            seen.add(sub)
            if sub.__name__ == title and sub.__module__.startswith("deepspeed"):
                return sub
            stack.append(sub)
    return None


def _nested_model(model: Any, name: str) -> Any:
    """The pydantic model type of ``model``'s field ``name`` (by name or alias), or None."""
    from pydantic import BaseModel

    for fname, field in getattr(model, "model_fields", {}).items():
        if name not in (fname, field.alias):
            continue
        todo = [field.annotation]
        while todo:
            tp = todo.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                return tp
            todo.extend(typing.get_args(tp))
    return None


def _field_names(model: Any) -> List[str]:
    out = []
    for fname, field in getattr(model, "model_fields", {}).items():
        out.append(fname)
        if field.alias:
            out.append(field.alias)
    return out


def _validation_error(e: Any, cfg: Dict[str, Any], source: Optional[str]) -> ConfigError:
    """A pydantic ValidationError from DeepSpeed's config models as one ConfigError naming the
    dotted key (with its top-level block) and what is wrong."""
    err = e.errors()[0]
    loc = tuple(str(x) for x in err["loc"])
    root = _model_class(e.title)
    if loc and isinstance(cfg.get(loc[0]), dict) and _block_schema(loc[0])[0] == "rooted":
        path = loc
    else:
        blocks = [k for k, v in cfg.items() if isinstance(v, dict) and _block_schema(k)[:2] == ("model", e.title)]
        path = (blocks[0], *loc) if blocks else loc
    field = ".".join(path) or "deepspeed"
    if err["type"] == "extra_forbidden":
        model = root
        for name in loc[:-1]:
            model = _nested_model(model, name) if model is not None else None
        return ConfigError(field, "not a DeepSpeed config key" + (_did_you_mean(loc[-1], _field_names(model))
                                                                  if model is not None else ""), source)
    return ConfigError(field, f"{err['msg']} (got {err.get('input')!r})", source)


def _config_error_class() -> type:
    """DeepSpeed's own config refusal (removed blocks, bad combinations)."""
    try:
        from deepspeed.runtime.config import DeepSpeedConfigError
    except ImportError:  # pragma: no cover - older layouts
        return ValueError
    return DeepSpeedConfigError


def deepspeed_view(cfg: Dict[str, Any], source: Optional[str] = None) -> Any:
    """DeepSpeed's own parse of a checked, batch-complete config (its ``DeepSpeedConfig``:
    ``zero_config``, ``bfloat16_config``, ...), with every refusal as one ConfigError.

    The batch sizes are handed over per rank (micro batch and accumulation), so the parse
    holds for whatever world size DeepSpeed sees here.
    """
    from pydantic import ValidationError

    probe = {k: v for k, v in cfg.items() if k != TBS}
    try:
        parsed, _ = _parse(probe)
    except ValidationError as e:
        raise _validation_error(e, cfg, source) from None
    except Exception as e:  # noqa: BLE001 - any refusal of DeepSpeed's parse is a config problem
        text = str(e).strip().splitlines()[0] if str(e).strip() else ""
        what = text if isinstance(e, (_config_error_class(), AssertionError)) else f"{type(e).__name__}: {text}"
        keys = [k for k in cfg if f"'{k}'" in text or f"\"{k}\"" in text or k in type(e).__name__.lower()]
        raise ConfigError(keys[0] if keys else "deepspeed", f"DeepSpeed refuses this config: {what}",
                          source) from None
    return parsed
