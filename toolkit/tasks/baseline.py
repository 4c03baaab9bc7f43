"""The majority baseline: the floor any model's dev score must clear."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Dict, Optional, Union

from toolkit.errors import ToolkitError


def majority_baseline(task_ref: Union[str, Path], split: str = "dev", data_dir: Optional[str] = None) -> Dict[str, float]:
    """The task's own metrics (percent) for always predicting the most frequent training label
    (token classification: the most frequent tag, for every token).

    Args:
        task_ref: a task name or custom task YAML.
        split: the split scored.
        data_dir: root folder of a registered task's data.

    Raises:
        ToolkitError: the task is neither classification nor tagging.
    """
    from toolkit.tasks import get_task
    from toolkit.tasks.base import CLASSIFICATION, TOKEN_CLASSIFICATION

    task = get_task(str(task_ref), data_dir)
    train, examples = task.load("train"), task.load(split)
    if task.task_type == CLASSIFICATION:
        top = Counter(str(e.label) for e in train).most_common(1)[0][0]
        return task.score(examples, [top] * len(examples))
    if task.task_type == TOKEN_CLASSIFICATION:
        top = Counter(t for e in train for t in e.labels).most_common(1)[0][0]
        return task.score(examples, [[top] * len(e.tokens) for e in examples])
    raise ToolkitError(f"task '{task.name}': a majority baseline needs a classification or tagging task, "
                       f"not {task.task_type}")
