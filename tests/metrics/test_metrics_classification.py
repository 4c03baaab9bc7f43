"""Classification / regression / tagging metrics against scikit-learn and scipy."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from toolkit.metrics import METRICS, compute, get_entities
from toolkit.metrics.classification import (accuracy, f1_binary, macro_f1, matthews_corr, pearson, seqeval_f1,
                                            spearman)


@pytest.mark.parametrize("seed", range(5))
def test_label_metrics_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    n, k = 40, 2 + seed % 3
    refs = [str(x) for x in rng.integers(0, k, n)]
    preds = [str(x) for x in rng.integers(0, k, n)]
    assert accuracy(preds, refs) == pytest.approx(100 * skm.accuracy_score(refs, preds))
    assert matthews_corr(preds, refs) == pytest.approx(100 * skm.matthews_corrcoef(refs, preds))
    assert macro_f1(preds, refs) == pytest.approx(100 * skm.f1_score(refs, preds, average="macro"))
    assert f1_binary(preds, refs) == pytest.approx(100 * skm.f1_score(refs, preds, labels=["1"], average="micro"))


@pytest.mark.parametrize("seed", range(5))
def test_correlations_match_scipy(seed):
    rng = np.random.default_rng(seed)
    refs = rng.integers(0, 6, 30).astype(float)  # integer scores: many ties
    preds = refs + rng.normal(0, 2, 30)
    preds[:5] = preds[0]  # ties in predictions too
    assert pearson(preds, refs) == pytest.approx(100 * stats.pearsonr(preds, refs)[0])
    assert spearman(preds, refs) == pytest.approx(100 * stats.spearmanr(preds, refs)[0])


def test_undefined_cases_return_zero():
    assert matthews_corr(["1"] * 5, ["1", "0", "1", "0", "1"]) == 0.0
    assert pearson([1.0] * 4, [1.0, 2.0, 3.0, 4.0]) == 0.0
    assert spearman([2.0] * 4, [1.0, 2.0, 3.0, 4.0]) == 0.0
    assert f1_binary(["0", "0"], ["0", "0"]) == 0.0
    assert accuracy([], []) == 0.0
    with pytest.raises(ValueError):
        accuracy(["1"], ["1", "0"])


def test_f1_positive_class_is_label_one():
    # 2 true positives, 1 false positive, 1 false negative -> P = R = 2/3.
    preds = [1, 1, 1, 0, 0]
    refs = ["1", "1", "0", "1", "0"]
    assert f1_binary(preds, refs) == pytest.approx(100 * 2 / 3)
    assert f1_binary(preds, refs, pos_label=0) == pytest.approx(50.0)  # tp 1, P = R = 1/2


def test_token_accuracy_flattens_sequences():
    refs = [["B-PER", "O"], ["O", "O", "B-LOC"]]
    preds = [["B-PER", "O"], ["O", "B-LOC", "B-LOC"]]
    assert accuracy(preds, refs) == pytest.approx(80.0)


def test_entities_bio_and_bioes():
    assert get_entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # An I- without B- starts a chunk (conlleval); a type change splits chunks.
    assert get_entities(["I-PER", "I-LOC", "O"]) == [("PER", 0, 0), ("LOC", 1, 1)]
    assert get_entities(["B-ORG", "E-ORG", "S-PER", "O", "B-LOC", "I-LOC", "E-LOC"]) == [
        ("ORG", 0, 1), ("PER", 2, 2), ("LOC", 4, 6)]


def test_seqeval_f1_hand_computed():
    refs = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    preds = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-LOC"]]
    # gold: PER, LOC, ORG (3); predicted: PER, ORG, LOC@1 (3); correct 2 -> P = R = F1 = 2/3.
    assert seqeval_f1(preds, refs) == pytest.approx(100 * 2 / 3)
    assert seqeval_f1(refs, refs) == 100.0
    assert seqeval_f1([["O"]], [["O"]]) == 0.0


def test_compute_merges_and_rejects_unknown():
    out = compute(["accuracy", "f1"], ["1", "0"], ["1", "1"])
    assert out == {"accuracy": 50.0, "f1": pytest.approx(100 * 2 / 3)}
    assert set(compute("squad_v1", ["Paris"], [["paris", "the city"]])) == {"exact_match", "f1"}
    assert {"accuracy", "f1", "mcc", "pearson", "spearman", "macro_f1", "seqeval_f1"} <= set(METRICS)
    from toolkit.errors import ToolkitError
    with pytest.raises(ToolkitError, match="unknown metric 'acc'"):
        compute(["acc"], [1], [1])
