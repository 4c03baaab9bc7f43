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
* **FewCLUE** (nine tasks, folders as in the FewCLUE repository's ``datasets/``):
  ``train`` reads ``train_few_all.json`` when present else ``train_0.json``; ``dev`` likewise
  ``dev_few_all.json`` / ``dev_0.json``; ``train_0`` .. ``train_4``, ``dev_0`` .. ``dev_4``,
  ``train_few_all``, ``dev_few_all``, ``test_public`` (labelled; scored once with the selected
  model as ``accuracy_test_public``, never used to select it), ``test`` and ``unlabeled`` (labels
  ignored) load by name. Label sets: CSLDCP's 67 disciplines are the official list
  (:data:`CSLDCP_LABELS`, FewCLUE's ``datasets/csldcp/labelDesc2label.py``, whose
  ``labels_all.txt`` lacks two of them); TNEWS-FC and IFLYTEK-FC use CLUE's label codes, the
  others the labels their files use. CHID-FC has one ``#idiom#`` blank and 7 candidates per row
  and its ``answer`` in the same file; CLUEWSC-FC's train/dev rows carry ``idx`` where test rows
  carry ``id``.

Submissions follow the leaderboards' names and line formats:

* CLUE 1.1: ``afqmc_predict.json``, ``tnews11_predict.json``, ``iflytek_predict.json``,
  ``cmnli_predict.json``, ``ocnli_50k_predict.json``, ``cluewsc11_predict.json``,
  ``csl_predict.json`` (JSON lines ``{"id", "label"}``, in test-file order; TNEWS adds
  ``label_desc``), ``cmrc2018_predict.json`` (one object ``{qid: answer}``),
  ``chid11_predict.json`` (one object ``{"#idiomNNNNNN#": index}``), ``c311_predict.json``
  (JSON lines ``{"id", "label": index}``).
* FewCLUE: ``eprstmt_predict.json``, ``csldcp_predict.json``, ``tnewsf_predict.json``,
  ``iflytekf_predict.json``, ``ocnlif_predict.json``, ``bustm_predict.json``,
  ``cslf_predict.json``, ``cluewscf_predict.json`` (JSON lines ``{"id", "label"}``) and
  ``chidf_predict.json`` (JSON lines ``{"id", "answer": index}``).
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


def _read_id_label_jsonl(path: PathLike, value_field: str = "label") -> Dict[str, Any]:
    """``{str(id): row[value_field]}`` of a JSON-lines submission; repeated ids -> DataError."""
    out: Dict[str, Any] = {}
    for n, obj in read_jsonl(path):
        key = str(_field(obj, "id", path, n))
        if key in out:
            raise DataError(path, f"id {key!r} appears twice", line=n)
        if value_field not in obj:
            raise DataError(path, f"missing field '{value_field}'", line=n)
        out[key] = obj[value_field]
    return out


def _row_id(obj: Dict[str, Any], row: int) -> Any:
    """The id a submission uses: ``id`` (``idx`` in CLUEWSC train/dev files), else the row number."""
    if "id" in obj:
        return obj["id"]
    return obj.get("idx", row)


def _unique_ids(task: Task, examples: Sequence[Any]) -> List[str]:
    """The examples' ids as strings; a gold file whose ids repeat cannot be aligned by id."""
    ids = [str(e.index) for e in examples]
    seen = set()
    for i in ids:
        if i in seen:
            raise DataError(task.data_dir, f"task '{task.name}': id {i!r} repeats in the gold split, so "
                            f"predictions cannot be matched to examples by id")
        seen.add(i)
    return ids


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
    benchmark = "clue"
    label_field = "label"
    drop_labels: Tuple[str, ...] = ()
    submission_stem = ""
    splits = {"train": "train.json", "dev": "dev.json", "test": "test.json"}
    unlabelled_splits: Tuple[str, ...] = ()  # splits whose label fields are ignored

    def texts(self, obj: Dict[str, Any], path: Path, line: int) -> Tuple[str, Optional[str]]:
        """``(text_a, text_b)`` of one JSON row."""
        raise NotImplementedError

    def load(self, split: str) -> List[Example]:
        path = self.split_path(split)
        out: List[Example] = []
        for row, (n, obj) in enumerate(read_jsonl(path)):
            label = None if split in self.unlabelled_splits else _optional_label(obj, self.label_field)
            if label is not None and label in self.drop_labels:
                continue
            if label is not None:
                self.label_to_id(label, path, n)  # validates against the label set
            text_a, text_b = self.texts(obj, path, n)
            index = _row_id(obj, row)
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
        return _align(path, by_id, _unique_ids(self, examples))


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
    benchmark = "clue"

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
    benchmark = "clue"

    def score(self, examples: Sequence[Example], predictions: Sequence[Any]) -> Dict[str, float]:
        _check_scorable(self, examples, predictions, "label")
        return {"accuracy": _accuracy([int(p) for p in predictions],
                                      [e.label for e in examples])}  # type: ignore[union-attr]


class _SplitFiles:
    """Mixin for splits stored under one of several names: ``split_files[split]`` lists them,
    the first that exists is read (FewCLUE's ``train_few_all.json`` / ``train_0.json``, CLUE
    1.1's ``test1.1.json`` / ``test.json``)."""

    split_files: Dict[str, Tuple[str, ...]] = {}
    splits: Dict[str, str]
    data_dir: Optional[Path]
    name: str

    def _file(self, split: str) -> Optional[str]:
        names = self.split_files.get(split)
        if not names:
            return self.splits.get(split)
        if self.data_dir is not None:
            for n in names:
                if (self.data_dir / n).is_file():
                    return n
        return names[0]

    def split_path(self, split: str) -> Path:
        if split not in self.split_files:
            return super().split_path(split)  # type: ignore[misc]
        if self.data_dir is None:
            raise DataError(None, f"task '{self.name}' needs a data directory (--data-dir)")
        path = self.data_dir / str(self._file(split))
        if not path.is_file():
            names = self.split_files[split]
            raise DataError(self.data_dir / names[0], f"missing data file for task '{self.name}' split '{split}'",
                            hint="expected " + " or ".join(f"'{n}'" for n in names) + f" in {self.data_dir}")
        return path

    def has_split(self, split: str) -> bool:
        if split not in self.split_files:
            return super().has_split(split)  # type: ignore[misc]
        name = self._file(split)
        return self.data_dir is not None and name is not None and (self.data_dir / name).is_file()


@register_task
class CHID(_SplitFiles, _ChoiceTask):
    """Idiom cloze: one example per ``#idiomNNNNNN#`` blank, 10 candidate idioms."""

    name = "chid"
    default_dir = "chid_public"
    splits = {"train": "train.json", "dev": "dev.json", "test": "test1.1.json"}
    split_files = {"test": ("test1.1.json", "test.json")}
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
                            hint=f"the official download has {self.answer_files.get(split)} next to {self._file(split)}")
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
        return "c311_predict.json" if split == "test" else f"c311_{split}_predict.json"

    def write_predictions(self, examples: Sequence[Example], predictions: Sequence[Any], path: PathLike) -> None:
        if len(examples) != len(predictions):
            raise ToolkitError(f"task '{self.name}': {len(predictions)} predictions for {len(examples)} examples")
        _write_jsonl([{"id": e.index, "label": int(p)} for e, p in zip(examples, predictions)], path)

    def read_predictions(self, path: PathLike, examples: Sequence[Example]) -> List[Any]:
        by_id = _read_id_label_jsonl(path)
        values = _align(path, by_id, _unique_ids(self, examples))
        try:
            return [int(v) for v in values]
        except (TypeError, ValueError):
            raise DataError(path, "labels must be choice indices (integers)") from None


