"""Classification, regression and sequence-labelling metrics, in percent (0-100).

All functions take ``(predictions, references)`` of equal length. Where a metric is undefined
(constant inputs for a correlation, no positive class for F1) they return 0.0 the way
scikit-learn does, instead of NaN, so a degenerate early checkpoint never poisons model
selection. Implemented with numpy only: scipy/sklearn are test-time dependencies.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple

import numpy as np


def _check(preds: Sequence[Any], refs: Sequence[Any]) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")


def _is_nested(values: Sequence[Any]) -> bool:
    return len(values) > 0 and isinstance(values[0], (list, tuple))


def _flatten(preds: Sequence[Any], refs: Sequence[Any]) -> Tuple[List[Any], List[Any]]:
    """Flatten per-sequence tag lists (token classification) into one list each."""
    fp: List[Any] = []
    fr: List[Any] = []
    for i, (p, r) in enumerate(zip(preds, refs)):
        if len(p) != len(r):
            raise ValueError(f"sequence {i}: {len(p)} predicted tags for {len(r)} gold tags")
        fp.extend(p)
        fr.extend(r)
    return fp, fr


def _codes(preds: Sequence[Any], refs: Sequence[Any]) -> Tuple[np.ndarray, np.ndarray, int]:
    """Map labels (any hashable, compared as strings) to 0..K-1 over the union of both."""
    keys = sorted({str(x) for x in preds} | {str(x) for x in refs})
    idx = {k: i for i, k in enumerate(keys)}
    return (np.array([idx[str(x)] for x in preds], dtype=np.int64),
            np.array([idx[str(x)] for x in refs], dtype=np.int64), len(keys))


def accuracy(preds: Sequence[Any], refs: Sequence[Any]) -> float:
    """Percent of predictions equal to the reference (labels compared as strings).

    Sequences of tag lists (token classification) are flattened: token accuracy.
    """
    _check(preds, refs)
    if _is_nested(refs) or _is_nested(preds):
        preds, refs = _flatten(preds, refs)
    if not refs:
        return 0.0
    return 100.0 * sum(str(p) == str(r) for p, r in zip(preds, refs)) / len(refs)


def _prf(tp: float, n_pred: float, n_gold: float) -> float:
    if tp == 0 or n_pred == 0 or n_gold == 0:
        return 0.0
    precision, recall = tp / n_pred, tp / n_gold
    return 2 * precision * recall / (precision + recall)


def f1_binary(preds: Sequence[Any], refs: Sequence[Any], pos_label: Any = 1) -> float:
    """F1 of the positive class (GLUE MRPC/QQP: label "1"); labels compared as strings."""
    _check(preds, refs)
    pos = str(pos_label)
    p = np.array([str(x) == pos for x in preds], dtype=bool)
    r = np.array([str(x) == pos for x in refs], dtype=bool)
    return 100.0 * _prf(float((p & r).sum()), float(p.sum()), float(r.sum()))


def macro_f1(preds: Sequence[Any], refs: Sequence[Any]) -> float:
    """Unweighted mean of per-class F1 over every label seen in predictions or references."""
    _check(preds, refs)
    if not refs:
        return 0.0
    p, r, k = _codes(preds, refs)
    scores = [_prf(float(((p == c) & (r == c)).sum()), float((p == c).sum()), float((r == c).sum()))
              for c in range(k)]
    return 100.0 * float(np.mean(scores))


def matthews_corr(preds: Sequence[Any], refs: Sequence[Any]) -> float:
    """Matthews correlation (multi-class R_K form), times 100. CoLA's and AX's metric."""
    _check(preds, refs)
    if not refs:
        return 0.0
    p, r, k = _codes(preds, refs)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (r, p), 1.0)
    t_sum, p_sum = conf.sum(axis=1), conf.sum(axis=0)
    n, correct = conf.sum(), np.trace(conf)
    cov_ytyp = correct * n - float(np.dot(t_sum, p_sum))
    cov_ypyp = n * n - float(np.dot(p_sum, p_sum))
    cov_ytyt = n * n - float(np.dot(t_sum, t_sum))
    if cov_ypyp == 0 or cov_ytyt == 0:
        return 0.0
    return 100.0 * cov_ytyp / float(np.sqrt(cov_ytyt * cov_ypyp))


def _floats(values: Sequence[Any]) -> np.ndarray:
    return np.asarray([float(v) for v in values], dtype=np.float64)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 2:
        return 0.0
    xc, yc = x - x.mean(), y - y.mean()
    denom = float(np.sqrt((xc * xc).sum() * (yc * yc).sum()))
    if denom == 0.0 or not np.isfinite(denom):
        return 0.0
    return float(np.clip((xc * yc).sum() / denom, -1.0, 1.0))


def _rank(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank (as scipy.stats.rankdata)."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Start positions of runs of equal values; each run gets the mean of its positions.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    avg = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def pearson(preds: Sequence[Any], refs: Sequence[Any]) -> float:
    """Pearson correlation times 100 (STS-B); 0.0 when either side is constant."""
    _check(preds, refs)
    return 100.0 * _pearson(_floats(preds), _floats(refs))


def spearman(preds: Sequence[Any], refs: Sequence[Any]) -> float:
    """Spearman rank correlation times 100 (ties get average ranks); 0.0 when undefined."""
    _check(preds, refs)
    if len(refs) < 2:
        return 0.0
    return 100.0 * _pearson(_rank(_floats(preds)), _rank(_floats(refs)))


# ----- entity-level F1 for BIO / BIOES tagging ------------------------------------------------
def _split_tag(tag: str) -> Tuple[str, str]:
    """``"B-PER"`` -> ``("B", "PER")``; ``"O"`` -> ``("O", "")``; also accepts ``PER-B`` suffix style."""
    if tag in ("O", "", "-"):
        return "O", ""
    for sep in ("-", "_"):
        if len(tag) > 2 and tag[1] == sep and tag[0] in "BIESMU":
            return tag[0], tag[2:]
        if len(tag) > 2 and tag[-2] == sep and tag[-1] in "BIESMU":
            return tag[-1], tag[:-2]
    return "I", tag  # a bare type name behaves as inside-of-chunk (conlleval does the same)


def _chunk_end(prev_p: str, prev_t: str, p: str, t: str) -> bool:
    if prev_p in ("E", "S", "U"):
        return True
    if prev_p in ("B", "I", "M") and (p in ("B", "S", "U", "O") or t != prev_t):
        return True
    return False


def _chunk_start(prev_p: str, prev_t: str, p: str, t: str) -> bool:
    if p in ("B", "S", "U"):
        return True
    if p in ("I", "M", "E") and (prev_p in ("E", "S", "U", "O") or t != prev_t):
        return True
    return False


def get_entities(tags: Sequence[str]) -> List[Tuple[str, int, int]]:
    """Chunks ``(type, start, end_inclusive)`` of one tag sequence, conlleval rules.

    Handles IOB1/IOB2 (``B-``/``I-``) and BIOES/BILOU-ish (``E-``/``S-``) tags; an ``I-``
    without a preceding ``B-`` starts a chunk, as in conlleval and seqeval's default mode.
    """
    out: List[Tuple[str, int, int]] = []
    prev_p, prev_t, begin = "O", "", -1
    for i, tag in enumerate(list(tags) + ["O"]):
        p, t = _split_tag(str(tag))
        if begin >= 0 and _chunk_end(prev_p, prev_t, p, t):
            out.append((prev_t, begin, i - 1))
            begin = -1
        if _chunk_start(prev_p, prev_t, p, t):
            begin = i
        prev_p, prev_t = p, t
    return out


def seqeval_f1(preds: Sequence[Sequence[str]], refs: Sequence[Sequence[str]]) -> float:
    """Micro-averaged entity-level F1 over all sequences (CoNLL / seqeval default)."""
    _check(preds, refs)
    tp = n_pred = n_gold = 0
    for i, (p, r) in enumerate(zip(preds, refs)):
        if len(p) != len(r):
            raise ValueError(f"sequence {i}: {len(p)} predicted tags for {len(r)} gold tags")
        pe, re_ = set(get_entities(p)), set(get_entities(r))
        tp += len(pe & re_)
        n_pred += len(pe)
        n_gold += len(re_)
    return 100.0 * _prf(float(tp), float(n_pred), float(n_gold))

