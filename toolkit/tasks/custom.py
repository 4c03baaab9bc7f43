"""Custom tasks described by a small YAML file.

Give the YAML path wherever a task name is accepted (``--tasks glue,my_task.yaml``). Schema::

    name: my_task            # required; lower-case name used in results and output folders
    type: classification     # classification | regression | token_classification | multiple_choice
    language: en             # en | zh (default en)
    format: tsv              # csv | tsv | jsonl; default from the first data file's extension
                             # (.tsv/.txt -> tsv, .csv -> csv, .jsonl/.json -> jsonl)
    header: true             # csv/tsv: first row is a header, columns are named; with
                             # header: false, columns are 0-based integers (default true)
    train: train.tsv         # data files, relative to this YAML file (or absolute);
    dev: dev.tsv             # at least one of train / dev is required
    test: test.tsv           # optional; its label column may be absent
    text_a: sentence         # required: column name / index or JSON field with the text.
                             # token_classification: a JSON list of tokens or a
                             # whitespace-separated string. multiple_choice: the shared context
    text_b: null             # optional second text (classification / regression)
    label: label             # required: the label column. regression: a number.
                             # token_classification: list or whitespace-separated tags.
                             # multiple_choice: 0-based index of the right choice
    choices: [c0, c1, c2]    # multiple_choice only: the choice columns, or one field name
                             # whose value is a JSON list of choices
    question: null           # multiple_choice only: optional question column
    id: null                 # optional id column used in prediction files (default: the
                             # 0-based row number among data rows)
    labels: [neg, pos]       # classification / token_classification: fixed label set
                             # (order = class ids); default: sorted set of train labels
    metric: accuracy         # one name or a list from toolkit.metrics.METRICS; the first is
                             # the main metric. Defaults: classification accuracy;
                             # regression [pearson, spearman]; token_classification
                             # [seqeval_f1, accuracy]; multiple_choice accuracy
    encoding: utf-8          # text encoding of the data files

For classification, ``f1`` is the F1 of the second label (``labels[1]``, the positive class
of a binary task). Schema problems raise ConfigError naming the YAML file and field; data
problems raise DataError naming the data file and line (missing file, too few columns,
unparsable JSON, missing field, a dev/test label outside the label set).

Prediction files: TSV with the header ``index<TAB>prediction`` (index = the ``id`` column or
row number; tags space-separated; choices as integers). ``read_predictions`` also accepts a
plain file with one prediction per line, in example order.
"""
from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

from toolkit.config import read_yaml
from toolkit.errors import ConfigError, DataError, ToolkitError
from toolkit.metrics import METRICS, compute
from toolkit.tasks.base import (CLASSIFICATION, MULTIPLE_CHOICE, REGRESSION, TOKEN_CLASSIFICATION, ChoiceExample,
                                Example, Task, TextExample, TokenExample)
from toolkit.tasks.io import (FORMAT_BY_SUFFIX, Record, format_prediction, iter_lines, parse_prediction,
                              read_index_predictions, read_table, require_file, write_tsv)

Key = Union[str, int]
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
_FORMATS = ("tsv", "csv", "jsonl")
_TYPES = (CLASSIFICATION, REGRESSION, TOKEN_CLASSIFICATION, MULTIPLE_CHOICE)
_DEFAULT_METRICS = {
    CLASSIFICATION: ["accuracy"],
    REGRESSION: ["pearson", "spearman"],
    TOKEN_CLASSIFICATION: ["seqeval_f1", "accuracy"],
    MULTIPLE_CHOICE: ["accuracy"],
}
# Task types whose labels are a closed set of strings.
_LABELED_TYPES = (CLASSIFICATION, TOKEN_CLASSIFICATION)


@dataclass
class CustomTaskSpec:
    """A validated custom task YAML (see the module docstring for each field)."""

    name: str
    type: str
    text_a: Key
    label: Key
    source: Path
    language: str = "en"
    format: str = "tsv"
    header: bool = True
    train: Optional[str] = None
    dev: Optional[str] = None
    test: Optional[str] = None
    text_b: Optional[Key] = None
    choices: Optional[Union[Key, List[Key]]] = None
    question: Optional[Key] = None
    id: Optional[Key] = None
    labels: Optional[List[str]] = None
    metric: List[str] = field(default_factory=list)
    encoding: str = "utf-8"


_FIELDS = ("name", "type", "language", "format", "header", "train", "dev", "test", "text_a", "text_b", "label",
           "choices", "question", "id", "labels", "metric", "encoding")


