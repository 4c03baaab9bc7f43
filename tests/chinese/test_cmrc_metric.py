"""CMRC2018 official metric: hand-computed cases."""
from __future__ import annotations

import pytest

from toolkit.metrics.cmrc import (
    cmrc2018_metric, em_score, f1_score, longest_common_substring, mixed_segmentation, remove_punctuation,
)


def test_mixed_segmentation():
    assert mixed_segmentation("iPhone 6手机") == ["iphone", "6", "手", "机"]
    assert mixed_segmentation("3.5亿元") == ["3.5", "亿", "元"]
    assert mixed_segmentation("《红楼梦》") == ["《", "红", "楼", "梦", "》"]
    assert mixed_segmentation("《红楼梦》", remove_punc=True) == ["红", "楼", "梦"]
    assert mixed_segmentation("  Hello, World  ") == ["hello", ",", "world"]


def test_latin_runs_follow_nltk_word_tokenize():
    # What nltk.word_tokenize (the official script's tokenizer) returns for these runs.
    assert mixed_segmentation("Don't stop.") == ["do", "n't", "stop", "."]
    assert mixed_segmentation("1,000 (approx) 3.5") == ["1,000", "(", "approx", ")", "3.5"]
    assert mixed_segmentation("John's 北京") == ["john", "'s", "北", "京"]
    # The official list's "……" is two characters, so an ellipsis is not a punctuation segment.
    assert mixed_segmentation("好……", remove_punc=True) == ["好", "……"]


def test_remove_punctuation_and_em():
    assert remove_punctuation(" 《红楼梦》 ") == "红楼梦"
    assert em_score(["《红楼梦》"], "红楼梦") == 1.0
    assert em_score(["ABC"], "abc") == 1.0
    assert em_score(["红楼梦"], "红楼") == 0.0


def test_longest_common_substring_is_contiguous():
    assert longest_common_substring(list("abcde"), list("abxde")) == 2  # a subsequence would give 4
    assert longest_common_substring([], list("ab")) == 0


def test_lcs_f1_differs_from_bag_of_tokens():
    # Same characters in another order: SQuAD's bag-of-tokens F1 would be 1.0;
    # the longest common run is 2 ("北京" or "大学") -> P = R = 2/4 -> F1 = 0.5.
    assert f1_score(["北京大学"], "大学北京") == pytest.approx(0.5)


def test_f1_hand_computed():
    # gold [iphone, 6, 手, 机], pred [iphone, 6]: lcs 2, P 1, R 1/2 -> 2/3
    assert f1_score(["iPhone 6 手机"], "iphone 6") == pytest.approx(2 / 3)
    # "3.5" is one token: only "亿" is shared -> P = R = 1/2
    assert f1_score(["3.5亿"], "3亿") == pytest.approx(0.5)
    # max over answers: 越南 -> 2/3; 越南罗马天主教 -> lcs 4, P 1, R 4/7 -> 8/11
    assert f1_score(["越南", "越南罗马天主教"], "越南罗马") == pytest.approx(8 / 11)
    assert f1_score(["越南"], "，。") == 0.0


def test_corpus_scores_and_missing_prediction():
    gold = {"q1": ["1963年"], "q2": ["北京大学"], "q3": ["越南", "越南罗马天主教"], "q4": ["天主教"]}
    preds = {"q1": "1963年", "q2": "大学北京", "q3": "越南罗马", "extra": "ignored"}
    out = cmrc2018_metric(gold, preds)
    em = 100 * (1 + 0 + 0 + 0) / 4
    f1 = 100 * (1 + 0.5 + 8 / 11 + 0) / 4
    assert out["em"] == pytest.approx(em)
    assert out["f1"] == pytest.approx(f1)
    assert out["average"] == pytest.approx((em + f1) / 2)
    assert cmrc2018_metric({}, {}) == {"em": 0.0, "f1": 0.0, "average": 0.0}


@pytest.mark.parametrize("seed", range(30))
def test_matches_the_official_script(seed):
    """Random answers mixing Chinese, the official punctuation list and Latin/digit words."""
    import random

    from official_eval import cmrc2018_evaluate

    rng = random.Random(seed)
    pieces = list("北京大学天安门广场中国人民越南罗马天主教") + ["，", "。", "《", "》", "、", "-", ":", "……"]
    pieces += [" iPhone ", " 3.5 ", " x1 ", " 2019 ", " abc "]

    def text():
        return "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))

    qas = [{"id": f"Q{i}", "question": "？", "answers": [{"text": text(), "answer_start": 0}
                                                       for _ in range(rng.randint(1, 3))]} for i in range(12)]
    ground = {"data": [{"paragraphs": [{"context": "", "qas": qas}]}]}
    preds = {q["id"]: (rng.choice(q["answers"])["text"] if rng.random() < 0.2 else text())
             for q in qas if rng.random() < 0.9}  # some questions unanswered: they score 0
    ref = cmrc2018_evaluate(ground, preds)
    out = cmrc2018_metric({q["id"]: [a["text"] for a in q["answers"]] for q in qas}, preds)
    assert out == {k: pytest.approx(v) for k, v in ref.items()}
