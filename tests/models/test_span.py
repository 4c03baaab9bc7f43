"""N-best span decoding on hand-made logits."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from toolkit.errors import ToolkitError
from toolkit.models.span import SpanFeature, postprocess_span_predictions
from toolkit.tasks.base import SpanExample

CTX = "Paris is the capital of France."
# tokens: [CLS] q q [SEP] Paris is the capital of France . [SEP]
OFFS = [None, None, None, None, (0, 5), (6, 8), (9, 12), (13, 20), (21, 23), (24, 30), (30, 31), None]


def _logits(start_at, end_at, n=len(OFFS), base=0.0):
    s, e = np.full(n, base), np.full(n, base)
    for i, v in start_at.items():
        s[i] = v
    for i, v in end_at.items():
        e[i] = v
    return s, e


def test_best_span_text_from_offsets():
    ex = [SpanExample("q1", "what is the capital", CTX)]
    s, e = _logits({4: 5.0, 7: 3.0}, {4: 4.0, 9: 6.0})
    preds, odds = postprocess_span_predictions(ex, [SpanFeature(0, OFFS)], [s], [e])
    assert preds == {"q1": "Paris is the capital of France"}  # 4..9 scores 11 > 4..4 scores 9
    assert odds["q1"] == pytest.approx(0.0 - 11.0)


def test_skips_question_tokens_reversed_and_too_long():
    ex = [SpanExample("q1", "q", CTX)]
    # question pair (1, 2) = 20 and reversed (7, 5) = 16 must be skipped
    s, e = _logits({1: 10.0, 7: 8.0, 4: 7.0}, {2: 10.0, 5: 8.0, 9: 7.5})
    preds, _ = postprocess_span_predictions(ex, [SpanFeature(0, OFFS)], [s], [e], max_answer_length=2)
    assert preds["q1"] == "Paris is"  # (4, 5) = 15; (7, 9) = 15.5 is 3 tokens long
    preds, _ = postprocess_span_predictions(ex, [SpanFeature(0, OFFS)], [s], [e], max_answer_length=3)
    assert preds["q1"] == "capital of France"


def test_n_best_limits_candidates():
    ex = [SpanExample("q1", "q", CTX)]
    s, e = _logits({0: 9.0, 1: 8.0, 7: 1.0}, {0: 9.0, 2: 8.0, 7: 1.0})
    preds, _ = postprocess_span_predictions(ex, [SpanFeature(0, OFFS)], [s], [e], n_best_size=2)
    assert preds["q1"] == ""  # only non-context tokens in the top-2
    preds, _ = postprocess_span_predictions(ex, [SpanFeature(0, OFFS)], [s], [e], n_best_size=3)
    assert preds["q1"] == "capital"


def test_multi_window_picks_best_and_min_null():
    ctx = "one two three four"
    ex = [SpanExample("q1", "q", ctx), SpanExample("q2", "q", "five")]
    w1 = SpanFeature(0, [None, None, (0, 3), (4, 7), (8, 13), None])
    w2 = SpanFeature(0, [None, None, (8, 13), (14, 18), None])
    w3 = SpanFeature(1, [None, None, (0, 4), None])
    starts = [np.array([2.0, 0, 3, 0, 0, 0]), np.array([1.0, 0, 0, 4, 0]), np.array([0, 0, 1.0, 0])]
    ends = [np.array([2.0, 0, 3, 0, 0, 0]), np.array([1.0, 0, 0, 4, 0]), np.array([0, 0, 1.0, 0])]
    preds, odds = postprocess_span_predictions(ex, [w1, w2, w3], starts, ends)
    assert preds == {"q1": "four", "q2": "five"}
    assert odds["q1"] == pytest.approx(2.0 - 8.0)  # null = min(4, 2), best = 8


def test_version_2_null_threshold():
    ex = [SpanExample("q1", "q", CTX)]
    s, e = _logits({0: 3.0, 4: 2.0}, {0: 3.0, 4: 2.0})
    feats = [SpanFeature(0, OFFS)]
    preds, odds = postprocess_span_predictions(ex, feats, [s], [e], version_2_with_negative=True)
    assert preds["q1"] == "" and odds["q1"] == pytest.approx(2.0)
    preds, _ = postprocess_span_predictions(ex, feats, [s], [e], version_2_with_negative=True,
                                            null_score_diff_threshold=2.5)
    assert preds["q1"] == "Paris"
    preds, _ = postprocess_span_predictions(ex, feats, [s], [e])
    assert preds["q1"] == "Paris"


def test_chinese_offsets_and_tensor_input():
    ctx = "北京是中国的首都。"
    offs = [None, None, None] + [(i, i + 1) for i in range(len(ctx))] + [None]
    s = torch.zeros(1, len(offs))
    e = torch.zeros(1, len(offs))
    s[0, 3], e[0, 4] = 5.0, 5.0
    preds, _ = postprocess_span_predictions([SpanExample("c1", "首都", ctx)], [{"example_index": 0, "offsets": offs}], s, e)
    assert preds["c1"] == "北京"


def test_mismatched_rows_raise():
    with pytest.raises(ToolkitError, match="features"):
        postprocess_span_predictions([SpanExample("q", "q", "c")], [SpanFeature(0, [None])], [], [])