def parse_spec(data: Dict[str, Any], source: Union[str, Path]) -> CustomTaskSpec:
    """Validate a YAML mapping into a :class:`CustomTaskSpec`; ConfigError names file and field."""
    src = Path(source)

    def err(fld: str, msg: str) -> ConfigError:
        return ConfigError(fld, msg, src)

    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise err(unknown[0], f"unknown field; valid fields are: {', '.join(_FIELDS)}")
    for req in ("name", "type", "text_a", "label"):
        if data.get(req) is None:
            raise err(req, "is required")

    name = data["name"]
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise err("name", f"must be a lower-case name (letters, digits, _ . -), got {name!r}")
    ttype = data["type"]
    if ttype not in _TYPES:
        raise err("type", f"must be one of {', '.join(_TYPES)}, got {ttype!r}")
    language = data.get("language", "en")
    if language not in ("en", "zh"):
        raise err("language", f"must be 'en' or 'zh', got {language!r}")

    files = {}
    for split in ("train", "dev", "test"):
        value = data.get(split)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise err(split, f"must be a file path, got {value!r}")
        files[split] = value
    if files["train"] is None and files["dev"] is None:
        raise err("train", "give at least a train or a dev file")

    fmt = data.get("format")
    if fmt is None:
        first = next(v for v in files.values() if v is not None)
        fmt = FORMAT_BY_SUFFIX.get(Path(first).suffix.lower())
        if fmt is None:
            raise err("format", f"cannot infer the format from {first!r}; set format: {' | '.join(_FORMATS)}")
    if fmt not in _FORMATS:
        raise err("format", f"must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    header = data.get("header", True)
    if not isinstance(header, bool):
        raise err("header", f"must be true or false, got {header!r}")

    def key(fld: str, value: Any) -> Optional[Key]:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise err(fld, f"must be a column name or index, got {value!r}")
        if fmt != "jsonl" and not header:
            if isinstance(value, str) and not value.isdigit():
                raise err(fld, f"header: false, so columns are 0-based integers; got {value!r}")
            return int(value)
        return value

    choices = data.get("choices")
    if ttype == MULTIPLE_CHOICE:
        if choices is None:
            raise err("choices", "multiple_choice needs the choice columns (a list) or one list-valued field")
        if isinstance(choices, list):
            if len(choices) < 2:
                raise err("choices", "list at least two choice columns")
            choices = [key(f"choices[{i}]", c) for i, c in enumerate(choices)]
        else:
            choices = key("choices", choices)
    else:
        for fld in ("choices", "question"):
            if data.get(fld) is not None:
                raise err(fld, f"only used by type multiple_choice (this task is {ttype})")

    labels = data.get("labels")
    if labels is not None:
        if ttype not in _LABELED_TYPES:
            raise err("labels", f"only for classification / token_classification (this task is {ttype})")
        if not isinstance(labels, list) or not labels:
            raise err("labels", f"must be a non-empty list, got {labels!r}")
        labels = [str(x) for x in labels]
        if len(set(labels)) != len(labels):
            raise err("labels", f"has duplicates: {labels}")

    metric = data.get("metric")
    metric = list(_DEFAULT_METRICS[ttype]) if metric is None else ([metric] if isinstance(metric, str) else metric)
    if not isinstance(metric, list) or not metric:
        raise err("metric", "must be a metric name or a non-empty list of names")
    for m in metric:
        if m not in METRICS:
            raise err("metric", f"unknown metric {m!r}; known: {', '.join(sorted(METRICS))}")

    encoding = data.get("encoding", "utf-8")
    try:
        codecs.lookup(str(encoding))
    except LookupError:
        raise err("encoding", f"unknown text encoding {encoding!r}") from None

    return CustomTaskSpec(
        name=name, type=ttype, language=language, format=fmt, header=header, source=src,
        train=files["train"], dev=files["dev"], test=files["test"],
        text_a=key("text_a", data["text_a"]), text_b=key("text_b", data.get("text_b")),
        label=key("label", data["label"]), choices=choices, question=key("question", data.get("question")),
        id=key("id", data.get("id")), labels=labels, metric=metric, encoding=str(encoding))


def load_custom_task(path: Union[str, Path]) -> "CustomTask":
    """Read and validate a custom task YAML file into a :class:`CustomTask`."""
    p = Path(path)
    if not p.is_file():
        raise DataError(p, "custom task file not found", hint="give the path of a task .yaml file")
    return CustomTask(parse_spec(read_yaml(p), p))


def _text(rec: Record, key: Key) -> str:
    value = rec.get(key)
    if value is None or isinstance(value, (list, dict)):
        raise DataError(rec.path, f"field {key!r} must be text, got {value!r}", line=rec.line)
    return str(value)


def _seq(rec: Record, key: Key) -> List[str]:
    value = rec.get(key)
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, str):
        return value.split()
    raise DataError(rec.path, f"field {key!r} must be a list or a whitespace-separated string, got {value!r}",
                    line=rec.line)


