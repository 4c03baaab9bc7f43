"""Score a leaderboard-format prediction file against gold data (``toolkit score``).

No model is involved: the task reads its gold ``split``, reads the prediction file in its
submission format (GLUE ``index<TAB>prediction`` TSV, SQuAD ``predictions.json`` ``{id:
answer}`` plus, for v2.0, the optional ``na_prob.json``, CLUE / FewCLUE JSON lines, custom TSV
or one prediction per line) and returns the official metrics. Non-finite numbers (``nan``,
``inf``) are refused with the file and line.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Union

from toolkit.errors import ToolkitError
from toolkit.tasks import resolve_tasks
from toolkit.tasks.base import Example, Task, TokenExample


def _gold_split(task: Task, split: str) -> str:
    """``split`` itself, or the single eval split when the task has no split of that name."""
    if split in task.splits:
        return split
    evals = list(task.eval_splits)
    if split == "dev" and len(evals) == 1 and evals[0] in task.splits:
        return evals[0]
    choices = ", ".join(task.splits)
    raise ToolkitError(f"task '{task.name}' has no split '{split}'; score one of: {choices} "
                       f"(e.g. --split {evals[0] if evals else next(iter(task.splits), 'dev')})")


def _has_gold(ex: Example) -> bool:
    # Span examples always carry gold (possibly "no answer"); others hold None on test splits.
    return (ex.labels if isinstance(ex, TokenExample) else getattr(ex, "label", True)) is not None


def run_score(task: str, data_dir: Optional[Union[str, Path]], predictions: Union[str, Path],
              split: str = "dev", na_prob_file: Optional[Union[str, Path]] = None) -> Dict[str, float]:
    """Metrics (percent) of ``predictions`` against the gold labels of ``split``.

    Args:
        task: a registered task name (``mrpc``, ``squad_v2``) or a custom task YAML path.
        data_dir: root of the official data (``glue_data``) or the task's own folder.
        predictions: the prediction file in the task's submission format.
        split: gold split; tasks with several dev sets (MNLI) need ``dev_matched`` /
            ``dev_mismatched``, whose metric keys get the task's suffix (``accuracy_m``).
        na_prob_file: SQuAD v2.0 only: the official ``na_prob.json``; adds the best-threshold
            scores (``best_exact``, ``best_f1`` and their thresholds), as the official script does.

    Returns:
        ``{metric: value}``, e.g. ``{"f1": 88.2, "accuracy": 84.1}``.

    Raises:
        DataError: a missing/malformed gold or prediction file (naming file, line or id).
        ToolkitError: unknown task, a group name, or a split without gold labels.
    """
    tasks = resolve_tasks(task, data_dir)
    if len(tasks) != 1:
        raise ToolkitError(f"'{task}' names {len(tasks)} tasks ({', '.join(t.name for t in tasks)}); "
                           "score one task at a time")
    (t,) = tasks
    gold_split = _gold_split(t, split)
    examples = t.load(gold_split)
    if not examples:
        raise ToolkitError(f"task '{t.name}' split '{gold_split}' has no examples")
    if not all(_has_gold(ex) for ex in examples):
        raise ToolkitError(f"task '{t.name}' split '{gold_split}' has no gold labels (hidden test labels?); "
                           f"score a dev split: {', '.join(t.eval_splits) or 'none'}")
    if na_prob_file is not None and not getattr(t, "version_2_with_negative", False):
        raise ToolkitError(f"task '{t.name}' takes no no-answer probability file (only squad_v2 does)")
    preds = t.read_predictions(predictions, examples)
    if na_prob_file is not None:
        metrics = t.score(examples, preds, na_probs=t.read_na_probs(na_prob_file, examples))
    else:
        metrics = t.score(examples, preds)
    suffixes = dict(zip(t.eval_splits, t.eval_suffixes))
    suffix = suffixes.get(gold_split, "") if len(t.eval_splits) > 1 else ""
    return {f"{k}{suffix}": float(v) for k, v in metrics.items()}
