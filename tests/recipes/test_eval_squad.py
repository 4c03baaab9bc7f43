"""SQuAD v2.0 end to end: fine-tune a tiny model, then score the files it wrote with the
official evaluation script's logic (tests/official_eval.py), not with the toolkit's scorer."""
from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from official_eval import squad_v2_evaluate

KEYS = ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1", "best_exact", "best_exact_thresh",
        "best_f1", "best_f1_thresh")


@pytest.fixture(scope="module")
def squad_dir(assets_dir):
    return assets_dir / "squad" / "v2_tiny"


def _qids(dev_doc):
    return [qa["id"] for a in dev_doc["data"] for p in a["paragraphs"] for qa in p["qas"]]


def test_finetune_writes_official_files_that_the_official_logic_scores(tiny_bert_dir, squad_dir, tmp_path):
    from toolkit.cli import main

    out = tmp_path / "ft"
    r = CliRunner().invoke(main, ["finetune", "--model", str(tiny_bert_dir), "--task", "squad_v2", "--data-dir",
                                  str(squad_dir), "--output-dir", str(out), "epochs=4", "optim.lr=1e-3",
                                  "max_seq_length=48", "doc_stride=16", "save_model=false"])
    assert r.exit_code == 0, r.output
    dev = json.loads((squad_dir / "dev-v2.0.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    na_probs = json.loads((out / "na_prob.json").read_text())
    # The official formats: {qid: answer text} and {qid: probability}, one entry per dev question.
    assert list(preds) == _qids(dev) and list(na_probs) == _qids(dev)
    assert all(isinstance(v, str) for v in preds.values())
    assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in na_probs.values())
    # "" (no answer) exactly where the no-answer probability is above one half.
    assert all((preds[q] == "") == (na_probs[q] > 0.5) for q in preds)
    # Non-empty answers are spans of their context.
    contexts = {qa["id"]: p["context"] for a in dev["data"] for p in a["paragraphs"] for qa in p["qas"]}
    assert all(v in contexts[q] for q, v in preds.items())

    official = squad_v2_evaluate(dev["data"], preds, na_probs=na_probs)
    reported = json.loads((out / "results.json").read_text())
    assert reported["prediction_files"] == {"predictions": str(out / "predictions.json"),
                                            "na_prob": str(out / "na_prob.json")}
    for k in KEYS:
        assert reported["metrics"][k] == pytest.approx(official[k]), k
    assert reported["score"] == pytest.approx(official["f1"])

    # toolkit score reads the same two files and agrees.
    r = CliRunner().invoke(main, ["score", "--task", "squad_v2", "--data-dir", str(squad_dir), "--predictions",
                                  str(out / "predictions.json"), "--na-prob-file", str(out / "na_prob.json")])
    assert r.exit_code == 0, r.output
    scored = json.loads(r.output)
    for k in KEYS:
        assert scored[k] == pytest.approx(official[k]), k


def test_eval_collects_the_dev_prediction_files(tiny_bert_dir, squad_dir, tmp_path):
    from toolkit.recipes.evaluate import EvalConfig, run_eval

    out = tmp_path / "ev"
    res = run_eval(EvalConfig(model=str(tiny_bert_dir), tasks=["squad_v2"], data_dir=str(squad_dir),
                              output_dir=str(out), max_steps=3, max_seq_length=48, seeds=[1, 2]))
    files = res["prediction_files"]["squad_v2"]
    assert set(files) == {"predictions", "na_prob"}
    best_run = res["tasks"]["squad_v2"]["best"]["run_dir"]
    for key, name in (("predictions", "predictions.json"), ("na_prob", "na_prob.json")):
        assert files[key] == str(out / "predictions" / "squad_v2" / name)
        assert json.loads((out / "predictions" / "squad_v2" / name).read_text()) == \
            json.loads((tmp_path / best_run / name).read_text())
    dev = json.loads((squad_dir / "dev-v2.0.json").read_text())
    preds = json.loads((out / "predictions" / "squad_v2" / "predictions.json").read_text())
    na = json.loads((out / "predictions" / "squad_v2" / "na_prob.json").read_text())
    official = squad_v2_evaluate(dev["data"], preds, na_probs=na)
    best = res["tasks"]["squad_v2"]["best"]
    assert best["metrics"]["f1"] == pytest.approx(official["f1"])
    assert best["metrics"]["exact"] == pytest.approx(official["exact"])
    # No leaderboard file for SQuAD (its test set is hidden): nothing under submissions/.
    assert res["submissions"] == {}
    assert not math.isnan(res["average"])


def test_squad_v1_writes_predictions_only(tiny_bert_dir, assets_dir, tmp_path):
    from official_eval import squad_v1_evaluate
    from toolkit.recipes.finetune import FinetuneConfig, run_finetune

    squad = assets_dir / "squad"
    out = tmp_path / "v1"
    res = run_finetune(FinetuneConfig(model=str(tiny_bert_dir), task="squad_v1", data_dir=str(squad),
                                      output_dir=str(out), max_steps=2, max_seq_length=64, save_model=False))
    assert sorted(p.name for p in out.glob("*.json")) == ["config.json", "predictions.json", "results.json"]
    preds = json.loads((out / "predictions.json").read_text())
    dev = json.loads((squad / "SQuAD" / "dev-v1.1.json").read_text())
    official = squad_v1_evaluate(dev["data"], preds)
    assert res["metrics"] == {k: pytest.approx(v) for k, v in official.items()}