class CustomTask(Task):
    """A task defined by a :class:`CustomTaskSpec`; data paths are relative to the YAML file."""

    def __init__(self, spec: CustomTaskSpec):
        super().__init__(spec.source.parent)
        self.spec = spec
        self.name = spec.name
        self.task_type = spec.type
        self.language = spec.language
        self.metrics = tuple(spec.metric)
        self.main_metric = spec.metric[0]
        self.splits = {s: f for s, f in (("train", spec.train), ("dev", spec.dev), ("test", spec.test)) if f}
        self.eval_splits = ("dev",) if spec.dev else ()
        self.eval_suffixes = ("",) if spec.dev else ()
        self.test_splits = ("test",) if spec.test else ()
        if spec.type == MULTIPLE_CHOICE and isinstance(spec.choices, list):
            self.num_choices = len(spec.choices)
        self._labels: Optional[List[str]] = list(spec.labels) if spec.labels else None

    # ----- label set --------------------------------------------------------------------
    @property
    def labels(self) -> Optional[List[str]]:  # type: ignore[override]
        """The fixed label set, or the sorted set of train labels (read once, lazily)."""
        if self._labels is None and self.task_type in _LABELED_TYPES:
            if "train" not in self.splits:
                raise ConfigError("labels", "no train file to take the label set from; list the labels",
                                  self.spec.source)
            found = set()
            for ex in self._read("train", validate=False):
                found.update(ex.labels if isinstance(ex, TokenExample) else [ex.label])
            found.discard(None)
            if not found:
                raise DataError(self.split_path("train"), "no labels found in the train file")
            self._labels = sorted(found)
        return self._labels

    @labels.setter
    def labels(self, value: Optional[List[str]]) -> None:
        self._labels = list(value) if value is not None else None

    # ----- reading ----------------------------------------------------------------------
    def load(self, split: str) -> List[Example]:
        """Read ``split``; labels outside the label set raise DataError(file, line)."""
        return self._read(split, validate=True)

    def _read(self, split: str, validate: bool) -> List[Example]:
        spec = self.spec
        path = self.split_path(split)
        names, records = read_table(path, spec.format, header=spec.header, encoding=spec.encoding)
        labeled = split != "test"
        if names is not None:
            self._check_header(path, names, labeled)
        build = _BUILDERS[self.task_type]
        out: List[Example] = []
        for row_no, rec in enumerate(records):
            has_label = labeled or rec.get(spec.label, None) not in (None, "")
            out.append(build(self, rec, row_no, split, has_label, validate))
        return out

    def _check_header(self, path: Path, names: List[str], labeled: bool) -> None:
        spec = self.spec
        keys = [spec.text_a, spec.text_b, spec.question, spec.id] + ([spec.label] if labeled else [])
        keys += spec.choices if isinstance(spec.choices, list) else [spec.choices]
        for k in keys:
            if isinstance(k, str) and k not in names:
                raise DataError(path, f"header has no column {k!r} (columns: {', '.join(names)})", line=1,
                                hint=f"fix the column names in {spec.source}")

    def _index(self, rec: Record, row_no: int) -> Union[str, int]:
        return str(rec.get(self.spec.id)).strip() if self.spec.id is not None else row_no

    def _check_label(self, label: str, rec: Record, validate: bool) -> str:
        if validate:
            self.label_to_id(label, rec.path, rec.line)
        return label

    def _build_text(self, rec: Record, row_no: int, split: str, has_label: bool, validate: bool) -> TextExample:
        spec = self.spec
        label: Optional[Union[str, float]] = None
        if has_label:
            raw = str(rec.get(spec.label)).strip()
            if self.task_type == REGRESSION:
                try:
                    label = float(raw)
                except ValueError:
                    raise DataError(rec.path, f"label {raw!r} is not a number", line=rec.line) from None
            else:
                label = self._check_label(raw, rec, validate)
        return TextExample(guid=f"{split}-{row_no}", text_a=_text(rec, spec.text_a),
                           text_b=_text(rec, spec.text_b) if spec.text_b is not None else None,
                           label=label, index=self._index(rec, row_no))

    def _build_tokens(self, rec: Record, row_no: int, split: str, has_label: bool, validate: bool) -> TokenExample:
        tokens = _seq(rec, self.spec.text_a)
        tags = None
        if has_label:
            tags = _seq(rec, self.spec.label)
            if len(tags) != len(tokens):
                raise DataError(rec.path, f"{len(tokens)} tokens but {len(tags)} labels", line=rec.line)
            for t in tags:
                self._check_label(t, rec, validate)
        return TokenExample(guid=f"{split}-{row_no}", tokens=tokens, labels=tags, index=self._index(rec, row_no))

    def _build_choice(self, rec: Record, row_no: int, split: str, has_label: bool, validate: bool) -> ChoiceExample:
        spec = self.spec
        if isinstance(spec.choices, list):
            choices = [_text(rec, k) for k in spec.choices]
        else:
            raw = rec.get(spec.choices)
            if not isinstance(raw, list) or len(raw) < 2:
                raise DataError(rec.path, f"field {spec.choices!r} must be a list of at least two choices",
                                line=rec.line)
            choices = [str(c) for c in raw]
        label = None
        if has_label:
            raw_label = str(rec.get(spec.label)).strip()
            try:
                label = int(raw_label)
            except ValueError:
                raise DataError(rec.path, f"label {raw_label!r} is not a choice index (0, 1, ...)",
                                line=rec.line) from None
            if not 0 <= label < len(choices):
                raise DataError(rec.path, f"label {label} is out of range for {len(choices)} choices", line=rec.line)
        question = _text(rec, spec.question) if spec.question is not None else ""
        return ChoiceExample(guid=f"{split}-{row_no}", context=_text(rec, spec.text_a), question=question,
                             choices=choices, label=label, index=self._index(rec, row_no))

    # ----- scoring ----------------------------------------------------------------------
    def _gold(self, ex: Example) -> Any:
        return ex.labels if isinstance(ex, TokenExample) else ex.label

    def score(self, examples: Sequence[Example], predictions: Sequence[Any]) -> Dict[str, float]:
        """The configured metrics in percent; classification labels are compared as class ids."""
        if len(examples) != len(predictions):
            raise ToolkitError(f"task '{self.name}': {len(predictions)} predictions for {len(examples)} examples")
        refs = [self._gold(ex) for ex in examples]
        if any(r is None for r in refs):
            raise ToolkitError(f"task '{self.name}': these examples have no gold labels (test split?)")
        preds, refs = _PREPARE[self.task_type](self, list(predictions), refs)
        return compute(self.metrics, preds, refs)

    def _ids(self, preds: List[Any], refs: List[Any]) -> tuple:
        # Class ids make f1's positive class labels[1] whatever the label strings are.
        idx = {lab: i for i, lab in enumerate(self.labels or [])}
        return [idx.get(str(p), -1) for p in preds], [idx[str(r)] for r in refs]

    # ----- submission files -------------------------------------------------------------
    def write_predictions(self, examples: Sequence[Example], predictions: Sequence[Any],
                          path: Union[str, Path]) -> None:
        """Write ``index<TAB>prediction`` rows (tags space-separated, choices as ints)."""
        if len(examples) != len(predictions):
            raise ToolkitError(f"task '{self.name}': {len(predictions)} predictions for {len(examples)} examples")
        rows = [(ex.index, format_prediction(self.task_type, p)) for ex, p in zip(examples, predictions)]
        write_tsv(path, ("index", "prediction"), rows)

    def read_predictions(self, path: Union[str, Path], examples: Sequence[Example]) -> List[Any]:
        """Read an ``index<TAB>prediction`` TSV, or a plain file with one prediction per line."""
        p = require_file(path, "prediction file")
        lines = list(iter_lines(p))
        if lines and lines[0][1].split("\t")[0].strip().lower() in ("index", "id"):
            found = read_index_predictions(p, [ex.index for ex in examples])
        else:
            while lines and not lines[-1][1].strip():
                lines.pop()
            if len(lines) < len(examples):
                raise DataError(p, f"{len(lines)} predictions for {len(examples)} examples; the first missing "
                                f"is for index {examples[len(lines)].index!r}",
                                hint="one prediction per line, in example order")
            if len(lines) > len(examples):
                raise DataError(p, f"extra prediction: only {len(examples)} examples", line=lines[len(examples)][0])
            found = [(text.strip(), n) for n, text in lines]
        return [parse_prediction(self.task_type, text, self.labels, p, line) for text, line in found]


_BUILDERS: Dict[str, Callable[..., Example]] = {
    CLASSIFICATION: CustomTask._build_text,
    REGRESSION: CustomTask._build_text,
    TOKEN_CLASSIFICATION: CustomTask._build_tokens,
    MULTIPLE_CHOICE: CustomTask._build_choice,
}

_PREPARE: Dict[str, Callable[..., Any]] = {
    CLASSIFICATION: CustomTask._ids,
    REGRESSION: lambda self, p, r: ([float(x) for x in p], [float(x) for x in r]),
    TOKEN_CLASSIFICATION: lambda self, p, r: ([[str(t) for t in x] for x in p], r),
    MULTIPLE_CHOICE: lambda self, p, r: ([int(x) for x in p], r),
}
