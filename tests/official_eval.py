"""Independent references for metric tests: the logic of the official evaluation scripts
(SQuAD ``evaluate-v1.1.py`` and ``evaluate-v2.0.py``, CLUE's ``cmrc2018_evaluate.py``),
re-written here from the scripts themselves, on the raw JSON documents. Nothing here imports
the toolkit: tests compare the toolkit's scores and files against these.

One deviation: the CMRC script tokenizes non-Chinese runs with ``nltk.word_tokenize`` (nltk is
not a dependency). :func:`cmrc2018_evaluate` splits them on whitespace, which equals nltk's
output on the inputs the tests use (letters and digits separated by spaces).
"""
from __future__ import annotations

import collections
import re
import string
from typing import Any, Dict, List, Mapping, Optional


# ----- SQuAD v1.1 / v2.0 -------------------------------------------------------------------------
def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace."""
    def remove_articles(text):
        return re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", text)

    def white_space_fix(text):
        return " ".join(text.split())

    def remove_punc(text):
        exclude = set(string.punctuation)
        return "".join(ch for ch in text if ch not in exclude)

    return white_space_fix(remove_articles(remove_punc(s.lower())))


def _v1_f1(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = collections.Counter(prediction_tokens) & collections.Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(prediction_tokens)
    recall = 1.0 * num_same / len(ground_truth_tokens)
    return (2 * precision * recall) / (precision + recall)


def squad_v1_evaluate(dataset: List[Dict[str, Any]], predictions: Mapping[str, str]) -> Dict[str, float]:
    """``evaluate-v1.1.py``'s ``evaluate(dataset, predictions)``: ``dataset`` is the file's ``data``."""
    f1 = exact_match = total = 0
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                total += 1
                if qa["id"] not in predictions:
                    continue  # the official script prints a message and scores 0
                ground_truths = [x["text"] for x in qa["answers"]]
                prediction = predictions[qa["id"]]
                exact_match += max(normalize_answer(prediction) == normalize_answer(g) for g in ground_truths)
                f1 += max(_v1_f1(prediction, g) for g in ground_truths)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


def _get_tokens(s: str) -> List[str]:
    if not s:
        return []
    return normalize_answer(s).split()


def _compute_exact(a_gold: str, a_pred: str) -> int:
    return int(normalize_answer(a_gold) == normalize_answer(a_pred))


def _compute_f1(a_gold: str, a_pred: str) -> float:
    gold_toks = _get_tokens(a_gold)
    pred_toks = _get_tokens(a_pred)
    common = collections.Counter(gold_toks) & collections.Counter(pred_toks)
    num_same = sum(common.values())
    if len(gold_toks) == 0 or len(pred_toks) == 0:
        # If either is no-answer, then F1 is 1 if they agree, 0 otherwise
        return int(gold_toks == pred_toks)
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred_toks)
    recall = 1.0 * num_same / len(gold_toks)
    return (2 * precision * recall) / (precision + recall)


def squad_v2_evaluate(dataset: List[Dict[str, Any]], preds: Mapping[str, str],
                      na_probs: Optional[Mapping[str, float]] = None,
                      na_prob_thresh: float = 1.0) -> Dict[str, float]:
    """``evaluate-v2.0.py``'s ``main()`` without the plots: ``dataset`` is the file's ``data``,
    ``preds`` the predictions file, ``na_probs`` the ``--na-prob-file`` (None: all 0.0)."""
    if na_probs is None:
        na_probs = {k: 0.0 for k in preds}
    qid_to_has_ans = {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid_to_has_ans[qa["id"]] = bool(qa["answers"])
    has_ans_qids = [k for k, v in qid_to_has_ans.items() if v]
    no_ans_qids = [k for k, v in qid_to_has_ans.items() if not v]

    exact_raw, f1_raw = {}, {}
    for article in dataset:
        for p in article["paragraphs"]:
            for qa in p["qas"]:
                qid = qa["id"]
                gold_answers = [a["text"] for a in qa["answers"] if normalize_answer(a["text"])]
                if not gold_answers:
                    gold_answers = [""]  # For unanswerable questions, only correct answer is empty string
                if qid not in preds:
                    continue
                a_pred = preds[qid]
                exact_raw[qid] = max(_compute_exact(a, a_pred) for a in gold_answers)
                f1_raw[qid] = max(_compute_f1(a, a_pred) for a in gold_answers)

    def apply_no_ans_threshold(scores):
        return {qid: (float(not qid_to_has_ans[qid]) if na_probs[qid] > na_prob_thresh else s)
                for qid, s in scores.items()}

    exact_thresh, f1_thresh = apply_no_ans_threshold(exact_raw), apply_no_ans_threshold(f1_raw)

    def make_eval_dict(exact_scores, f1_scores, qid_list=None):
        if not qid_list:
            total = len(exact_scores)
            return {"exact": 100.0 * sum(exact_scores.values()) / total,
                    "f1": 100.0 * sum(f1_scores.values()) / total, "total": total}
        total = len(qid_list)
        return {"exact": 100.0 * sum(exact_scores[k] for k in qid_list) / total,
                "f1": 100.0 * sum(f1_scores[k] for k in qid_list) / total, "total": total}

    out_eval = make_eval_dict(exact_thresh, f1_thresh)
    if has_ans_qids:
        for k, v in make_eval_dict(exact_thresh, f1_thresh, qid_list=has_ans_qids).items():
            out_eval[f"HasAns_{k}"] = v
    if no_ans_qids:
        for k, v in make_eval_dict(exact_thresh, f1_thresh, qid_list=no_ans_qids).items():
            out_eval[f"NoAns_{k}"] = v

    def find_best_thresh(scores):
        num_no_ans = len(no_ans_qids)
        cur_score = num_no_ans
        best_score = cur_score
        best_thresh = 0.0
        qid_list = sorted(na_probs, key=lambda k: na_probs[k])
        for qid in qid_list:
            if qid not in scores:
                continue
            if qid_to_has_ans[qid]:
                diff = scores[qid]
            else:
                diff = -1 if preds[qid] else 0
            cur_score += diff
            if cur_score > best_score:
                best_score = cur_score
                best_thresh = na_probs[qid]
        return 100.0 * best_score / len(scores), best_thresh

    out_eval["best_exact"], out_eval["best_exact_thresh"] = find_best_thresh(exact_raw)
    out_eval["best_f1"], out_eval["best_f1_thresh"] = find_best_thresh(f1_raw)
    return out_eval


# ----- CMRC2018 ----------------------------------------------------------------------------------
_SP_CHAR = ["-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=",
            "，", "。", "：", "？", "！", "“", "”", "；", "’", "《", "》", "……", "·", "、",
            "「", "」", "（", "）", "－", "～", "『", "』"]


def _mixed_segmentation(in_str: str, rm_punc: bool = False) -> List[str]:
    in_str = str(in_str).lower().strip()
    segs_out: List[str] = []
    temp_str = ""
    for char in in_str:
        if rm_punc and char in _SP_CHAR:
            continue
        if re.search(r"[\u4e00-\u9fa5]", char) or char in _SP_CHAR:
            if temp_str != "":
                segs_out.extend(temp_str.split())  # nltk.word_tokenize in the official script
                temp_str = ""
            segs_out.append(char)
        else:
            temp_str += char
    if temp_str != "":
        segs_out.extend(temp_str.split())
    return segs_out


def _remove_punctuation(in_str: str) -> str:
    in_str = str(in_str).lower().strip()
    return "".join(char for char in in_str if char not in _SP_CHAR)


def _find_lcs(s1: List[str], s2: List[str]):
    m = [[0 for _ in range(len(s2) + 1)] for _ in range(len(s1) + 1)]
    mmax = 0
    p = 0
    for i in range(len(s1)):
        for j in range(len(s2)):
            if s1[i] == s2[j]:
                m[i + 1][j + 1] = m[i][j] + 1
                if m[i + 1][j + 1] > mmax:
                    mmax = m[i + 1][j + 1]
                    p = i + 1
    return s1[p - mmax:p], mmax


def _calc_f1_score(answers: List[str], prediction: str) -> float:
    f1_scores = []
    for ans in answers:
        ans_segs = _mixed_segmentation(ans, rm_punc=True)
        prediction_segs = _mixed_segmentation(prediction, rm_punc=True)
        _, lcs_len = _find_lcs(ans_segs, prediction_segs)
        if lcs_len == 0:
            f1_scores.append(0)
            continue
        precision = 1.0 * lcs_len / len(prediction_segs)
        recall = 1.0 * lcs_len / len(ans_segs)
        f1_scores.append((2 * precision * recall) / (precision + recall))
    return max(f1_scores)


def _calc_em_score(answers: List[str], prediction: str) -> int:
    for ans in answers:
        if _remove_punctuation(ans) == _remove_punctuation(prediction):
            return 1
    return 0


def cmrc2018_evaluate(ground_truth: Dict[str, Any], predictions: Mapping[str, str]) -> Dict[str, float]:
    """``cmrc2018_evaluate.py``'s ``evaluate``; returns ``{"em", "f1", "average"}`` in percent."""
    f1 = em = total_count = 0
    for instance in ground_truth["data"]:
        for para in instance["paragraphs"]:
            for qas in para["qas"]:
                total_count += 1
                query_id = qas["id"].strip()
                answers = [x["text"] for x in qas["answers"]]
                if query_id not in predictions:
                    continue
                prediction = str(predictions[query_id])
                f1 += _calc_f1_score(answers, prediction)
                em += _calc_em_score(answers, prediction)
    f1_score = 100.0 * f1 / total_count
    em_score = 100.0 * em / total_count
    return {"em": em_score, "f1": f1_score, "average": (em_score + f1_score) * 0.5}