# ----- FewCLUE ---------------------------------------------------------------------------------
# The 67 disciplines of CSLDCP in the official order: the keys of FewCLUE's
# datasets/csldcp/labelDesc2label.py (its labels_all.txt omits the last two).
CSLDCP_LABELS: Tuple[str, ...] = (
    "材料科学与工程", "作物学", "口腔医学", "药学", "教育学", "水利工程", "理论经济学", "食品科学与工程",
    "畜牧学/兽医学", "体育学", "核科学与技术", "力学", "园艺学", "水产", "法学", "地质学/地质资源与地质工程",
    "石油与天然气工程", "农林经济管理", "信息与通信工程", "图书馆、情报与档案管理", "政治学", "电气工程",
    "海洋科学", "民族学", "航空宇航科学与技术", "化学/化学工程与技术", "哲学", "公共卫生与预防医学", "艺术学",
    "农业工程", "船舶与海洋工程", "计算机科学与技术", "冶金工程", "交通运输工程", "动力工程及工程热物理",
    "纺织科学与工程", "建筑学", "环境科学与工程", "公共管理", "数学", "物理学", "林学/林业工程", "心理学",
    "历史学", "工商管理", "应用经济学", "中医学/中药学", "天文学", "机械工程", "土木工程", "光学工程", "地理学",
    "农业资源利用", "生物学/生物科学与工程", "兵器科学与技术", "矿业工程", "大气科学", "基础医学/临床医学",
    "电子科学与技术", "测绘科学与技术", "控制科学与工程", "军事学", "中国语言文学", "新闻传播学", "社会学",
    "地球物理学", "植物保护",
)

