"""Task registry: names, groups, and custom YAML task files.

``resolve_tasks("glue,my_task.yaml", data_dir="glue_data")`` returns task instances whose
``data_dir`` points at each task's own folder. Task families register on import of
:mod:`toolkit.tasks` (see ``toolkit/tasks/__init__.py``).
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Type, Union

from toolkit.errors import ToolkitError
from toolkit.tasks.base import Task

_TASKS: Dict[str, Type[Task]] = {}
_GROUPS: Dict[str, List[str]] = {}


def register_task(cls: Type[Task]) -> Type[Task]:
    """Class decorator: make ``cls`` loadable by ``cls.name`` (lower case)."""
    key = cls.name.lower()
    if not key:
        raise ValueError(f"{cls.__name__} has no name")
    if key in _TASKS and _TASKS[key] is not cls:
        raise ValueError(f"task name '{key}' registered twice ({_TASKS[key].__name__}, {cls.__name__})")
    _TASKS[key] = cls
    return cls


def register_group(name: str, members: Sequence[str]) -> None:
    """A group name (``glue``, ``clue``) that expands to several task names."""
    _GROUPS[name.lower()] = [m.lower() for m in members]


def task_names() -> List[str]:
    return sorted(_TASKS)


def group_names() -> Dict[str, List[str]]:
    return {k: list(v) for k, v in sorted(_GROUPS.items())}


def _task_dir(cls: Type[Task], data_dir: Optional[Path]) -> Optional[Path]:
    """``data_dir/<official folder>`` when it exists, else ``data_dir`` itself."""
    if data_dir is None:
        return None
    if cls.default_dir:
        sub = data_dir / cls.default_dir
        if sub.is_dir():
            return sub
    return data_dir


def get_task(name: str, data_dir: Union[str, Path, None] = None) -> Task:
    """One task by registered name or by path to a custom task YAML file."""
    from toolkit.tasks.custom import load_custom_task  # local: custom imports registry

    raw = name.strip()
    if raw.endswith((".yaml", ".yml")) or Path(raw).is_file():
        return load_custom_task(raw)
    key = raw.lower().replace("-", "").replace("_", "") if raw.lower() not in _TASKS else raw.lower()
    cls = _TASKS.get(raw.lower()) or _TASKS.get(key) or _lookup_loose(raw)
    if cls is None:
        close = difflib.get_close_matches(raw.lower(), list(_TASKS) + list(_GROUPS), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ToolkitError(f"unknown task '{raw}'.{hint} Known tasks: {', '.join(task_names())}; "
                           f"groups: {', '.join(_GROUPS)}; or give a path to a custom task .yaml file.")
    return cls(_task_dir(cls, Path(data_dir) if data_dir is not None else None))


def _lookup_loose(raw: str) -> Optional[Type[Task]]:
    norm = raw.lower().replace("-", "").replace("_", "")
    for k, cls in _TASKS.items():
        if k.replace("-", "").replace("_", "") == norm:
            return cls
    return None


def resolve_tasks(spec: Union[str, Sequence[str]], data_dir: Union[str, Path, None] = None) -> List[Task]:
    """Expand a comma-separated string or list of names, groups and YAML paths."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: List[Task] = []
    seen = set()
    for item in (i.strip() for i in items):
        if not item:
            continue
        names = _GROUPS.get(item.lower(), [item])
        for n in names:
            task = get_task(n, data_dir)
            if task.name in seen:
                continue
            seen.add(task.name)
            out.append(task)
    if not out:
        raise ToolkitError(f"no tasks given (got {spec!r})")
    return out


TaskFactory = Callable[..., Task]
