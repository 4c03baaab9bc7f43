"""SQuAD v1.1 / v2.0 loaders and the {id: answer} prediction format."""
from __future__ import annotations

import json

import pytest

from toolkit.errors import DataError
from toolkit.tasks import get_task, resolve_tasks


@pytest.fixture()
def squad_dir(assets_dir):
    return assets_dir / "squad"


def test_v1_loads_one_example_per_question(squad_dir):
    task = get_task("squad_v1", squad_dir)
    assert task.data_dir == squad_dir / "SQuAD" and task.task_type == "span"
    dev = task.load("dev")
    assert len(dev) == 4 and len(task.load("train")) == 2
    ex = dev[1]
    assert ex.guid == "56be4db0acb8001400a502ed" and ex.question.startswith("Which NFL team represented the NFC")
    assert [a["text"] for a in ex.answers] == ["Carolina Panthers", "Panthers", "Carolina Panthers"]
    a = ex.answers[0]
    assert ex.context[a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]
    assert not any(e.is_impossible for e in dev)


def test_v2_unanswerable_and_alias(squad_dir):
    task = get_task("squad_v2", squad_dir)
    dev = task.load("dev")
    assert [e.is_impossible for e in dev] == [False, False, True]
    assert dev[2].answers == []  # plausible_answers are not gold
    assert task.load("train")[1].is_impossible
    alias = get_task("squad", squad_dir)
    assert alias.name == "squad_v1" and len(alias.load("dev")) == 4
    assert [t.name for t in resolve_tasks("squad,squad_v1", squad_dir)] == ["squad_v1"]


def test_files_directly_in_data_dir(squad_dir):
    task = get_task("squad_v1", squad_dir / "SQuAD")
    assert len(task.load("dev")) == 4


def test_bad_json_and_missing_keys(squad_dir, tmp_path):
    bad = tmp_path / "dev-v1.1.json"
    bad.write_text('{"data": [\n{"paragraphs": [}\n]}')
    with pytest.raises(DataError, match=r"dev-v1\.1\.json:2: invalid JSON"):
        get_task("squad_v1", tmp_path).load("dev")
    doc = json.loads((squad_dir / "SQuAD" / "dev-v1.1.json").read_text())
    del doc["data"][1]["paragraphs"][0]["qas"][0]["question"]
    bad.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=r"data\[1\]\.paragraphs\[0\]\.qas\[0\]: missing key 'question'"):
        get_task("squad_v1", tmp_path).load("dev")
    with pytest.raises(DataError, match=r"train-v1\.1\.json: missing data file"):
        get_task("squad_v1", tmp_path).load("train")


def test_prediction_round_trip_and_errors(squad_dir, tmp_path):
    task = get_task("squad_v2", squad_dir)
    dev = task.load("dev")
    path = tmp_path / task.submission_name("dev")
    task.write_predictions(dev, ["France", "11th centuries", ""], path)
    preds = task.read_predictions(path, dev)
    assert preds == ["France", "11th centuries", ""]
    out = task.score(dev, preds)
    assert out["exact"] == pytest.approx(200 / 3) and out["NoAns_exact"] == 100.0
    assert out["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 3)
    # Aligned no-answer probabilities or a {qid: p} dict enable the best-threshold keys.
    with_probs = task.score(dev, preds, na_probs=[0.1, 0.2, 0.9])
    assert with_probs["best_f1"] == pytest.approx(out["f1"])
    ids = [e.guid for e in dev]
    assert task.score(dev, preds, na_probs=dict(zip(ids, [0.1, 0.2, 0.9]))) == with_probs

    data = json.loads(path.read_text())
    del data[ids[1]]
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match=f"missing prediction for question id '{ids[1]}'"):
        task.read_predictions(path, dev)
    data[ids[1]] = "x"
    data["zzz"] = "y"
    path.write_text(json.dumps(data))
    with pytest.raises(DataError, match="unknown question id 'zzz'"):
        task.read_predictions(path, dev)
    path.write_text('["France"]')
    with pytest.raises(DataError, match="expected a JSON object"):
        task.read_predictions(path, dev)


def test_v1_score_on_gold_is_100(squad_dir):
    task = get_task("squad", squad_dir)
    dev = task.load("dev")
    assert task.score(dev, [e.answers[-1]["text"] for e in dev]) == {"exact_match": 100.0, "f1": 100.0}