_FEWCLUE_SPLITS = {
    "train": "train_few_all.json", "dev": "dev_few_all.json",
    **{f"train_{k}": f"train_{k}.json" for k in range(5)}, "train_few_all": "train_few_all.json",
    **{f"dev_{k}": f"dev_{k}.json" for k in range(5)}, "dev_few_all": "dev_few_all.json",
    "test_public": "test_public.json", "test": "test.json", "unlabeled": "unlabeled.json",
}
_FEWCLUE_FILES = {"train": ("train_few_all.json", "train_0.json"), "dev": ("dev_few_all.json", "dev_0.json")}


class _FewClueLayout(_SplitFiles):
    """The FewCLUE folder layout and leaderboard settings, shared by all nine tasks."""

    splits = _FEWCLUE_SPLITS
    split_files = _FEWCLUE_FILES
    benchmark = "fewclue"
    report_splits = (("test_public", "_test_public"),)
    unlabelled_splits = ("unlabeled",)


class FewClueTask(_FewClueLayout, ClueClassificationTask):
    """A FewCLUE classification task: JSON lines ``{"id", <texts>, "label"}``; submission
    lines ``{"id", "label"}``."""


@register_task
class EPRSTMT(FewClueTask):
    """E-commerce review sentiment: sentence, label Positive/Negative."""

    name = "eprstmt"
    default_dir = "eprstmt"
    labels = ["Negative", "Positive"]

    def texts(self, obj, path, line):
        return _field(obj, "sentence", path, line), None


@register_task
class CSLDCP(FewClueTask):
    """Paper abstract (``content``) -> one of the 67 disciplines of :data:`CSLDCP_LABELS`."""

    name = "csldcp"
    default_dir = "csldcp"
    labels = list(CSLDCP_LABELS)

    def texts(self, obj, path, line):
        return _field(obj, "content", path, line), None


@register_task
class TNEWSFC(FewClueTask, TNEWS):
    """FewCLUE's TNEWS: CLUE's 15 news classes; submission lines ``{"id", "label"}``."""

    name = "tnews_fc"
    default_dir = "tnews"
    submission_stem = "tnewsf"

    def submission_row(self, index, label):
        return {"id": index, "label": str(label)}


@register_task
class IFLYTEKFC(FewClueTask, IFLYTEK):
    """FewCLUE's IFLYTEK: app descriptions, 119 classes "0".."118"."""

    name = "iflytek_fc"
    default_dir = "iflytek"
    submission_stem = "iflytekf"


