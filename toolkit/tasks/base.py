"""The task data model shared by every loader, head, metric and recipe.

A *task* knows how to read its official local files into examples, which head type and
label set it needs, how to score predictions with the official metric, and how to write
and read the leaderboard submission format. Task families (GLUE, SQuAD, CLUE, custom YAML)
live in their own modules and register themselves in :mod:`toolkit.tasks.registry`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

# Head / problem types. Every model head and feature encoder is keyed by one of these.
CLASSIFICATION = "classification"
REGRESSION = "regression"
SPAN = "span"  # extractive QA: SQuAD, CMRC2018
TOKEN_CLASSIFICATION = "token_classification"
MULTIPLE_CHOICE = "multiple_choice"
TASK_TYPES = (CLASSIFICATION, REGRESSION, SPAN, TOKEN_CLASSIFICATION, MULTIPLE_CHOICE)


@dataclass
class TextExample:
    """Single sentence or sentence pair; label is a label string, a float, or None (test)."""

    guid: str
    text_a: str
    text_b: Optional[str] = None
    label: Optional[Union[str, float]] = None
    # The id the leaderboard submission uses (GLUE's ``index`` column, CLUE's ``id``).
    index: Optional[Union[str, int]] = None


@dataclass
class SpanExample:
    """Extractive QA example; ``answers`` are ``{"text": str, "answer_start": int}`` dicts."""

    guid: str  # the question id used in prediction files
    question: str
    context: str
    answers: List[Dict[str, Any]] = field(default_factory=list)
    is_impossible: bool = False


@dataclass
class TokenExample:
    """Token classification: pre-split tokens (words or characters) with one label each."""

    guid: str
    tokens: List[str]
    labels: Optional[List[str]] = None
    index: Optional[Union[str, int]] = None


@dataclass
class ChoiceExample:
    """Multiple choice: each choice is paired with ``context`` (+ ``question``); label is an int."""

    guid: str
    context: str
    question: str
    choices: List[str]
    label: Optional[int] = None
    index: Optional[Union[str, int]] = None


Example = Union[TextExample, SpanExample, TokenExample, ChoiceExample]


class Task:
    """Base class of every task. Subclasses set the class attributes and implement ``load``.

    Class attributes:
        name: registry name, lower case (``"sst2"``, ``"mnli"``, ``"squad_v2"``).
        task_type: one of :data:`TASK_TYPES`.
        labels: the label set (strings) for classification / token classification.
        metrics: metric names computed by :meth:`score`; values are in percent (0-100).
        main_metric: the key used to pick the best checkpoint / learning rate.
        language: ``"en"`` or ``"zh"``.
        default_dir: the sub-folder name of the official download (``"SST-2"``).
        splits: split name -> file name inside the task directory.
        num_choices: for multiple choice tasks with a fixed number of options.
        eval_splits / eval_suffixes: dev splits scored after training and the suffix added to
            their metric keys (MNLI: ("dev_matched", "dev_mismatched"), ("_m", "_mm")).
        test_splits: splits that get a leaderboard submission file.
        benchmark: the leaderboard those files go to (``glue``, ``clue``, ``fewclue``); ``""``
            for tasks without one. ``toolkit eval`` bundles each benchmark's files.
        predicted_by: for an unlabelled test-only task predicted by another task's fine-tuned
            model (GLUE's AX by MNLI), that task's name; such a task is never fine-tuned.
        companion_tests: tasks whose test split this task's fine-tuned model also predicts
            (MNLI: ``("ax",)``).
        report_splits: labelled held-out ``(split, suffix)`` pairs scored once with the
            selected model and never used to select it (FewCLUE's ``test_public``).
    """

    name: str = ""
    task_type: str = CLASSIFICATION
    labels: Optional[List[str]] = None
    metrics: Sequence[str] = ("accuracy",)
    main_metric: str = "accuracy"
    language: str = "en"
    default_dir: str = ""
    splits: Dict[str, str] = {}
    num_choices: Optional[int] = None
    # Splits scored after fine-tuning. Several for MNLI (dev_matched, dev_mismatched): one
    # fine-tune, one result per split; metric keys get the split's suffix from eval_suffixes.
    eval_splits: Sequence[str] = ("dev",)
    eval_suffixes: Sequence[str] = ("",)
    # Splits that get a leaderboard submission file (test labels are hidden).
    test_splits: Sequence[str] = ("test",)
    benchmark: str = ""
    predicted_by: str = ""
    companion_tests: Sequence[str] = ()
    report_splits: Sequence[Tuple[str, str]] = ()

    def __init__(self, data_dir: Union[str, Path, None] = None):
        self.data_dir = Path(data_dir) if data_dir is not None else None

    # ----- data -------------------------------------------------------------------------
    def split_path(self, split: str) -> Path:
        """Path of ``split``'s file; raises DataError naming the expected file if absent."""
        from toolkit.errors import DataError

        if split not in self.splits:
            raise DataError(self.data_dir, f"task '{self.name}' has no split '{split}' "
                            f"(it has: {', '.join(self.splits)})")
        if self.data_dir is None:
            raise DataError(None, f"task '{self.name}' needs a data directory (--data-dir)")
        path = self.data_dir / self.splits[split]
        if not path.is_file():
            raise DataError(path, f"missing data file for task '{self.name}' split '{split}'",
                            hint=f"expected the official file '{self.splits[split]}' in {self.data_dir}")
        return path

    def has_split(self, split: str) -> bool:
        return (split in self.splits and self.data_dir is not None
                and (self.data_dir / self.splits[split]).is_file())

    def load(self, split: str) -> List[Example]:
        """Read ``split`` into examples. Malformed rows raise DataError(file, line)."""
        raise NotImplementedError

    @property
    def num_labels(self) -> int:
        if self.task_type == REGRESSION:
            return 1
        if self.task_type == SPAN:
            return 2
        if self.task_type == MULTIPLE_CHOICE:
            return 1
        return len(self.labels or [])

    def label_to_id(self, label: str, path: Any = None, line: Optional[int] = None) -> int:
        """Map a label string to its id; DataError naming file/line if outside the label set."""
        from toolkit.errors import DataError

        labels = self.labels or []
        try:
            return labels.index(str(label))
        except ValueError:
            raise DataError(path, f"label {label!r} is not in the label set of task '{self.name}' "
                            f"({', '.join(labels)})", line=line) from None

    # ----- scoring ----------------------------------------------------------------------
    def score(self, examples: Sequence[Example], predictions: Sequence[Any]) -> Dict[str, float]:
        """Official metrics, in percent. ``predictions`` align with ``examples``:
        label strings (classification), floats (regression), answer strings (span),
        label-string lists (token classification), choice ints (multiple choice)."""
        raise NotImplementedError

    # ----- leaderboard submission files ---------------------------------------------------
    def submission_name(self, split: str = "test") -> str:
        """File name of the leaderboard submission for ``split``."""
        return f"{self.name}_{split}_predictions.tsv"

    def write_predictions(self, examples: Sequence[Example], predictions: Sequence[Any],
                          path: Union[str, Path]) -> None:
        """Write predictions in the official submission format."""
        raise NotImplementedError

    def read_predictions(self, path: Union[str, Path], examples: Sequence[Example]) -> List[Any]:
        """Read a submission file back, aligned with ``examples``. Missing or extra ids raise
        DataError naming the file and the first offending id."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, data_dir={str(self.data_dir)!r})"
