"""GLUE tasks reading the files of the official download script (``download_glue_data.py``).

Folder layout under ``--data-dir`` (each task also works when pointed at its own folder)::

    CoLA/  {train,dev}.tsv: no header: source, label, mark, sentence; test.tsv: index, sentence
    SST-2/ {train,dev}.tsv: sentence, label; test.tsv: index, sentence
    MRPC/  {train,dev}.tsv: Quality, #1 ID, #2 ID, #1 String, #2 String; test.tsv: index first
    STS-B/ 10 columns (index, genre, ..., sentence1, sentence2, score); test.tsv without score
    QQP/   id, qid1, qid2, question1, question2, is_duplicate; test.tsv: id, question1, question2
    MNLI/  train, dev_matched, dev_mismatched, test_matched, test_mismatched .tsv
           (sentence1 / sentence2 at columns 8 / 9, gold_label last)
    QNLI/  index, question, sentence, label     RTE/, WNLI/  index, sentence1, sentence2, label
    diagnostic/diagnostic.tsv (AX): index, sentence1, sentence2; test only, MNLI labels,
                   predicted by the fine-tuned MNLI model (``AX.tsv``)

Files with a header are read by column name. Quotes are not special (QQP and MNLI contain
unbalanced ``"``). Example ``index``: the ``index``/``id`` column of test files, the 0-based
row number for train/dev files (some have no index column). Submissions are the GLUE server
files (``CoLA.tsv``, ``MNLI-m.tsv``, ...) with the header ``index<TAB>prediction``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

from toolkit.errors import DataError, ToolkitError
from toolkit.metrics import compute
from toolkit.tasks.base import CLASSIFICATION, REGRESSION, Task, TextExample
from toolkit.tasks.io import format_prediction, parse_prediction, read_index_predictions, read_tsv, write_tsv
from toolkit.tasks.registry import register_group, register_task

Key = Union[str, int]
_BINARY = ["0", "1"]
_NLI3 = ["contradiction", "entailment", "neutral"]
_NLI2 = ["entailment", "not_entailment"]
_STD_SPLITS = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}


@dataclass(frozen=True)
class Layout:
    """Where the fields are in one kind of file.

    Attributes:
        header: the first line names the columns (keys below are names), else 0-based ints.
        text_a / text_b / label: column keys; ``label=None`` for unlabeled test files.
        index: column with the submission index; None = use the 0-based row number.
    """

    header: bool
    text_a: Key
    text_b: Optional[Key] = None
    label: Optional[Key] = None
    index: Optional[Key] = None


class GlueTask(Task):
    """Base of the GLUE tasks: header-aware TSV reading, leaderboard metrics and files.

    Subclasses set ``layouts`` (split kind -> :class:`Layout`) and ``glue_name`` (the
    submission file stem).
    """

    glue_name: str = ""
    layouts: Dict[str, Layout] = {}
    splits = _STD_SPLITS
    benchmark = "glue"

    def layout(self, split: str) -> Layout:
        """Layout of ``split``: looked up by split name, then by its kind (train/dev/test)."""
        if split in self.layouts:
            return self.layouts[split]
        return self.layouts[split.split("_")[0]]

    def load(self, split: str) -> List[TextExample]:
        """Read ``split`` into :class:`TextExample` rows; bad rows raise DataError(file, line)."""
        path = self.split_path(split)
        lay = self.layout(split)
        names, rows = read_tsv(path, header=lay.header)
        if names is not None:
            wanted = [k for k in (lay.text_a, lay.text_b, lay.label, lay.index) if k is not None]
            missing = [k for k in wanted if k not in names]
            if missing:
                raise DataError(path, f"header lacks column {missing[0]!r} (header: {', '.join(names)})", line=1,
                                hint=f"is this the official GLUE {self.glue_name} file for split '{split}'?")
        out: List[TextExample] = []
        for row_no, rec in enumerate(rows):
            label: Optional[Union[str, float]] = None
            if lay.label is not None:
                label = self._parse_label(rec.get(lay.label).strip(), path, rec.line)
            out.append(TextExample(
                guid=f"{split}-{row_no}",
                text_a=rec.get(lay.text_a),
                text_b=rec.get(lay.text_b) if lay.text_b is not None else None,
                label=label,
                index=rec.get(lay.index).strip() if lay.index is not None else row_no,
            ))
        return out

    def _parse_label(self, raw: str, path: Path, line: int) -> Union[str, float]:
        if self.task_type == REGRESSION:
            try:
                return float(raw)
            except ValueError:
                raise DataError(path, f"score {raw!r} is not a number", line=line) from None
        self.label_to_id(raw, path, line)
        return raw

    # ----- scoring ----------------------------------------------------------------------
    def score(self, examples: Sequence[TextExample], predictions: Sequence[Any]) -> Dict[str, float]:
        """Leaderboard metrics in percent, e.g. ``{"f1": 88.1, "accuracy": 84.0}`` for MRPC."""
        if len(examples) != len(predictions):
            raise ToolkitError(f"task '{self.name}': {len(predictions)} predictions for {len(examples)} examples")
        if any(ex.label is None for ex in examples):
            raise ToolkitError(f"task '{self.name}': these examples have no gold labels (test split?)")
        refs = [ex.label for ex in examples]
        preds = [float(p) for p in predictions] if self.task_type == REGRESSION else [str(p) for p in predictions]
        return compute(self.metrics, preds, refs)

    # ----- submission files -------------------------------------------------------------
    def submission_name(self, split: str = "test") -> str:
        """GLUE server file name, e.g. ``CoLA.tsv``."""
        return f"{self.glue_name}.tsv"

    def write_predictions(self, examples: Sequence[TextExample], predictions: Sequence[Any],
                          path: Union[str, Path]) -> None:
        """Write ``index<TAB>prediction`` (label strings; STS-B floats)."""
        if len(examples) != len(predictions):
            raise ToolkitError(f"task '{self.name}': {len(predictions)} predictions for {len(examples)} examples")
        rows = []
        for ex, p in zip(examples, predictions):
            if self.task_type == CLASSIFICATION and str(p) not in (self.labels or []):
                raise ToolkitError(f"task '{self.name}': prediction {p!r} is not a label "
                                   f"({', '.join(self.labels or [])})")
            rows.append((ex.index, format_prediction(self.task_type, p)))
        write_tsv(path, ("index", "prediction"), rows)

    def read_predictions(self, path: Union[str, Path], examples: Sequence[TextExample]) -> List[Any]:
        """Read a GLUE submission TSV aligned with ``examples``.

        Raises:
            DataError: naming the file and the first missing / extra / duplicate index or a
                value that is not a label (not a number for STS-B).
        """
        found = read_index_predictions(path, [ex.index for ex in examples])
        return [parse_prediction(self.task_type, text, self.labels, path, line) for text, line in found]


def _std_layouts(a: Key, b: Optional[Key], label: Key, index: Key = "index") -> Dict[str, Layout]:
    train = Layout(header=True, text_a=a, text_b=b, label=label)
    return {"train": train, "dev": train, "test": Layout(header=True, text_a=a, text_b=b, index=index)}


@register_task
class CoLA(GlueTask):
    name, glue_name, default_dir = "cola", "CoLA", "CoLA"
    labels = _BINARY
    metrics, main_metric = ("mcc",), "mcc"
    layouts = {
        "train": Layout(header=False, text_a=3, label=1),
        "dev": Layout(header=False, text_a=3, label=1),
        "test": Layout(header=True, text_a="sentence", index="index"),
    }


@register_task
class SST2(GlueTask):
    name, glue_name, default_dir = "sst2", "SST-2", "SST-2"
    labels = _BINARY
    metrics, main_metric = ("accuracy",), "accuracy"
    layouts = _std_layouts("sentence", None, "label")


@register_task
class MRPC(GlueTask):
    name, glue_name, default_dir = "mrpc", "MRPC", "MRPC"
    labels = _BINARY
    metrics, main_metric = ("f1", "accuracy"), "f1"
    layouts = _std_layouts("#1 String", "#2 String", "Quality")


@register_task
class STSB(GlueTask):
    name, glue_name, default_dir = "stsb", "STS-B", "STS-B"
    task_type = REGRESSION
    labels = None
    metrics, main_metric = ("pearson", "spearman"), "pearson"
    layouts = _std_layouts("sentence1", "sentence2", "score")


@register_task
class QQP(GlueTask):
    name, glue_name, default_dir = "qqp", "QQP", "QQP"
    labels = _BINARY
    metrics, main_metric = ("f1", "accuracy"), "f1"
    layouts = _std_layouts("question1", "question2", "is_duplicate", index="id")


@register_task
class MNLI(GlueTask):
    """One task, two dev sets: results get ``_m`` / ``_mm`` suffixes."""

    name, glue_name, default_dir = "mnli", "MNLI", "MNLI"
    labels = _NLI3
    metrics, main_metric = ("accuracy",), "accuracy"
    splits = {"train": "train.tsv", "dev_matched": "dev_matched.tsv", "dev_mismatched": "dev_mismatched.tsv",
              "test_matched": "test_matched.tsv", "test_mismatched": "test_mismatched.tsv"}
    eval_splits = ("dev_matched", "dev_mismatched")
    eval_suffixes = ("_m", "_mm")
    test_splits = ("test_matched", "test_mismatched")
    companion_tests = ("ax",)  # the GLUE server scores AX predicted by the MNLI model
    layouts = _std_layouts("sentence1", "sentence2", "gold_label")

    def submission_name(self, split: str = "test_matched") -> str:
        return "MNLI-mm.tsv" if split.endswith("mismatched") else "MNLI-m.tsv"


@register_task
class QNLI(GlueTask):
    name, glue_name, default_dir = "qnli", "QNLI", "QNLI"
    labels = _NLI2
    metrics, main_metric = ("accuracy",), "accuracy"
    layouts = _std_layouts("question", "sentence", "label")


@register_task
class RTE(GlueTask):
    name, glue_name, default_dir = "rte", "RTE", "RTE"
    labels = _NLI2
    metrics, main_metric = ("accuracy",), "accuracy"
    layouts = _std_layouts("sentence1", "sentence2", "label")


@register_task
class WNLI(GlueTask):
    name, glue_name, default_dir = "wnli", "WNLI", "WNLI"
    labels = _BINARY
    metrics, main_metric = ("accuracy",), "accuracy"
    layouts = _std_layouts("sentence1", "sentence2", "label")


@register_task
class AX(GlueTask):
    """GLUE diagnostic set: unlabeled, predicted by an MNLI model, scored by the server with R3 (MCC)."""

    name, glue_name, default_dir = "ax", "AX", "diagnostic"
    labels = _NLI3
    metrics, main_metric = ("mcc",), "mcc"
    splits = {"test": "diagnostic.tsv"}
    eval_splits = ()
    eval_suffixes = ()
    predicted_by = "mnli"
    layouts = {"test": Layout(header=True, text_a="sentence1", text_b="sentence2", index="index")}


register_group("glue", ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"])