@register_task
class OCNLIFC(FewClueTask, OCNLI):
    """FewCLUE's OCNLI: sentence pairs, entailment / neutral / contradiction."""

    name = "ocnli_fc"
    default_dir = "ocnli"
    submission_stem = "ocnlif"


@register_task
class BUSTM(FewClueTask):
    """Short-text matching: sentence1, sentence2, label 0/1."""

    name = "bustm"
    default_dir = "bustm"
    labels = ["0", "1"]

    def texts(self, obj, path, line):
        return _pair(obj, path, line)


@register_task
class CSLFC(FewClueTask, CSL):
    """FewCLUE's CSL: are all ``keyword`` entries real keywords of ``abst``?"""

    name = "csl_fc"
    default_dir = "csl"
    submission_stem = "cslf"


@register_task
class CLUEWSCFC(FewClueTask, CLUEWSC2020):
    """FewCLUE's CLUEWSC: does the pronoun (span 2) refer to span 1? label "true"/"false"."""

    name = "cluewsc_fc"
    default_dir = "cluewsc"
    submission_stem = "cluewscf"


@register_task
class CHIDFC(_FewClueLayout, _ChoiceTask):
    """FewCLUE's CHID: one ``#idiom#`` blank per row, 7 candidates, ``answer`` in the same file.

    The blank becomes ``[MASK]`` and the context is cut to ``window`` characters on each side,
    as for CLUE's CHID. Submission lines ``{"id", "answer": index}``.
    """

    name = "chid_fc"
    default_dir = "chid"
    num_choices = 7
    window = 64
    blank = "#idiom#"
    blank_token = "[MASK]"

    def load(self, split: str) -> List[Example]:
        path = self.split_path(split)
        out: List[Example] = []
        for row, (n, obj) in enumerate(read_jsonl(path)):
            candidates = _field(obj, "candidates", path, n, list)
            if len(candidates) != self.num_choices:
                raise DataError(path, f"expected {self.num_choices} candidates, got {len(candidates)}", line=n)
            content = _field(obj, "content", path, n)
            at = content.find(self.blank)
            if at < 0:
                raise DataError(path, f"field 'content' has no {self.blank} blank", line=n)
            left, right = content[:at], content[at + len(self.blank):].replace(self.blank, "[UNK]")
            context = left[max(0, len(left) - self.window):] + self.blank_token + right[:self.window]
            label = None
            if split not in self.unlabelled_splits and obj.get("answer") not in (None, ""):
                label = obj["answer"]
                if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(candidates):
                    raise DataError(path, f"answer {label!r} is not a candidate index 0..{len(candidates) - 1}",
                                    line=n)
            out.append(ChoiceExample(guid=f"{split}-{row}", context=context, question="",
                                     choices=[str(c) for c in candidates], label=label, index=_row_id(obj, row)))
        return out

    def submission_name(self, split: str = "test") -> str:
        return "chidf_predict.json" if split == "test" else f"chidf_{split}_predict.json"

    def write_predictions(self, examples: Sequence[Example], predictions: Sequence[Any], path: PathLike) -> None:
        if len(examples) != len(predictions):
            raise ToolkitError(f"task '{self.name}': {len(predictions)} predictions for {len(examples)} examples")
        _write_jsonl([{"id": e.index, "answer": int(p)} for e, p in zip(examples, predictions)], path)

    def read_predictions(self, path: PathLike, examples: Sequence[Example]) -> List[Any]:
        values = _align(path, _read_id_label_jsonl(path, "answer"), _unique_ids(self, examples))
        if any(isinstance(v, bool) or not isinstance(v, int) for v in values):
            raise DataError(path, "'answer' values must be candidate indices (integers)")
        return list(values)


register_group("clue", ["afqmc", "tnews", "iflytek", "cmnli", "ocnli", "cluewsc2020", "csl",
                        "cmrc2018", "chid", "c3"])
register_group("fewclue", ["eprstmt", "csldcp", "tnews_fc", "iflytek_fc", "ocnli_fc", "bustm", "chid_fc",
                           "csl_fc", "cluewsc_fc"])
