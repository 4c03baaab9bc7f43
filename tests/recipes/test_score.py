"""`toolkit score`: prediction files round-trip to 100 on gold and known values when perturbed."""
from __future__ import annotations

import json

import pytest

from toolkit.errors import DataError, ToolkitError
from toolkit.recipes.score import run_score
from toolkit.tasks import get_task


def _gold_file(task, split, tmp_path, change=None):
    examples = task.load(split)
    preds = [ex.label for ex in examples]
    if change:
        for i, v in change.items():
            preds[i] = v
    path = tmp_path / task.submission_name(split)
    task.write_predictions(examples, preds, path)
    return path


def test_glue_round_trip(assets_dir, tmp_path):
    glue = assets_dir / "glue"
    rte = get_task("rte", glue)
    assert run_score("rte", glue, _gold_file(rte, "dev", tmp_path)) == {"accuracy": 100.0}
    path = _gold_file(rte, "dev", tmp_path, {0: "entailment"})
    assert run_score("rte", glue, path) == {"accuracy": pytest.approx(200 / 3)}
    cola = get_task("cola", glue)
    # gold 1 0 1 -> predicted 1 1 1: constant predictions have MCC 0.
    assert run_score("cola", glue, _gold_file(cola, "dev", tmp_path, {1: "1"})) == {"mcc": 0.0}
    assert run_score("cola", glue, _gold_file(cola, "dev", tmp_path)) == {"mcc": 100.0}


def test_mnli_needs_a_named_dev_split(assets_dir, tmp_path):
    glue = assets_dir / "glue"
    mnli = get_task("mnli", glue)
    path = _gold_file(mnli, "dev_mismatched", tmp_path, {1: "neutral"})
    assert run_score("mnli", glue, path, split="dev_mismatched") == {"accuracy_mm": 50.0}
    with pytest.raises(ToolkitError, match="no split 'dev'.*--split dev_matched"):
        run_score("mnli", glue, path)
    with pytest.raises(ToolkitError, match="no gold labels"):
        run_score("ax", glue, path, split="test")
    with pytest.raises(ToolkitError, match="score one task at a time"):
        run_score("glue", glue, path)


def test_squad_round_trip(assets_dir, tmp_path):
    squad = assets_dir / "squad"
    task = get_task("squad_v2", squad)
    dev = task.load("dev")
    path = tmp_path / "pred.json"
    task.write_predictions(dev, [e.answers[0]["text"] if e.answers else "" for e in dev], path)
    out = run_score("squad_v2", squad, path)
    assert out["exact"] == 100.0 and out["f1"] == 100.0 and out["NoAns_exact"] == 100.0
    data = json.loads(path.read_text())
    data[dev[2].guid] = "Normans"  # answer the unanswerable question
    path.write_text(json.dumps(data))
    out = run_score("squad_v2", squad, path)
    assert out["exact"] == pytest.approx(200 / 3) and out["HasAns_exact"] == 100.0
    del data[dev[0].guid]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"missing prediction for question id '{dev[0].guid}'"):
        run_score("squad_v2", squad, path)


def test_custom_round_trip(assets_dir, tmp_path):
    yaml_path = str(assets_dir / "custom" / "sentiment.yaml")
    task = get_task(yaml_path)
    out = run_score(yaml_path, None, _gold_file(task, "dev", tmp_path))
    assert out == {"accuracy": 100.0, "f1": 100.0, "macro_f1": 100.0}
    # gold pos neg pos neg pos; flip d4 to neg: accuracy 80, F1(pos) = 2*1*(2/3)/(1+2/3) = 80,
    # F1(neg) = 2*(2/3)*1/(5/3) = 80.
    out = run_score(yaml_path, None, _gold_file(task, "dev", tmp_path, {4: "neg"}))
    assert out == {"accuracy": pytest.approx(80.0), "f1": pytest.approx(80.0), "macro_f1": pytest.approx(80.0)}
    reg = str(assets_dir / "custom" / "similarity.yaml")
    plain = tmp_path / "sim.txt"
    plain.write_text("4.0\n2.5\n0.0\n")
    out = run_score(reg, None, plain)
    assert out["pearson"] == pytest.approx(100.0) and out["spearman"] == pytest.approx(100.0)


def test_unknown_task_and_missing_prediction_file(assets_dir, tmp_path):
    with pytest.raises(ToolkitError, match="Did you mean: rte"):
        run_score("rtee", assets_dir / "glue", tmp_path / "x.tsv")
    with pytest.raises(DataError, match=r"x\.tsv: prediction file not found"):
        run_score("rte", assets_dir / "glue", tmp_path / "x.tsv")
