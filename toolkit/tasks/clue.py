"""CLUE 1.1 and FewCLUE tasks, read from the official downloads (UTF-8 JSON).

Folders and files are named as the official zips unpack (``afqmc_public/train.json`` ...).
Every classification file is JSON lines; CMRC2018 is one SQuAD-style JSON document; CHID is
JSON lines plus a ``*_answer.json`` object; C3 is one JSON list per file.

Choices made where the official data leaves room (each is a class attribute to override):

* **TNEWS**: ``text_a`` = ``sentence`` only, as the CLUE baseline does (``keywords`` are often
  empty in test data); set ``use_keywords = True`` to pass them as ``text_b``.
* **CMNLI / OCNLI**: rows labelled ``"-"`` (no annotator majority) are dropped, as the
  official baseline does.
* **CLUEWSC2020**: a sentence pair. ``text_a`` is the text with span 1 (the candidate
  referent) wrapped in ``_..._`` and span 2 (the pronoun) in ``[...]`` (the CLUE baseline's
  markers); ``text_b`` is the question "``<span2>``指的是``<span1>``吗？" so both spans are also
  seen verbatim. When a span index does not point at its text, the nearest occurrence of the
  text is used; if there is none, DataError.
* **CSL**: ``text_a`` = keywords joined with "，", ``text_b`` = ``abst``.
* **CHID**: one :class:`ChoiceExample` per ``#idiomNNNNNN#`` blank; the blank being asked
  becomes ``[MASK]``, the other blanks of the same text ``[UNK]``; the context is cut to
  ``window`` characters on each side of the blank so the blank survives truncation.
* **C3**: the ``d-`` (dialogue) and ``m-`` (mixed-genre) files of a split are read together;
  ``context`` = the context sentences joined with newlines; 2-4 choices; label = index of the
  answer in ``choice``.
* **FewCLUE**: ``train`` reads ``train_few_all.json`` when present else ``train_0.json``;
  ``dev`` likewise ``dev_few_all.json`` / ``dev_0.json``; ``test_public`` (labelled) and
  ``test`` (unlabelled) as named. CSLDCP's 67 discipline names are taken from the train and
  dev files (sorted), since no label file ships with the data.

Submissions follow the CLUE 1.1 / FewCLUE names (``afqmc_predict.json``,
``tnews11_predict.json``, ...): JSON lines ``{"id", "label"}``; CMRC2018 one object
``{qid: answer}``; CHID one object ``{"#idiom...#": index}``.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from toolkit.errors import DataError, ToolkitError
from toolkit.tasks.base import (
    CLASSIFICATION, MULTIPLE_CHOICE, SPAN, ChoiceExample, Example, SpanExample, Task, TextExample,
)
from toolkit.tasks.registry import register_group, register_task

PathLike = Union[str, Path]

TNEWS_LABEL_DESC: Dict[str, str] = {
    "100": "news_story", "101": "news_culture", "102": "news_entertainment", "103": "news_sports",
    "104": "news_finance", "106": "news_house", "107": "news_car", "108": "news_edu",
    "109": "news_tech", "110": "news_military", "112": "news_travel", "113": "news_world",
    "114": "news_stock", "115": "news_agriculture", "116": "news_game",
}
_IDIOM_RE = re.compile(r"#idiom\d+#")


# ----- readers -----------------------------------------------------------------------------
def read_jsonl(path: PathLike) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Yield ``(line_number, object)`` for each non-blank line; bad JSON -> DataError(file, line)."""
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(path, f"invalid JSON ({e.msg})", line=n,
                                hint="each line must be one JSON object, as in the official CLUE files") from None
            if not isinstance(obj, dict):
                raise DataError(path, f"expected a JSON object, got {type(obj).__name__}", line=n)
            yield n, obj


