"""SQuAD v1.1 / v2.0 metrics on hand-computed cases."""
from __future__ import annotations

import pytest

from toolkit.metrics.squad import normalize_answer, squad_v1, squad_v2, token_f1_v1, token_f1_v2


def test_normalize_answer():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    # Articles only as whole words: "theater" keeps its "the".
    assert normalize_answer("Theater of Anatolia") == "theater of anatolia"
    assert normalize_answer("") == ""


def test_v1_em_f1_articles_punctuation_multiple_golds():
    gold = {"q1": ["Denver Broncos"], "q2": ["Santa Clara, California", "Levi's Stadium"], "q3": ["the cat sat"]}
    preds = {"q1": "the Denver Broncos.", "q2": "Levis Stadium in California", "q3": "dog sat"}
    out = squad_v1(gold, preds)
    # q1: exact after normalisation. q2: best gold "levis stadium" P=2/4 R=2/2 -> 2/3 (vs "santa clara
    # california": 1 common, P=1/4 R=1/3 -> 2/7); q3: "cat sat" vs "dog sat": P=R=1/2 -> 1/2.
    assert out["exact_match"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 / 2) / 3)


def test_token_f1_empty_cases_differ_between_versions():
    assert token_f1_v1("", "") == 0.0
    assert token_f1_v2("", "") == 1.0
    assert token_f1_v2("the", "") == 1.0  # "the" normalises to nothing
    assert token_f1_v2("paris", "") == 0.0


def test_v2_has_ans_no_ans_and_best_threshold():
    gold = {"a": ["France"], "b": ["10th and 11th centuries"], "c": []}
    preds = {"a": "France", "b": "11th centuries", "c": "Normans"}
    out = squad_v2(gold, preds)
    # a: EM 1, F1 1. b: EM 0; "11th centuries" vs "10th and 11th centuries": 2 common tokens,
    # P = 1, R = 1/2, F1 = 2/3. c: answered an unanswerable question -> 0.
    assert out["exact"] == pytest.approx(100 / 3)
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert out["HasAns_exact"] == pytest.approx(50.0)
    assert out["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert out["NoAns_exact"] == 0.0 and out["NoAns_f1"] == 0.0
    assert "best_exact" not in out

    # With no-answer probabilities: abstaining on "c" (p=0.9) and answering the rest is best.
    probs = {"a": 0.1, "b": 0.3, "c": 0.9}
    out = squad_v2(gold, preds, na_probs=probs)
    assert out["exact"] == pytest.approx(100 / 3)  # default threshold 1.0 abstains on nothing
    assert out["best_exact"] == pytest.approx(200 / 3)
    assert out["best_exact_thresh"] == pytest.approx(0.1)  # b (EM 0) adds nothing beyond a
    assert out["best_f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)
    assert out["best_f1_thresh"] == pytest.approx(0.3)

    # A threshold below c's probability turns c into "no answer", which is right.
    out = squad_v2(gold, preds, na_probs=probs, na_prob_thresh=0.5)
    assert out["exact"] == pytest.approx(200 / 3)
    assert out["NoAns_exact"] == 100.0


def test_v2_empty_prediction_is_no_answer():
    out = squad_v2({"x": [], "y": ["Paris"]}, {"x": "", "y": ""})
    assert out["NoAns_exact"] == 100.0 and out["HasAns_exact"] == 0.0 and out["exact"] == 50.0


def test_missing_prediction_names_id():
    with pytest.raises(KeyError, match="q9"):
        squad_v1({"q9": ["a"]}, {})
