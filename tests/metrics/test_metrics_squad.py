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


# ----- against the official scripts' logic (tests/official_eval.py) --------------------------------
_WORDS = ["the", "a", "an", "Paris", "France", "river", "10th", "century", "Normans", "Denver", "Broncos", "of"]
_NOISE = ["!", ",", ".", "'s", "  ", "The"]


def _random_text(rng, empty_ok=True):
    if empty_ok and rng.random() < 0.15:
        return rng.choice(["", "the", " . "])  # normalises to nothing
    n = rng.randint(1, 4)
    return " ".join(rng.choice(_WORDS) + (rng.choice(_NOISE) if rng.random() < 0.3 else "") for _ in range(n))


def _random_dataset(rng, n=14, v2=True):
    qas = []
    for i in range(n):
        impossible = v2 and rng.random() < 0.35
        answers = [] if impossible else [{"text": _random_text(rng), "answer_start": 0}
                                         for _ in range(rng.randint(1, 3))]
        qas.append({"id": f"q{i}", "question": "?", "answers": answers, "is_impossible": impossible})
    return [{"title": "t", "paragraphs": [{"context": "c", "qas": qas}]}]


def _gold(dataset):
    return {qa["id"]: [a["text"] for a in qa["answers"]] for a in dataset for p in a["paragraphs"] for qa in p["qas"]}


@pytest.mark.parametrize("seed", range(25))
def test_v2_matches_the_official_script(seed):
    import random

    from official_eval import squad_v2_evaluate

    rng = random.Random(seed)
    data = _random_dataset(rng)
    gold = _gold(data)
    preds = {q: ("" if rng.random() < 0.3 else _random_text(rng)) for q in gold}
    # Probabilities on a coarse grid (ties), in a shuffled order (the official sort is stable).
    order = list(gold)
    rng.shuffle(order)
    na = {q: rng.choice([0.1, 0.3, 0.5, 0.7, 0.9]) for q in order}
    thresh = rng.choice([1.0, 0.6, 0.2])
    ref = squad_v2_evaluate(data, preds, na_probs=na, na_prob_thresh=thresh)
    out = squad_v2(gold, preds, na_probs=na, na_prob_thresh=thresh)
    for k in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact",
              "best_exact_thresh", "best_f1", "best_f1_thresh"):
        if k in ref:
            assert out[k] == pytest.approx(ref[k]), (k, seed)
    assert ("HasAns_exact" in out) == ("HasAns_exact" in ref) and ("NoAns_exact" in out) == ("NoAns_exact" in ref)
    # Without a probability file the script scores every question with probability 0.
    ref = squad_v2_evaluate(data, preds)
    out = squad_v2(gold, preds)
    assert out["exact"] == pytest.approx(ref["exact"]) and out["f1"] == pytest.approx(ref["f1"])


@pytest.mark.parametrize("seed", range(25))
def test_v1_matches_the_official_script(seed):
    import random

    from official_eval import squad_v1_evaluate

    rng = random.Random(100 + seed)
    data = _random_dataset(rng, v2=False)
    gold = _gold(data)
    preds = {q: _random_text(rng) for q in gold}
    ref = squad_v1_evaluate(data, preds)
    out = squad_v1(gold, preds)
    assert out["exact_match"] == pytest.approx(ref["exact_match"]) and out["f1"] == pytest.approx(ref["f1"])