def read_json(path: PathLike) -> Any:
    """Read one JSON document; errors name the file and line."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON ({e.msg})", line=e.lineno) from None
    except UnicodeDecodeError:
        raise DataError(path, "not UTF-8 text") from None


def _field(obj: Dict[str, Any], key: str, path: PathLike, line: Optional[int], kind: type = str) -> Any:
    if key not in obj:
        raise DataError(path, f"missing field '{key}' (fields present: {', '.join(sorted(obj))})", line=line)
    value = obj[key]
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, kind):
        raise DataError(path, f"field '{key}' should be {kind.__name__}, got {type(value).__name__}", line=line)
    return value


def _optional_label(obj: Dict[str, Any], key: str) -> Optional[str]:
    value = obj.get(key)
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value).strip()


def _accuracy(predictions: Sequence[Any], references: Sequence[Any]) -> float:
    return 100.0 * sum(str(p) == str(r) for p, r in zip(predictions, references)) / max(len(references), 1)


def _check_scorable(task: Task, examples: Sequence[Any], predictions: Sequence[Any], attr: str) -> None:
    if len(examples) != len(predictions):
        raise ToolkitError(f"task '{task.name}': {len(predictions)} predictions for {len(examples)} examples")
    if any(getattr(e, attr) is None for e in examples):
        raise ToolkitError(f"task '{task.name}': cannot score examples without gold labels (a test split?); "
                           "write a submission file instead")


def _write_jsonl(rows: Sequence[Dict[str, Any]], path: PathLike) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _align(path: PathLike, by_id: Dict[str, Any], ids: Sequence[str]) -> List[Any]:
    """Values of ``by_id`` in the order of ``ids``; missing or extra ids -> DataError."""
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(path, f"no prediction for id {missing[0]!r} ({len(missing)} ids missing)",
                        hint="the file must hold one prediction per example of the split")
    extra = sorted(set(by_id) - set(ids))
    if extra:
        raise DataError(path, f"prediction for unknown id {extra[0]!r} ({len(extra)} extra ids)",
                        hint="was it written for another split?")
    return [by_id[i] for i in ids]


def _read_id_label_jsonl(path: PathLike) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for n, obj in read_jsonl(path):
        key = str(_field(obj, "id", path, n))
        if key in out:
            raise DataError(path, f"id {key!r} appears twice", line=n)
        if "label" not in obj:
            raise DataError(path, "missing field 'label'", line=n)
        out[key] = obj["label"]
    return out


# ----- sentence (pair) classification ---------------------------------------------------------
class ClueClassificationTask(Task):
    """JSON-lines classification. Subclasses implement :meth:`texts` and set the label set.

    Attributes:
        label_field: the JSON key holding the label.
        drop_labels: gold labels whose rows are skipped (CMNLI/OCNLI ``"-"``).
        submission_stem: the leaderboard's file stem (``tnews11`` -> ``tnews11_predict.json``).
    """

    task_type = CLASSIFICATION
    language = "zh"
    metrics = ("accuracy",)
    main_metric = "accuracy"
    label_field = "label"
    drop_labels: Tuple[str, ...] = ()
    submission_stem = ""
    splits = {"train": "train.json", "dev": "dev.json", "test": "test.json"}

    def texts(self, obj: Dict[str, Any], path: Path, line: int) -> Tuple[str, Optional[str]]:
        """``(text_a, text_b)`` of one JSON row."""
        raise NotImplementedError

    def load(self, split: str) -> List[Example]:
        path = self.split_path(split)
        out: List[Example] = []
        for row, (n, obj) in enumerate(read_jsonl(path)):
            label = _optional_label(obj, self.label_field)
            if label is not None and label in self.drop_labels:
                continue
            if label is not None:
                self.label_to_id(label, path, n)  # validates against the label set
            text_a, text_b = self.texts(obj, path, n)
            index = obj.get("id", row)
            out.append(TextExample(guid=f"{split}-{row}", text_a=text_a, text_b=text_b, label=label,
                                   index=index))
        return out

    def score(self, examples: Sequence[Example], predictions: Sequence[Any]) -> Dict[str, float]:
        _check_scorable(self, examples, predictions, "label")
        return {"accuracy": _accuracy(predictions, [e.label for e in examples])}  # type: ignore[union-attr]

    def submission_name(self, split: str = "test") -> str:
        stem = self.submission_stem or self.name
        return f"{stem}_predict.json" if split == "test" else f"{stem}_{split}_predict.json"

    def submission_row(self, index: Any, label: str) -> Dict[str, Any]:
        """One line of the submission file."""
        return {"id": index, "label": str(label)}

    def write_predictions(self, examples: Sequence[Example], predictions: Sequence[Any], path: PathLike) -> None:
        if len(examples) != len(predictions):
            raise ToolkitError(f"task '{self.name}': {len(predictions)} predictions for {len(examples)} examples")
        _write_jsonl([self.submission_row(e.index, p) for e, p in zip(examples, predictions)], path)

    def read_predictions(self, path: PathLike, examples: Sequence[Example]) -> List[Any]:
        by_id = {k: str(v) for k, v in _read_id_label_jsonl(path).items()}
        return _align(path, by_id, [str(e.index) for e in examples])


def _pair(obj: Dict[str, Any], path: Path, line: int, a: str = "sentence1", b: str = "sentence2"
          ) -> Tuple[str, Optional[str]]:
    return _field(obj, a, path, line), _field(obj, b, path, line)


@register_task
class AFQMC(ClueClassificationTask):
    """Ant Financial question matching: sentence1, sentence2, label "0"/"1"."""

    name = "afqmc"
    default_dir = "afqmc_public"
    labels = ["0", "1"]

    def texts(self, obj, path, line):
        return _pair(obj, path, line)


@register_task
class TNEWS(ClueClassificationTask):
    """Toutiao news titles, 15 classes coded "100".."116" (105 and 111 unused)."""

    name = "tnews"
    default_dir = "tnews_public"
    labels = list(TNEWS_LABEL_DESC)
    submission_stem = "tnews11"
    use_keywords = False

    def texts(self, obj, path, line):
        keywords = obj.get("keywords") if self.use_keywords else None
        return _field(obj, "sentence", path, line), (str(keywords) if keywords else None)

    def submission_row(self, index, label):
        return {"id": index, "label": str(label), "label_desc": TNEWS_LABEL_DESC.get(str(label), "")}


@register_task
class IFLYTEK(ClueClassificationTask):
    """App descriptions, 119 classes "0".."118"."""

    name = "iflytek"
    default_dir = "iflytek_public"
    labels = [str(i) for i in range(119)]

    def texts(self, obj, path, line):
        return _field(obj, "sentence", path, line), None


@register_task
class CMNLI(ClueClassificationTask):
    """Chinese MNLI; rows labelled "-" are dropped."""

    name = "cmnli"
    default_dir = "cmnli_public"
    labels = ["contradiction", "entailment", "neutral"]
    drop_labels = ("-",)

    def texts(self, obj, path, line):
        return _pair(obj, path, line)


@register_task
class OCNLI(CMNLI):
    """Original Chinese NLI (the 50k training file); rows labelled "-" are dropped."""

    name = "ocnli"
    default_dir = "ocnli_public"
    splits = {"train": "train.50k.json", "dev": "dev.json", "test": "test.json"}
    submission_stem = "ocnli_50k"


@register_task
class CLUEWSC2020(ClueClassificationTask):
    """Winograd schema: does the pronoun (span 2) refer to span 1? label "true"/"false"."""

    name = "cluewsc2020"
    default_dir = "cluewsc2020_public"
    labels = ["false", "true"]
    submission_stem = "cluewsc11"

    @staticmethod
    def _locate(text: str, span: str, index: Any, path: Path, line: int, which: str) -> int:
        if isinstance(index, int) and text[index:index + len(span)] == span:
            return index
        starts = [m.start() for m in re.finditer(re.escape(span), text)] if span else []
        if not starts:
            raise DataError(path, f"{which} {span!r} does not occur in 'text'", line=line)
        ref = index if isinstance(index, int) else 0
        return min(starts, key=lambda s: abs(s - ref))

    def texts(self, obj, path, line):
        text = _field(obj, "text", path, line)
        target = _field(obj, "target", path, line, dict)
        s1 = _field(target, "span1_text", path, line)
        s2 = _field(target, "span2_text", path, line)
        i1 = self._locate(text, s1, target.get("span1_index"), path, line, "span1_text")
        i2 = self._locate(text, s2, target.get("span2_index"), path, line, "span2_text")
        marks = [(i1, len(s1), "_", "_"), (i2, len(s2), "[", "]")]
        marked = text
        # Insert from the right so earlier offsets stay valid.
        for start, length, left, right in sorted(marks, key=lambda m: m[0], reverse=True):
            end = start + length
            marked = marked[:start] + left + marked[start:end] + right + marked[end:]
        return marked, f"{s2}指的是{s1}吗？"


@register_task
class CSL(ClueClassificationTask):
    """Paper keyword recognition: are all ``keyword`` entries real keywords of ``abst``?"""

    name = "csl"
    default_dir = "csl_public"
    labels = ["0", "1"]

    def texts(self, obj, path, line):
        keywords = _field(obj, "keyword", path, line, list)
        return "，".join(str(k) for k in keywords), _field(obj, "abst", path, line)


# ----- FewCLUE ---------------------------------------------------------------------------------
class FewClueTask(ClueClassificationTask):
    """FewCLUE layout: ``train_few_all.json`` (else ``train_0.json``), ``dev_few_all.json``
    (else ``dev_0.json``), labelled ``test_public.json`` and unlabelled ``test.json``."""

    splits = {"train": "train_few_all.json", "dev": "dev_few_all.json",
              "test_public": "test_public.json", "test": "test.json"}
    fallback = {"train": "train_0.json", "dev": "dev_0.json"}

    def _file(self, split: str) -> Optional[str]:
        if self.data_dir is None or split not in self.splits:
            return self.splits.get(split)
        name = self.splits[split]
        alt = self.fallback.get(split)
        if not (self.data_dir / name).is_file() and alt and (self.data_dir / alt).is_file():
            return alt
        return name

    def split_path(self, split: str) -> Path:
        if split not in self.fallback:
            return super().split_path(split)
        name = self._file(split)
        if self.data_dir is not None and name is not None and (self.data_dir / name).is_file():
            return self.data_dir / name
        if self.data_dir is None:
            raise DataError(None, f"task '{self.name}' needs a data directory (--data-dir)")
        raise DataError(self.data_dir / self.splits[split],
                        f"missing data file for task '{self.name}' split '{split}'",
                        hint=f"expected '{self.splits[split]}' or '{self.fallback[split]}' in {self.data_dir}")

    def has_split(self, split: str) -> bool:
        name = self._file(split)
        return self.data_dir is not None and name is not None and (self.data_dir / name).is_file()


@register_task
class EPRSTMT(FewClueTask):
    """E-commerce review sentiment: sentence, label Positive/Negative."""

    name = "eprstmt"
    default_dir = "eprstmt"
    labels = ["Negative", "Positive"]

    def texts(self, obj, path, line):
        return _field(obj, "sentence", path, line), None


@register_task
class BUSTM(FewClueTask):
    """Short-text matching: sentence1, sentence2, label 0/1."""

    name = "bustm"
    default_dir = "bustm"
    labels = ["0", "1"]

    def texts(self, obj, path, line):
        return _pair(obj, path, line)


@register_task
class CSLDCP(FewClueTask):
    """Paper abstract -> discipline (67 classes). Label set: sorted names found in train + dev."""

    name = "csldcp"
    default_dir = "csldcp"

    def __init__(self, data_dir: Union[str, Path, None] = None):
        super().__init__(data_dir)
        self._labels: Optional[List[str]] = None

    @property  # type: ignore[override]
    def labels(self) -> Optional[List[str]]:
        if self._labels is None and self.has_split("train"):
            found = set()
            for split in ("train", "dev"):
                if self.has_split(split):
                    path = self.split_path(split)
                    for n, obj in read_jsonl(path):
                        label = _optional_label(obj, self.label_field)
                        if label is not None:
                            found.add(label)
            self._labels = sorted(found)
        return self._labels

    @labels.setter
    def labels(self, value: Optional[List[str]]) -> None:
        self._labels = list(value) if value is not None else None

    def load(self, split: str) -> List[Example]:
        if not self.labels:
            raise DataError(self.data_dir, "task 'csldcp' derives its label set from the train file",
                            hint="put train_few_all.json (or train_0.json) in the task folder")
        return super().load(split)

    def texts(self, obj, path, line):
        return _field(obj, "content", path, line), None


# ----- CMRC2018: extractive QA ---------------------------------------------------------------
@register_task
class CMRC2018(Task):
    """Chinese SQuAD-style span extraction; scored with :func:`toolkit.metrics.cmrc.cmrc2018_metric`."""

    name = "cmrc2018"
    task_type = SPAN
    language = "zh"
    default_dir = "cmrc2018_public"
    splits = {"train": "train.json", "dev": "dev.json", "test": "test.json"}
    metrics = ("em", "f1", "average")
    main_metric = "average"

    def load(self, split: str) -> List[Example]:
        path = self.split_path(split)
        doc = read_json(path)
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list):
            raise DataError(path, "expected a SQuAD-style object with a 'data' list")
        out: List[Example] = []
        for a, article in enumerate(data):
            where = f"data[{a}]"
            for p, para in enumerate(article.get("paragraphs", []) if isinstance(article, dict) else []):
                if not isinstance(para, dict) or not isinstance(para.get("context"), str):
                    raise DataError(path, f"{where}.paragraphs[{p}] has no 'context' string")
                context = para["context"]
                for q, qa in enumerate(para.get("qas", [])):
                    spot = f"{where}.paragraphs[{p}].qas[{q}]"
                    if not isinstance(qa, dict) or "id" not in qa or "question" not in qa:
                        raise DataError(path, f"{spot} needs 'id' and 'question'")
                    answers = []
                    for ans in qa.get("answers", []):
                        if not isinstance(ans, dict) or "text" not in ans:
                            raise DataError(path, f"{spot} (id {qa['id']}): answer without 'text'")
                        start = int(ans.get("answer_start", -1))
                        answers.append({"text": str(ans["text"]), "answer_start": start})
                    out.append(SpanExample(guid=str(qa["id"]).strip(), question=str(qa["question"]).strip(),
                                           context=context, answers=answers))
        return out

    def score(self, examples: Sequence[Example], predictions: Sequence[Any]) -> Dict[str, float]:
        from toolkit.metrics.cmrc import cmrc2018_metric

        if len(examples) != len(predictions):
            raise ToolkitError(f"task '{self.name}': {len(predictions)} predictions for {len(examples)} examples")
        gold = {e.guid: [a["text"] for a in e.answers] for e in examples}  # type: ignore[union-attr]
        if any(not g for g in gold.values()):
            raise ToolkitError("task 'cmrc2018': some examples have no gold answers (a test split?)")
        preds = {e.guid: str(p) for e, p in zip(examples, predictions)}
        return cmrc2018_metric(gold, preds)

    def submission_name(self, split: str = "test") -> str:
        return "cmrc2018_predict.json" if split == "test" else f"cmrc2018_{split}_predict.json"

    def write_predictions(self, examples: Sequence[Example], predictions: Sequence[Any], path: PathLike) -> None:
        if len(examples) != len(predictions):
            raise ToolkitError(f"task '{self.name}': {len(predictions)} predictions for {len(examples)} examples")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        obj = {e.guid: str(p) for e, p in zip(examples, predictions)}
        Path(path).write_text(json.dumps(obj, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    def read_predictions(self, path: PathLike, examples: Sequence[Example]) -> List[Any]:
        obj = read_json(path)
        if not isinstance(obj, dict):
            raise DataError(path, "expected one JSON object {question_id: answer}")
        return _align(path, {str(k): str(v) for k, v in obj.items()}, [e.guid for e in examples])


# ----- multiple choice ---------------------------------------------------------------------------
class _ChoiceTask(Task):
    task_type = MULTIPLE_CHOICE
    language = "zh"
    metrics = ("accuracy",)
    main_metric = "accuracy"

    def score(self, examples: Sequence[Example], predictions: Sequence[Any]) -> Dict[str, float]:
        _check_scorable(self, examples, predictions, "label")
        return {"accuracy": _accuracy([int(p) for p in predictions],
                                      [e.label for e in examples])}  # type: ignore[union-attr]


@register_task
class CHID(_ChoiceTask):
    """Idiom cloze: one example per ``#idiomNNNNNN#`` blank, 10 candidate idioms."""

    name = "chid"
    default_dir = "chid_public"
    splits = {"train": "train.json", "dev": "dev.json", "test": "test.json"}
    answer_files = {"train": "train_answer.json", "dev": "dev_answer.json", "test": "test_answer.json"}
    num_choices = 10
    window = 64  # characters of context kept on each side of the blank
    blank_token = "[MASK]"
    other_blank_token = "[UNK]"

    def _answers(self, split: str) -> Optional[Dict[str, int]]:
        assert self.data_dir is not None
        path = self.data_dir / self.answer_files.get(split, "")
        if split not in self.answer_files or not path.is_file():
            if split == "test":
                return None
            raise DataError(path, f"missing answer file for task 'chid' split '{split}'",
                            hint=f"the official download has {self.answer_files.get(split)} next to {self.splits[split]}")
        obj = read_json(path)
        if not isinstance(obj, dict):
            raise DataError(path, "expected one JSON object {\"#idiomNNNNNN#\": answer_index}")
        out = {}
        for tag, idx in obj.items():
            if isinstance(idx, bool) or not isinstance(idx, int):
                raise DataError(path, f"answer of {tag} must be an integer index, got {idx!r}")
            out[str(tag)] = idx
        return out

    def _context(self, text: str, start: int, end: int) -> str:
        left = _IDIOM_RE.sub(self.other_blank_token, text[:start])
        right = _IDIOM_RE.sub(self.other_blank_token, text[end:])
        return left[max(0, len(left) - self.window):] + self.blank_token + right[:self.window]

    def load(self, split: str) -> List[Example]:
        path = self.split_path(split)
        answers = self._answers(split)
        out: List[Example] = []
        for n, obj in read_jsonl(path):
            candidates = _field(obj, "candidates", path, n, list)
            if len(candidates) != self.num_choices:
                raise DataError(path, f"expected {self.num_choices} candidates, got {len(candidates)}", line=n)
            content = obj.get("content")
            texts = [content] if isinstance(content, str) else content
            if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
                raise DataError(path, "field 'content' must be a string or a list of strings", line=n)
            for text in texts:
                for m in _IDIOM_RE.finditer(text):
                    tag = m.group(0)
                    label = None
                    if answers is not None:
                        if tag not in answers:
                            raise DataError(path, f"blank {tag} has no answer in {self.answer_files[split]}", line=n)
                        label = answers[tag]
                        if not 0 <= label < len(candidates):
                            raise DataError(path, f"answer {label} of {tag} is outside the 10 candidates", line=n)
                    out.append(ChoiceExample(guid=tag, context=self._context(text, m.start(), m.end()),
                                             question="", choices=[str(c) for c in candidates],
                                             label=label, index=tag))
        return out

    def submission_name(self, split: str = "test") -> str:
        return "chid11_predict.json" if split == "test" else f"chid11_{split}_predict.json"

    def write_predictions(self, examples: Sequence[Example], predictions: Sequence[Any], path: PathLike) -> None:
        if len(examples) != len(predictions):
            raise ToolkitError(f"task '{self.name}': {len(predictions)} predictions for {len(examples)} examples")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        obj = {str(e.index): int(p) for e, p in zip(examples, predictions)}  # type: ignore[union-attr]
        Path(path).write_text(json.dumps(obj, ensure_ascii=False) + "\n", encoding="utf-8")

    def read_predictions(self, path: PathLike, examples: Sequence[Example]) -> List[Any]:
        obj = read_json(path)
        if not isinstance(obj, dict):
            raise DataError(path, "expected one JSON object {\"#idiomNNNNNN#\": index}")
        return [int(v) for v in _align(path, {str(k): v for k, v in obj.items()},
                                       [str(e.index) for e in examples])]  # type: ignore[union-attr]


