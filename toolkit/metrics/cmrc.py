"""The official CMRC2018 evaluation (``cmrc2018_evaluate.py``), re-implemented without nltk.

How the official script scores one prediction against its gold answers:

* **Mixed segmentation.** Lower-case and strip; every Chinese character (``\\u4e00-\\u9fa5``) and
  every listed punctuation mark is its own segment; runs of other characters (English words,
  numbers) are word-tokenized. The official script calls ``nltk.word_tokenize`` on those runs;
  here :func:`_word_tokenize` applies the Treebank rules that matter for answer spans:
  whitespace splits; ``; @ # $ % & ? ! ( ) [ ] { } < > "`` and commas outside numbers become
  tokens; a run's final period and the clitics ``'s 'm 'd 'll 're 've n't`` are split off;
  anything else stays attached (``3.5``, ``1,000``, ``……``: the official list's two-character
  ``……`` never matches one character, so ellipses reach the tokenizer).
* **F1** uses the longest common *contiguous* run of segments (``find_lcs``), not SQuAD's bag of
  tokens: precision = lcs / len(pred), recall = lcs / len(gold). Punctuation is removed first.
* **EM** compares the strings after lower-casing, stripping and removing the listed punctuation.
* Both take the max over the gold answers; a question without a prediction scores 0.
  Totals are averages over all gold questions, in percent; ``average = (em + f1) / 2`` is the
  number the CLUE leaderboard reports for CMRC2018.
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Sequence, Tuple

# The punctuation list of the official script, verbatim (note the two-character "……").
PUNCTUATION: Tuple[str, ...] = (
    "-", ":", "_", "*", "^", "/", "\\", "~", "`", "+", "=",
    "，", "。", "：", "？", "！", "“", "”", "；", "’", "《", "》", "……", "·", "、",
    "「", "」", "（", "）", "－", "～", "『", "』",
)
_PUNCT = frozenset(PUNCTUATION)
_CJK_RE = re.compile(r"[\u4e00-\u9fa5]")
# nltk.word_tokenize's Treebank substitutions that answer spans meet (see the module docstring).
_NLTK_RULES = (
    (re.compile(r"\.\.\."), " ... "),
    (re.compile(r'([;@#$%&?!\[\](){}<>"])'), r" \1 "),
    (re.compile(r"([^0-9]),"), r"\1 , "),
    (re.compile(r",([^0-9])"), r" , \1"),
    (re.compile(r"([^.])(\.)([\])}>\"']*)\s*$"), r"\1 \2\3 "),
    (re.compile(r"(?i)([^' ])('s|'m|'d|'ll|'re|'ve|n't)\b"), r"\1 \2 "),
)


def _word_tokenize(text: str) -> List[str]:
    for pattern, replacement in _NLTK_RULES:
        text = pattern.sub(replacement, text)
    return text.split()


def mixed_segmentation(text: str, remove_punc: bool = False) -> List[str]:
    """Split ``text`` into CMRC segments: one per Chinese character, word runs otherwise.

    Args:
        text: an answer or prediction string.
        remove_punc: drop the official punctuation marks before segmenting (used by F1).

    Returns:
        The list of segments (strings), lower-cased.
    """
    out: List[str] = []
    run = ""
    for ch in str(text).lower().strip():
        if remove_punc and ch in _PUNCT:
            continue
        if _CJK_RE.match(ch) or ch in _PUNCT:
            if run:
                out.extend(_word_tokenize(run))
                run = ""
            out.append(ch)
        else:
            run += ch
    if run:
        out.extend(_word_tokenize(run))
    return out


def remove_punctuation(text: str) -> str:
    """Lower-case, strip and delete the official punctuation marks (EM normalization)."""
    return "".join(ch for ch in str(text).lower().strip() if ch not in _PUNCT)


def longest_common_substring(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common contiguous run of ``a`` and ``b`` (the script's ``find_lcs``)."""
    best = 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b):
            if x == y:
                cur[j + 1] = prev[j] + 1
                if cur[j + 1] > best:
                    best = cur[j + 1]
        prev = cur
    return best


def f1_score(answers: Sequence[str], prediction: str) -> float:
    """Max over ``answers`` of the LCS-based F1 (a fraction in [0, 1])."""
    pred = mixed_segmentation(prediction, remove_punc=True)
    scores = [0.0]
    for ans in answers:
        gold = mixed_segmentation(ans, remove_punc=True)
        lcs = longest_common_substring(gold, pred)
        if lcs == 0:
            continue
        p, r = lcs / len(pred), lcs / len(gold)
        scores.append(2 * p * r / (p + r))
    return max(scores)


def em_score(answers: Sequence[str], prediction: str) -> float:
    """1.0 if ``prediction`` equals any answer after punctuation removal, else 0.0."""
    pred = remove_punctuation(prediction)
    return 1.0 if any(remove_punctuation(a) == pred for a in answers) else 0.0


def cmrc2018_metric(gold: Mapping[str, Sequence[str]], preds: Mapping[str, str]) -> Dict[str, float]:
    """Official CMRC2018 scores in percent.

    Args:
        gold: question id -> list of gold answer texts (all annotators' answers).
        preds: question id -> predicted answer text. Missing ids score 0 (as officially);
            ids not in ``gold`` are ignored.

    Returns:
        ``{"em": float, "f1": float, "average": (em + f1) / 2}``, all in percent.
    """
    if not gold:
        return {"em": 0.0, "f1": 0.0, "average": 0.0}
    em = f1 = 0.0
    for qid, answers in gold.items():
        if qid not in preds:
            continue
        prediction = str(preds[qid])
        f1 += f1_score(list(answers), prediction)
        em += em_score(list(answers), prediction)
    em_pct = 100.0 * em / len(gold)
    f1_pct = 100.0 * f1 / len(gold)
    return {"em": em_pct, "f1": f1_pct, "average": (em_pct + f1_pct) / 2}
