"""SQuAD v1.1 and v2.0 from the official JSON files.

Files (in ``--data-dir/SQuAD`` or directly in ``--data-dir``): ``train-v1.1.json``,
``dev-v1.1.json`` (``squad_v1``, alias ``squad``) and ``train-v2.0.json``, ``dev-v2.0.json``
(``squad_v2``). Structure: ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id",
"question", "answers": [{"text", "answer_start"}], "is_impossible"}]}]}]}``. One
:class:`SpanExample` per question; its ``guid`` is the question id.

Predictions are the files the official evaluation scripts read: ``predictions.json``
``{question_id: answer_text}`` (``""`` = no answer in v2.0) and, for v2.0,
``na_prob.json`` ``{question_id: no-answer probability}`` (the script's ``--na-prob-file``).
The probability written is ``sigmoid(null score - best span score)``: above 0.5 exactly when
the decoder answered "no answer", never above the script's default threshold of 1.0, and
ordered like the raw score difference, so the script's best-threshold search is unchanged.
Unlike the official scripts, missing and unknown ids are errors naming the id.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from toolkit.errors import DataError, ToolkitError
from toolkit.metrics.squad import squad_v1, squad_v2
from toolkit.tasks.base import SPAN, SpanExample, Task
from toolkit.tasks.io import read_json, require_file
from toolkit.tasks.registry import register_task


PREDICTIONS_FILE = "predictions.json"
NA_PROB_FILE = "na_prob.json"


def na_probabilities(null_odds: Mapping[str, float]) -> Dict[str, float]:
    """``{qid: sigmoid(odds)}`` for the decoder's ``{qid: null score - best span score}``.

    ``+inf`` odds (no valid span at all) give 1.0.
    """
    out = {}
    for qid, odds in null_odds.items():
        x = float(odds)
        if math.isnan(x):
            raise ToolkitError(f"no-answer score of question {qid!r} is nan (the model output is not finite)")
        # exp(-x) overflows below x = -709: the probability is 0.0 there.
        out[qid] = 1.0 / (1.0 + math.exp(-x)) if x > -700 else 0.0
    return out


def _line_of_key(text: str, key: str) -> Optional[int]:
    """1-based line where ``"key"`` first appears in a JSON text (for error messages)."""
    pos = text.find(json.dumps(key, ensure_ascii=False))
    if pos < 0:
        pos = text.find(json.dumps(key))
    return text.count("\n", 0, pos) + 1 if pos >= 0 else None


def _need(obj: Any, key: str, kind: Union[type, Tuple[type, ...]], path: Path, where: str) -> Any:
    """``obj[key]`` checked to be of ``kind``; DataError naming the JSON path otherwise."""
    if not isinstance(obj, dict) or key not in obj:
        raise DataError(path, f"{where}: missing key '{key}'", hint="is this an official SQuAD JSON file?")
    value = obj[key]
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(path, f"{where}.{key}: expected {names}, got {type(value).__name__}")
    return value


class SquadTask(Task):
    """Shared SQuAD reader, scorer and prediction-file format."""

    task_type = SPAN
    labels = None
    language = "en"
    default_dir = "SQuAD"
    eval_splits = ("dev",)
    eval_suffixes = ("",)
    test_splits = ()  # the official test set is hidden; predictions on dev are the submission format
    version_2_with_negative = False

    def load(self, split: str) -> List[SpanExample]:
        """Read one example per question; structural problems raise DataError naming the JSON path."""
        path = self.split_path(split)
        doc = read_json(path)
        articles = _need(doc, "data", list, path, "top level")
        out: List[SpanExample] = []
        seen: Dict[str, str] = {}
        for a, article in enumerate(articles):
            paragraphs = _need(article, "paragraphs", list, path, f"data[{a}]")
            for p, para in enumerate(paragraphs):
                where_p = f"data[{a}].paragraphs[{p}]"
                context = _need(para, "context", str, path, where_p)
                for q, qa in enumerate(_need(para, "qas", list, path, where_p)):
                    where = f"{where_p}.qas[{q}]"
                    qid = str(_need(qa, "id", (str, int), path, where))
                    if qid in seen:
                        raise DataError(path, f"{where}: duplicate question id {qid!r} (also at {seen[qid]})")
                    seen[qid] = where
                    impossible = bool(qa.get("is_impossible", False)) if self.version_2_with_negative else False
                    answers = self._answers(qa, path, where, impossible)
                    out.append(SpanExample(guid=qid, question=_need(qa, "question", str, path, where),
                                           context=context, answers=answers, is_impossible=impossible))
        return out

    def _answers(self, qa: Dict[str, Any], path: Path, where: str, impossible: bool) -> List[Dict[str, Any]]:
        raw = qa.get("answers", [])
        if not isinstance(raw, list):
            raise DataError(path, f"{where}.answers: expected a list")
        if impossible:
            return []
        answers = []
        for i, ans in enumerate(raw):
            text = _need(ans, "text", str, path, f"{where}.answers[{i}]")
            start = _need(ans, "answer_start", int, path, f"{where}.answers[{i}]")
            answers.append({"text": text, "answer_start": start})
        return answers

    # ----- scoring ----------------------------------------------------------------------
    def _gold(self, examples: Sequence[SpanExample]) -> Dict[str, List[str]]:
        return {ex.guid: [a["text"] for a in ex.answers] for ex in examples}

    def score(self, examples: Sequence[SpanExample], predictions: Sequence[str],
              na_probs: Union[Sequence[float], Mapping[str, float], None] = None) -> Dict[str, float]:
        """Official EM/F1 in percent. ``na_probs`` (v2.0): aligned list or ``{qid: prob}``."""
        if len(examples) != len(predictions):
            raise ToolkitError(f"task '{self.name}': {len(predictions)} predictions for {len(examples)} examples")
        preds = {ex.guid: str(p) for ex, p in zip(examples, predictions)}
        return self._evaluate(self._gold(examples), preds, examples, na_probs)

    def _evaluate(self, gold: Dict[str, List[str]], preds: Dict[str, str], examples: Sequence[SpanExample],
                  na_probs: Any) -> Dict[str, float]:
        return squad_v1(gold, preds)

    # ----- prediction files -------------------------------------------------------------
    def submission_name(self, split: str = "dev") -> str:
        """``predictions.json``: the name the official script's examples use."""
        return PREDICTIONS_FILE

    def write_predictions(self, examples: Sequence[SpanExample], predictions: Sequence[str],
                          path: Union[str, Path]) -> None:
        """Write the official ``{qid: answer}`` JSON."""
        if len(examples) != len(predictions):
            raise ToolkitError(f"task '{self.name}': {len(predictions)} predictions for {len(examples)} examples")
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = {ex.guid: str(pred) for ex, pred in zip(examples, predictions)}
        p.write_text(json.dumps(data, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    def read_predictions(self, path: Union[str, Path], examples: Sequence[SpanExample]) -> List[str]:
        """Read ``{qid: answer}`` JSON aligned with ``examples``.

        Raises:
            DataError: naming the file and the first missing or unknown question id.
        """
        p = require_file(path, "prediction file")
        data = read_json(p)
        if not isinstance(data, dict):
            raise DataError(p, f"expected a JSON object {{question_id: answer}}, got {type(data).__name__}")
        text = p.read_text(encoding="utf-8")
        wanted = {ex.guid for ex in examples}
        for qid, value in data.items():
            if qid not in wanted:
                raise DataError(p, f"unknown question id {qid!r}: not in the gold data", line=_line_of_key(text, qid),
                                hint="was this file written for another split or SQuAD version?")
            if not isinstance(value, str):
                raise DataError(p, f"answer for {qid!r} must be a string, got {type(value).__name__}",
                                line=_line_of_key(text, qid))
        missing = [ex.guid for ex in examples if ex.guid not in data]
        if missing:
            raise DataError(p, f"missing prediction for question id {missing[0]!r} "
                            f"({len(missing)} of {len(examples)} missing)")
        return [data[ex.guid] for ex in examples]


    def write_na_probs(self, examples: Sequence[SpanExample], na_probs: Mapping[str, float],
                       path: Union[str, Path]) -> None:
        """Write the official ``na_prob.json`` ``{qid: probability}`` (v2.0 only)."""
        if not self.version_2_with_negative:
            raise ToolkitError(f"task '{self.name}' has no unanswerable questions: no na_prob.json")
        missing = [ex.guid for ex in examples if ex.guid not in na_probs]
        if missing:
            raise ToolkitError(f"task '{self.name}': no no-answer probability for question {missing[0]!r}")
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        data = {ex.guid: float(na_probs[ex.guid]) for ex in examples}
        p.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")

    def read_na_probs(self, path: Union[str, Path], examples: Sequence[SpanExample]) -> Dict[str, float]:
        """Read ``na_prob.json`` ``{qid: probability}`` covering every question of ``examples``.

        Raises:
            DataError: naming the file (and the line of the question id) for a missing or
                unknown id, a value that is not a number, or a non-finite one.
        """
        if not self.version_2_with_negative:
            raise ToolkitError(f"task '{self.name}' has no unanswerable questions; a no-answer probability "
                               f"file only goes with squad_v2")
        p = require_file(path, "no-answer probability file")
        text = p.read_text(encoding="utf-8")
        data = read_json(p)
        if not isinstance(data, dict):
            raise DataError(p, f"expected a JSON object {{question_id: probability}}, got {type(data).__name__}")
        wanted = {ex.guid for ex in examples}
        out: Dict[str, float] = {}
        for qid, value in data.items():
            line = _line_of_key(text, qid)
            if qid not in wanted:
                raise DataError(p, f"unknown question id {qid!r}: not in the gold data", line=line)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DataError(p, f"no-answer probability of {qid!r} must be a number, got {value!r}", line=line)
            if not math.isfinite(value):
                raise DataError(p, f"no-answer probability of {qid!r} is {value!r}, not a finite number", line=line)
            out[qid] = float(value)
        missing = [ex.guid for ex in examples if ex.guid not in out]
        if missing:
            raise DataError(p, f"missing no-answer probability for question id {missing[0]!r} "
                            f"({len(missing)} of {len(examples)} missing)")
        return out


@register_task
class SquadV1(SquadTask):
    name = "squad_v1"
    metrics, main_metric = ("exact_match", "f1"), "f1"
    splits = {"train": "train-v1.1.json", "dev": "dev-v1.1.json"}


@register_task
class SquadV2(SquadTask):
    name = "squad_v2"
    metrics, main_metric = ("exact", "f1"), "f1"
    splits = {"train": "train-v2.0.json", "dev": "dev-v2.0.json"}
    version_2_with_negative = True

    def _evaluate(self, gold: Dict[str, List[str]], preds: Dict[str, str], examples: Sequence[SpanExample],
                  na_probs: Any) -> Dict[str, float]:
        probs: Optional[Dict[str, float]] = None
        if na_probs is not None:
            if isinstance(na_probs, Mapping):
                missing = [ex.guid for ex in examples if ex.guid not in na_probs]
                if missing:
                    raise ToolkitError(f"task '{self.name}': no no-answer probability for question {missing[0]!r}")
                ids = {ex.guid for ex in examples}
                probs = {q: float(v) for q, v in na_probs.items() if q in ids}  # file order breaks ties
            else:
                if len(na_probs) != len(examples):
                    raise ToolkitError(f"task '{self.name}': {len(na_probs)} no-answer probabilities "
                                       f"for {len(examples)} examples")
                probs = {ex.guid: float(v) for ex, v in zip(examples, na_probs)}
        return squad_v2(gold, preds, na_probs=probs)


@register_task
class SquadAlias(SquadV1):
    """``squad`` = SQuAD v1.1; instances report the canonical name ``squad_v1``."""

    name = "squad"

    def __init__(self, data_dir: Union[str, Path, None] = None):
        super().__init__(data_dir)
        self.name = SquadV1.name