@register_task
class C3(_ChoiceTask):
    """Multiple-choice reading comprehension; 2-4 choices per question (``num_choices`` None)."""

    name = "c3"
    default_dir = "c3_public"
    splits = {"train": "d-train.json", "dev": "d-dev.json", "test": "test1.1.json"}
    # Every file of a split, in reading order; the first existing test file wins.
    split_files = {"train": ("d-train.json", "m-train.json"), "dev": ("d-dev.json", "m-dev.json")}
    test_files = ("test1.1.json", "test.json", "test1.0.json")

    def _files(self, split: str) -> List[Path]:
        if self.data_dir is None:
            return []
        if split == "test":
            found = [self.data_dir / f for f in self.test_files if (self.data_dir / f).is_file()]
            return found[:1]
        return [self.data_dir / f for f in self.split_files.get(split, ()) if (self.data_dir / f).is_file()]

    def has_split(self, split: str) -> bool:
        return bool(self._files(split))

    def split_path(self, split: str) -> Path:
        files = self._files(split)
        if files:
            return files[0]
        expected = self.test_files if split == "test" else self.split_files.get(split, ())
        if split not in self.splits:
            raise DataError(self.data_dir, f"task 'c3' has no split '{split}' (it has: {', '.join(self.splits)})")
        raise DataError(self.data_dir, f"missing data file for task 'c3' split '{split}'",
                        hint=f"expected one of {', '.join(expected)} in {self.data_dir}")

    def load(self, split: str) -> List[Example]:
        self.split_path(split)  # raises a helpful error when nothing is there
        out: List[Example] = []
        for path in self._files(split):
            doc = read_json(path)
            if not isinstance(doc, list):
                raise DataError(path, "expected a JSON list of [context sentences, questions, id] entries")
            for d, entry in enumerate(doc):
                if not (isinstance(entry, list) and len(entry) >= 2 and isinstance(entry[0], list)
                        and isinstance(entry[1], list)):
                    raise DataError(path, f"entry {d}: expected [[context sentences], [questions], id]")
                context = "\n".join(str(s) for s in entry[0])
                doc_id = str(entry[2]) if len(entry) > 2 else f"{path.stem}-{d}"
                for q, qa in enumerate(entry[1]):
                    spot = f"entry {d} ({doc_id}) question {q}"
                    if not isinstance(qa, dict) or "question" not in qa or not isinstance(qa.get("choice"), list):
                        raise DataError(path, f"{spot}: needs 'question' and a 'choice' list")
                    choices = [str(c) for c in qa["choice"]]
                    if not 2 <= len(choices) <= 4:
                        raise DataError(path, f"{spot}: {len(choices)} choices (C3 has 2-4)")
                    label = None
                    if qa.get("answer") not in (None, ""):
                        if str(qa["answer"]) not in choices:
                            raise DataError(path, f"{spot}: answer {qa['answer']!r} is not one of the choices")
                        label = choices.index(str(qa["answer"]))
                    index = qa.get("id", f"{doc_id}-{q}")
                    out.append(ChoiceExample(guid=f"{split}-{path.stem}-{d}-{q}", context=context,
                                             question=str(qa["question"]), choices=choices,
                                             label=label, index=index))
        return out

    def submission_name(self, split: str = "test") -> str:
        return "c3_predict.json" if split == "test" else f"c3_{split}_predict.json"

    def write_predictions(self, examples: Sequence[Example], predictions: Sequence[Any], path: PathLike) -> None:
        if len(examples) != len(predictions):
            raise ToolkitError(f"task '{self.name}': {len(predictions)} predictions for {len(examples)} examples")
        _write_jsonl([{"id": e.index, "label": int(p)} for e, p in zip(examples, predictions)], path)

    def read_predictions(self, path: PathLike, examples: Sequence[Example]) -> List[Any]:
        by_id = _read_id_label_jsonl(path)
        values = _align(path, by_id, [str(e.index) for e in examples])  # type: ignore[union-attr]
        try:
            return [int(v) for v in values]
        except (TypeError, ValueError):
            raise DataError(path, "labels must be choice indices (integers)") from None


register_group("clue", ["afqmc", "tnews", "iflytek", "cmnli", "ocnli", "cluewsc2020", "csl",
                        "cmrc2018", "chid", "c3"])
register_group("fewclue", ["eprstmt", "bustm", "csldcp"])
