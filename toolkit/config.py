"""Typed job configuration: dataclasses loaded from YAML plus ``key=value`` overrides.

Each job (teacher, distill, finetune, eval, pipeline) has one config dataclass. Fields are
declared with :func:`arg`, whose ``help`` text becomes the CLI's ``--help`` listing, and
``__post_init__`` rejects contradictions naming the field. Engine settings (micro batch,
gradient accumulation, precision, ZeRO stage) are *not* here: the DeepSpeed JSON owns them.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Type, TypeVar, Union

import yaml

from toolkit.errors import ConfigError, DataError

T = TypeVar("T")


def arg(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None) -> Any:
    """Declare a config field with a one-line help text.

    Args:
        default: default value (immutable); use ``factory`` for lists/dicts/dataclasses.
        help: one line shown in ``toolkit <job> --help`` and in docs.
        factory: zero-arg callable producing the default.
    """
    md = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=md)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=md)
    return dataclasses.field(default=default, metadata=md)


def _strip_optional(tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _coerce(value: Any, tp: Any, field: str, source: Optional[str]) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise ConfigError naming the field."""
    if value is None:
        return None
    tp = _strip_optional(tp)
    origin = typing.get_origin(tp)
    try:
        if dataclasses.is_dataclass(tp):
            if isinstance(value, tp):
                return value
            if not isinstance(value, dict):
                raise ConfigError(field, f"expected a mapping for {tp.__name__}, got {value!r}", source)
            return _from_dict(tp, value, prefix=field + ".", source=source)
        if origin in (list, List, tuple) or tp in (list, tuple):
            (inner,) = typing.get_args(tp)[:1] or (Any,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
            if not isinstance(value, (list, tuple)):
                value = [value]
            return [_coerce(v, inner, f"{field}[{i}]", source) for i, v in enumerate(value)]
        if origin in (dict, Dict) or tp is dict:
            if isinstance(value, str):
                value = yaml.safe_load(value)
            if not isinstance(value, dict):
                raise ConfigError(field, f"expected a mapping, got {value!r}", source)
            args = typing.get_args(tp)
            vt = args[1] if len(args) == 2 else Any
            return {k: _coerce(v, vt, f"{field}.{k}", source) for k, v in value.items()}
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
                return True
            if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
                return False
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if tp is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if tp is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return str(value)
        if typing.get_origin(tp) is typing.Literal:
            allowed = typing.get_args(tp)
            if value not in allowed:
                raise ConfigError(field, f"must be one of {list(allowed)}, got {value!r}", source)
            return value
    except ConfigError:
        raise
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise ConfigError(field, f"expected {name}, got {value!r}", source) from None
    return value


def _overlay(base: Any, data: Dict[str, Any]) -> Dict[str, Any]:
    """The fields of dataclass instance ``base`` with ``data`` written over them, nested sections
    alike: a partial section keeps the job's own defaults (``optim: {impl: ...}`` in a teacher job
    keeps the teacher's lr and warmup, not OptimConfig's)."""
    out: Dict[str, Any] = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
    for key, value in data.items():
        current = out.get(key)
        if isinstance(value, dict) and dataclasses.is_dataclass(current) and not isinstance(current, type):
            out[key] = _overlay(current, value)
        else:
            out[key] = value
    return out


def _from_dict(cls: Type[T], data: Dict[str, Any], prefix: str = "", source: Optional[str] = None) -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        moved = getattr(cls, "MOVED_FIELDS", {}).get(unknown[0])
        if moved:
            raise ConfigError(prefix + unknown[0], f"this field is now '{prefix}{moved}'", source)
        raise ConfigError(prefix + unknown[0], f"unknown field; valid fields are: {', '.join(sorted(fields))}", source)
    kwargs = {}
    for name, value in data.items():
        factory = fields[name].default_factory  # type: ignore[misc]
        if isinstance(value, dict) and factory is not dataclasses.MISSING:
            base = factory()
            if dataclasses.is_dataclass(base) and not isinstance(base, type):
                value = _overlay(base, value)
        kwargs[name] = _coerce(value, hints[name], prefix + name, source)
    missing = [n for n, f in fields.items() if n not in kwargs and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
    if missing:
        raise ConfigError(prefix + missing[0], "is required", source)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # A nested dataclass's __post_init__ names its own field; give it the full dotted path.
        field = e.field if not prefix or e.field.startswith(prefix) else prefix + e.field
        if field != e.field or (source and e.source is None):
            raise ConfigError(field, e.message, e.source or source) from None
        raise


def _field_type(cls: Optional[Type[Any]], parts: List[str]) -> Any:
    """The annotated type at dotted path ``parts`` of dataclass ``cls`` (Any when unknown)."""
    tp: Any = cls
    for part in parts:
        tp = _strip_optional(tp)
        if dataclasses.is_dataclass(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                return Any
            tp = hints[part]
        elif typing.get_origin(tp) in (dict, Dict):
            args = typing.get_args(tp)
            tp = args[1] if len(args) == 2 else Any
        else:
            return Any
    return _strip_optional(tp)


def _override_value(raw: str, tp: Any) -> Any:
    """An override's text for a field of type ``tp``: kept as written for typed scalar fields
    (the field's own conversion reads it: ``teacher=0755`` stays the path "0755", ``lr=6e-4`` a
    float), parsed as a YAML scalar or flow collection otherwise (``Any``, dict-valued fields)."""
    origin = typing.get_origin(tp)
    scalar = tp in (str, int, float, bool) or origin is typing.Literal
    listy = origin in (list, List, tuple) or tp in (list, tuple)
    if tp in (int, float, bool) and raw.strip() in ("null", "~"):
        return None
    if scalar or (listy and not raw.lstrip().startswith("[")):
        return raw
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def parse_overrides(overrides: Iterable[str], cls: Optional[Type[Any]] = None) -> Dict[str, Any]:
    """Turn ``["a.b=3", "c=x"]`` into a nested dict.

    With the config dataclass ``cls``, a value for a typed field keeps its text for that
    field's conversion (see :func:`_override_value`); other values parse as YAML scalars.
    """
    out: Dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like key=value (e.g. train.max_steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(item, "override has an empty key")
        parts = key.split(".")
        val = _override_value(raw, _field_type(cls, parts) if cls is not None else Any)
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "conflicts with another override")
        node[parts[-1]] = val
    return out


def nest(options: Dict[str, Any]) -> Dict[str, Any]:
    """``{"corpus.sources": x}`` -> ``{"corpus": {"sources": x}}`` (values kept as they are)."""
    out: Dict[str, Any] = {}
    for key, val in options.items():
        parts = key.split(".")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = val
    return out


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: Union[str, Path]) -> Dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``; errors name the file and line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "file not found" if not p.exists() else "not a file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise DataError(p, f"not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise DataError(p, f"invalid YAML: {getattr(e, 'problem', e)}",
                        line=mark.line + 1 if mark is not None else None) from None
    if not isinstance(data, dict):
        raise DataError(p, f"the top level must be a mapping of fields, got a {type(data).__name__}", line=1)
    return data


def load_config(cls: Type[T], path: Union[str, Path, None] = None, overrides: Iterable[str] = (),
                base: Optional[Dict[str, Any]] = None, options: Optional[Dict[str, Any]] = None) -> T:
    """Build config ``cls`` from a base dict, an optional YAML file, typed ``options`` and
    ``key=value`` overrides (each wins over the ones before).

    ``options`` maps dotted field names to values already typed (the CLI's options: never
    parsed again). Relative paths inside the YAML stay as written; recipes resolve them
    against the working directory, which is how users expect CLI paths to behave.
    """
    data: Dict[str, Any] = dict(base or {})
    source = None
    if path is not None:
        data = _merge(data, read_yaml(path))
        source = str(path)
    data = _merge(data, nest(dict(options or {})))
    data = _merge(data, parse_overrides(overrides, cls))
    return _from_dict(cls, data, source=source)


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A JSON-able dict of a config dataclass (for logging and ``config.json`` in outputs)."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return conv(cfg)


def save_config(cfg: Any, path: Union[str, Path]) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2, sort_keys=False) + "\n", encoding="utf-8")


def describe(cls: Type[Any], prefix: str = "") -> List[str]:
    """Lines ``name (type, default): help`` for every field, nested ones dotted.

    Used to build ``--help`` text so that every option is documented in one place.
    """
    lines: List[str] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _strip_optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            lines.extend(describe(tp, prefix + f.name + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "required"
        tname = getattr(tp, "__name__", str(tp).replace("typing.", ""))
        lines.append(f"{prefix}{f.name} ({tname}, default {default}): {f.metadata.get('help', '')}")
    return lines
