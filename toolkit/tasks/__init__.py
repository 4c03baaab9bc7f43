"""Task families and the task registry.

Importing this package registers every family (GLUE, SQuAD, custom YAML support and, when
present, CLUE), so ``get_task("sst2")`` / ``resolve_tasks("glue,my.yaml")`` work.
"""
from __future__ import annotations

from toolkit.tasks import custom, glue, squad  # noqa: F401  (registration side effect)
from toolkit.tasks.base import (CLASSIFICATION, MULTIPLE_CHOICE, REGRESSION, SPAN, TASK_TYPES, TOKEN_CLASSIFICATION,
                                ChoiceExample, Example, SpanExample, Task, TextExample, TokenExample)
from toolkit.tasks.custom import CustomTask, load_custom_task
from toolkit.tasks.registry import (get_task, group_names, register_group, register_task, resolve_tasks,
                                    task_names)


def _load_clue() -> None:
    """CLUE is written separately; register it when its module exists."""
    try:
        import toolkit.tasks.clue  # noqa: F401
    except ModuleNotFoundError as e:
        if e.name != "toolkit.tasks.clue":
            raise


_load_clue()

__all__ = ["CLASSIFICATION", "MULTIPLE_CHOICE", "REGRESSION", "SPAN", "TASK_TYPES", "TOKEN_CLASSIFICATION",
           "ChoiceExample", "CustomTask", "Example", "SpanExample", "Task", "TextExample", "TokenExample",
           "get_task", "group_names", "load_custom_task", "register_group", "register_task", "resolve_tasks",
           "task_names"]
