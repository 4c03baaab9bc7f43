"""SQuAD v1.1 and v2.0 evaluation, matching the official scripts, in percent.

Normalisation (both versions): lower case, drop ASCII punctuation, drop the articles
a/an/the as whole words, collapse whitespace. Exact match and token F1 take the maximum over
the gold answers. v2.0 adds unanswerable questions (gold = no answers, prediction ``""`` =
"no answer"), HasAns/NoAns breakdowns and, when no-answer probabilities are given, the best
threshold search of the official script (``best_exact`` / ``best_f1`` and their thresholds).

Unlike the official scripts, a question without a prediction is not silently scored 0:
callers (``Task.read_predictions``) reject such files naming the id. Here a missing id is a
``KeyError`` naming it.
"""
from __future__ import annotations

import collections
import re
import string
from typing import Dict, Mapping, Optional, Sequence, Tuple

_PUNCT = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """Official SQuAD answer normalisation."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 when the normalised strings are equal."""
    return float(normalize_answer(prediction) == normalize_answer(gold))


def token_f1_v1(prediction: str, gold: str) -> float:
    """v1.1 token F1: 0 when nothing overlaps (so two empty strings score 0)."""
    pred_toks = normalize_answer(prediction).split()
    gold_toks = normalize_answer(gold).split()
    common = collections.Counter(pred_toks) & collections.Counter(gold_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def token_f1_v2(prediction: str, gold: str) -> float:
    """v2.0 token F1: if either side is empty (no answer), 1.0 only when both are."""
    pred_toks = normalize_answer(prediction).split()
    gold_toks = normalize_answer(gold).split()
    if not pred_toks or not gold_toks:
        return float(pred_toks == gold_toks)
    return token_f1_v1(prediction, gold)


def _max_over(fn, prediction: str, golds: Sequence[str]) -> float:
    return max(fn(prediction, g) for g in golds)


def squad_v1(gold: Mapping[str, Sequence[str]], preds: Mapping[str, str]) -> Dict[str, float]:
    """Official v1.1 scores.

    Args:
        gold: question id -> gold answer texts (at least one each).
        preds: question id -> predicted answer text; must cover every gold id.

    Returns:
        ``{"exact_match": float, "f1": float}`` in percent.
    """
    if not gold:
        return {"exact_match": 0.0, "f1": 0.0}
    em = f1 = 0.0
    for qid, answers in gold.items():
        pred = preds[qid]
        golds = list(answers) or [""]
        em += _max_over(exact_match, pred, golds)
        f1 += _max_over(token_f1_v1, pred, golds)
    n = len(gold)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


def _raw_scores_v2(gold: Mapping[str, Sequence[str]], preds: Mapping[str, str]
                   ) -> Tuple[Dict[str, float], Dict[str, float]]:
    exact, f1 = {}, {}
    for qid, answers in gold.items():
        # Gold answers that normalise to nothing count as "no answer", as in the official script.
        golds = [a for a in answers if normalize_answer(a)] or [""]
        pred = preds[qid]
        exact[qid] = _max_over(exact_match, pred, golds)
        f1[qid] = _max_over(token_f1_v2, pred, golds)
    return exact, f1


def _apply_threshold(scores: Mapping[str, float], na_probs: Mapping[str, float],
                     has_ans: Mapping[str, bool], thresh: float) -> Dict[str, float]:
    """Questions whose no-answer probability exceeds ``thresh`` are answered with "no answer"."""
    return {qid: (float(not has_ans[qid]) if na_probs[qid] > thresh else s) for qid, s in scores.items()}


def _best_threshold(preds: Mapping[str, str], scores: Mapping[str, float], na_probs: Mapping[str, float],
                    has_ans: Mapping[str, bool]) -> Tuple[float, float]:
    """Sweep the no-answer threshold over the sorted probabilities; return (best %, threshold).

    Ties keep ``na_probs``' own order (a stable sort), as the official script does.
    """
    current = float(sum(1 for q in scores if not has_ans[q]))  # threshold below all: abstain on all
    best, best_thresh = current, 0.0
    for qid in sorted((q for q in na_probs if q in scores), key=lambda q: na_probs[q]):
        if has_ans[qid]:
            current += scores[qid]
        elif preds[qid]:
            current -= 1.0
        if current > best:
            best, best_thresh = current, na_probs[qid]
    return 100.0 * best / len(scores), best_thresh


def squad_v2(gold: Mapping[str, Sequence[str]], preds: Mapping[str, str],
             na_probs: Optional[Mapping[str, float]] = None, na_prob_thresh: float = 1.0) -> Dict[str, float]:
    """Official v2.0 scores.

    Args:
        gold: question id -> gold answer texts (empty for unanswerable questions).
        preds: question id -> predicted text; ``""`` means "no answer".
        na_probs: optional question id -> no-answer probability; enables ``best_*`` keys.
        na_prob_thresh: questions with ``na_prob > thresh`` count as answered "no answer".

    Returns:
        ``exact, f1`` plus ``HasAns_exact/f1`` and ``NoAns_exact/f1`` (when such questions
        exist) and ``best_exact, best_exact_thresh, best_f1, best_f1_thresh`` with
        ``na_probs``. Scores in percent; thresholds as given.
    """
    if not gold:
        return {"exact": 0.0, "f1": 0.0}
    has_ans = {qid: bool(answers) for qid, answers in gold.items()}
    exact_raw, f1_raw = _raw_scores_v2(gold, preds)
    if na_probs is not None:
        missing = [qid for qid in gold if qid not in na_probs]
        if missing:
            raise KeyError(missing[0])
        probs = {qid: float(p) for qid, p in na_probs.items() if qid in gold}  # keeps the caller's order
    else:
        probs = {qid: 0.0 for qid in gold}
    exact = _apply_threshold(exact_raw, probs, has_ans, na_prob_thresh)
    f1 = _apply_threshold(f1_raw, probs, has_ans, na_prob_thresh)

    def mean(scores: Mapping[str, float], ids: Sequence[str]) -> float:
        return 100.0 * sum(scores[q] for q in ids) / len(ids)

    out = {"exact": mean(exact, list(gold)), "f1": mean(f1, list(gold))}
    for prefix, ids in (("HasAns", [q for q in gold if has_ans[q]]), ("NoAns", [q for q in gold if not has_ans[q]])):
        if ids:
            out[f"{prefix}_exact"] = mean(exact, ids)
            out[f"{prefix}_f1"] = mean(f1, ids)
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = _best_threshold(preds, exact_raw, probs, has_ans)
        out["best_f1"], out["best_f1_thresh"] = _best_threshold(preds, f1_raw, probs, has_ans)
    return out


def squad_v1_metric(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> Dict[str, float]:
    """:func:`squad_v1` over aligned lists (the ``METRICS`` registry signature)."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    ids = [str(i) for i in range(len(refs))]
    return squad_v1(dict(zip(ids, refs)), dict(zip(ids, preds)))


def squad_v2_metric(preds: Sequence[str], refs: Sequence[Sequence[str]]) -> Dict[str, float]:
    """:func:`squad_v2` over aligned lists (no thresholds); empty reference list = unanswerable."""
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")
    ids = [str(i) for i in range(len(refs))]
    return squad_v2(dict(zip(ids, refs)), dict(zip(ids, preds)))
