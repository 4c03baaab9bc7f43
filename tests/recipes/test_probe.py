"""Linear probes: the fitted models against scikit-learn's, and forgetting flagged where features
were lost."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch


def test_logistic_and_ridge_match_scikit_learn():
    from sklearn.linear_model import LogisticRegression, Ridge

    from toolkit.recipes.probe import fit_logistic, fit_ridge, predict_logistic, predict_ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    w_true = rng.normal(size=(8, 3))
    y = (x @ w_true + 0.5 * rng.normal(size=(300, 3))).argmax(1)
    l2 = 1e-2
    ours = predict_logistic(fit_logistic(x, y, 3, l2, steps=300), x)
    # Same objective: mean cross-entropy + l2/2 ||W||^2  <=>  sklearn's C = 1 / (n * l2).
    ref = LogisticRegression(C=1.0 / (len(x) * l2), max_iter=2000).fit(x, y).predict(x)
    assert (ours == ref).mean() > 0.98
    t = x @ rng.normal(size=8) + 0.1 * rng.normal(size=300)
    ours_r = predict_ridge(fit_ridge(x, t, l2), x)
    ref_r = Ridge(alpha=l2 * len(x)).fit(x, t).predict(x)
    assert np.allclose(ours_r, ref_r, atol=1e-6)


@pytest.fixture(scope="module")
def blank_encoder_dir(tmp_path_factory, tiny_bert4_dir):
    """The tiny teacher with its word embeddings zeroed: its features no longer depend on the words."""
    from transformers import AutoModel, AutoTokenizer

    d = tmp_path_factory.mktemp("blank")
    model = AutoModel.from_pretrained(tiny_bert4_dir)
    with torch.no_grad():
        model.embeddings.word_embeddings.weight.zero_()
    model.save_pretrained(d)
    AutoTokenizer.from_pretrained(tiny_bert4_dir).save_pretrained(d)
    return d


def test_probe_flags_an_encoder_that_lost_its_features(tiny_bert4_dir, blank_encoder_dir, fixture_tasks, tmp_path):
    from toolkit.recipes.probe import ProbeConfig, run_probe

    cfg = ProbeConfig(models={"pretrained": str(tiny_bert4_dir), "same": str(tiny_bert4_dir),
                              "blank": str(blank_encoder_dir)},
                      tasks=[str(fixture_tasks["senti"]), str(fixture_tasks["topic"])],
                      output_dir=str(tmp_path / "p"), max_seq_length=32, threshold=5.0)
    res = run_probe(cfg)
    # The sentiment words are linearly separable in a random encoder's mean-pooled features.
    assert res["scores"]["pretrained"]["senti"] > 80
    assert res["forgetting"]["same"] == {"senti": 0.0, "topic": 0.0}
    assert res["forgetting"]["blank"]["senti"] > 5.0
    assert {"model": "blank", "task": "senti"} in [{k: f[k] for k in ("model", "task")} for f in res["flagged"]]
    assert not [f for f in res["flagged"] if f["model"] == "same"]
    saved = json.loads((tmp_path / "p" / "results.json").read_text())
    assert saved["scores"] == json.loads(json.dumps(res["scores"]))
    assert "**(forgetting)**" in (tmp_path / "p" / "results.md").read_text()


def test_probe_config_errors_name_the_field():
    from toolkit.errors import ConfigError
    from toolkit.recipes.probe import ProbeConfig

    with pytest.raises(ConfigError, match="models"):
        ProbeConfig(models={}, tasks=["x"])
    with pytest.raises(ConfigError, match="threshold"):
        ProbeConfig(models={"a": "b"}, tasks=["x"], threshold=-1)
