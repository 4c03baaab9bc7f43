"""`toolkit score` on prediction files written by hand in the leaderboards' formats.

Expected values come from scikit-learn, scipy or the official evaluation scripts' logic
(tests/official_eval.py), never from the toolkit's own writers.
"""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from scipy import stats
from sklearn import metrics as skm

from official_eval import cmrc2018_evaluate, squad_v1_evaluate, squad_v2_evaluate
from toolkit.errors import DataError, ToolkitError
from toolkit.recipes.score import run_score

RTE_GOLD = ["not_entailment", "entailment", "entailment"]  # tests/assets/glue/RTE/dev.tsv
COLA_GOLD = ["1", "0", "1"]
MRPC_GOLD = ["1", "0", "0", "1"]
STSB_GOLD = [5.0, 4.75, 5.0, 2.4, 2.75]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_glue_classification_files(assets_dir, tmp_path):
    glue = assets_dir / "glue"
    f = _write(tmp_path / "RTE.tsv", "index\tprediction\n0\tnot_entailment\n1\tentailment\n2\tentailment\n")
    assert run_score("rte", glue, f) == {"accuracy": 100.0}
    # Rows in any order: matched by index.
    f = _write(tmp_path / "RTE.tsv", "index\tprediction\n2\tentailment\n0\tentailment\n1\tentailment\n")
    pred = ["entailment", "entailment", "entailment"]
    assert run_score("rte", glue, f) == {"accuracy": pytest.approx(100 * skm.accuracy_score(RTE_GOLD, pred))}

    pred = ["1", "0", "0"]
    f = _write(tmp_path / "CoLA.tsv", "index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in enumerate(pred)))
    assert run_score("cola", glue, f) == {"mcc": pytest.approx(100 * skm.matthews_corrcoef(COLA_GOLD, pred))}
    f = _write(tmp_path / "CoLA.tsv", "index\tprediction\n0\t1\n1\t1\n2\t1\n")
    assert run_score("cola", glue, f) == {"mcc": 0.0}  # constant predictions (sklearn also gives 0)

    pred = ["1", "1", "0", "0"]
    f = _write(tmp_path / "MRPC.tsv", "index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in enumerate(pred)))
    assert run_score("mrpc", glue, f) == {"f1": pytest.approx(100 * skm.f1_score(MRPC_GOLD, pred, pos_label="1")),
                                          "accuracy": pytest.approx(100 * skm.accuracy_score(MRPC_GOLD, pred))}


def test_stsb_correlations_and_non_finite_values(assets_dir, tmp_path):
    glue = assets_dir / "glue"
    pred = [4.9, 4.0, 4.5, 1.0, 3.0]
    f = _write(tmp_path / "STS-B.tsv", "index\tprediction\n" + "".join(f"{i}\t{p}\n" for i, p in enumerate(pred)))
    out = run_score("stsb", glue, f)
    assert out["pearson"] == pytest.approx(100 * stats.pearsonr(pred, STSB_GOLD)[0])
    assert out["spearman"] == pytest.approx(100 * stats.spearmanr(pred, STSB_GOLD)[0])
    for bad in ("nan", "inf", "-inf", "NaN"):
        f = _write(tmp_path / "STS-B.tsv", f"index\tprediction\n0\t4.9\n1\t4.0\n2\t{bad}\n3\t1.0\n4\t3.0\n")
        with pytest.raises(DataError, match=rf"STS-B.tsv:4: prediction '{bad}' is not a finite number"):
            run_score("stsb", glue, f)


def test_cli_refuses_non_finite_with_one_line(assets_dir, tmp_path):
    from toolkit.cli import main

    f = _write(tmp_path / "STS-B.tsv", "index\tprediction\n0\t4.9\n1\tnan\n2\t4.5\n3\t1.0\n4\t3.0\n")
    r = CliRunner().invoke(main, ["score", "--task", "stsb", "--data-dir", str(assets_dir / "glue"),
                                  "--predictions", str(f)])
    assert r.exit_code == 2
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output
    assert f"{f}:3: prediction 'nan' is not a finite number" in lines[0]
    # The plain one-prediction-per-line format of custom tasks goes through the same check.
    plain = _write(tmp_path / "sim.txt", "4.0\ninf\n0.0\n")
    r = CliRunner().invoke(main, ["score", "--task", str(assets_dir / "custom" / "similarity.yaml"),
                                  "--predictions", str(plain)])
    assert r.exit_code == 2 and f"{plain}:2: prediction 'inf' is not a finite number" in r.output


def test_mnli_needs_a_named_dev_split(assets_dir, tmp_path):
    glue = assets_dir / "glue"
    f = _write(tmp_path / "mm.tsv", "index\tprediction\n0\tcontradiction\n1\tneutral\n")
    assert run_score("mnli", glue, f, split="dev_mismatched") == {"accuracy_mm": 50.0}
    with pytest.raises(ToolkitError, match="no split 'dev'.*--split dev_matched"):
        run_score("mnli", glue, f)
    with pytest.raises(ToolkitError, match="no gold labels"):
        run_score("ax", glue, f, split="test")
    with pytest.raises(ToolkitError, match="score one task at a time"):
        run_score("glue", glue, f)


def test_squad_v2_predictions_and_na_probs(assets_dir, tmp_path):
    squad = assets_dir / "squad"
    gold = json.loads((squad / "SQuAD" / "dev-v2.0.json").read_text())["data"]
    q1, q2, q3 = "56ddde6b9a695914005b9628", "56ddde6b9a695914005b9629", "5ad39d53604f3c001a3fe8d1"
    preds = {q1: "France.", q2: "the 11th centuries", q3: "Normans"}
    f = _write(tmp_path / "predictions.json", json.dumps(preds))
    ref = squad_v2_evaluate(gold, preds)
    out = run_score("squad_v2", squad, f)
    for k in ("exact", "f1", "HasAns_exact", "HasAns_f1", "NoAns_exact", "NoAns_f1"):
        assert out[k] == pytest.approx(ref[k]), k
    # With na_prob.json: the best-threshold search; q2 and q3 tie at 0.8 (file order decides).
    na = {q3: 0.8, q1: 0.1, q2: 0.8}
    nf = _write(tmp_path / "na_prob.json", json.dumps(na))
    ref = squad_v2_evaluate(gold, preds, na_probs=na)
    out = run_score("squad_v2", squad, f, na_prob_file=nf)
    for k in ("exact", "f1", "best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"):
        assert out[k] == pytest.approx(ref[k]), k
    # A probability above the script's threshold of 1.0 turns q3 into "no answer", as officially.
    na = {q1: 0.1, q2: 0.2, q3: 1.5}
    nf = _write(tmp_path / "na_prob.json", json.dumps(na))
    assert run_score("squad_v2", squad, f, na_prob_file=nf)["NoAns_exact"] == \
        squad_v2_evaluate(gold, preds, na_probs=na)["NoAns_exact"] == 100.0


def test_squad_bad_files_name_file_line_and_id(assets_dir, tmp_path):
    squad = assets_dir / "squad"
    q1, q2, q3 = "56ddde6b9a695914005b9628", "56ddde6b9a695914005b9629", "5ad39d53604f3c001a3fe8d1"
    f = _write(tmp_path / "predictions.json", json.dumps({q1: "France", q2: "10th"}, indent=1))
    with pytest.raises(DataError, match=f"missing prediction for question id '{q3}'"):
        run_score("squad_v2", squad, f)
    f = _write(tmp_path / "predictions.json", json.dumps({q1: "France", q2: "10th", q3: "", "zz": "x"}, indent=1))
    with pytest.raises(DataError, match=r"predictions.json:5: unknown question id 'zz'"):
        run_score("squad_v2", squad, f)
    f = _write(tmp_path / "predictions.json", json.dumps({q1: "France", q2: "10th", q3: ""}))
    nf = _write(tmp_path / "na_prob.json", f'{{\n "{q1}": 0.1,\n "{q2}": NaN,\n "{q3}": 0.9\n}}\n')
    with pytest.raises(DataError, match=rf"na_prob.json:3: no-answer probability of '{q2}' is nan"):
        run_score("squad_v2", squad, f, na_prob_file=nf)
    nf = _write(tmp_path / "na_prob.json", json.dumps({q1: 0.1, q2: "high", q3: 0.9}))
    with pytest.raises(DataError, match="must be a number"):
        run_score("squad_v2", squad, f, na_prob_file=nf)
    nf = _write(tmp_path / "na_prob.json", json.dumps({q1: 0.1, q3: 0.9}))
    with pytest.raises(DataError, match=f"missing no-answer probability for question id '{q2}'"):
        run_score("squad_v2", squad, f, na_prob_file=nf)
    with pytest.raises(ToolkitError, match="only squad_v2"):
        run_score("squad_v1", squad, f, na_prob_file=nf)


def test_squad_v1_file(assets_dir, tmp_path):
    squad = assets_dir / "squad"
    doc = json.loads((squad / "SQuAD" / "dev-v1.1.json").read_text())
    qids = [qa["id"] for a in doc["data"] for p in a["paragraphs"] for qa in p["qas"]]
    preds = {q: ["Denver Broncos", "the Santa Clara", "nothing at all"][i % 3] for i, q in enumerate(qids)}
    f = _write(tmp_path / "predictions.json", json.dumps(preds))
    ref = squad_v1_evaluate(doc["data"], preds)
    out = run_score("squad_v1", squad, f)
    assert out == {"exact_match": pytest.approx(ref["exact_match"]), "f1": pytest.approx(ref["f1"])}


def test_custom_files(assets_dir, tmp_path):
    yaml_path = str(assets_dir / "custom" / "sentiment.yaml")
    gold = ["pos", "neg", "pos", "neg", "pos"]  # tests/assets/custom/sentiment/dev.tsv
    pred = ["pos", "neg", "pos", "neg", "neg"]
    f = _write(tmp_path / "s.tsv", "index\tprediction\n" + "".join(f"d{i}\t{p}\n" for i, p in enumerate(pred)))
    out = run_score(yaml_path, None, f)
    assert out == {"accuracy": pytest.approx(100 * skm.accuracy_score(gold, pred)),
                   "f1": pytest.approx(100 * skm.f1_score(gold, pred, pos_label="pos")),
                   "macro_f1": pytest.approx(100 * skm.f1_score(gold, pred, average="macro"))}
    plain = _write(tmp_path / "sim.txt", "4.0\n2.5\n0.0\n")
    out = run_score(str(assets_dir / "custom" / "similarity.yaml"), None, plain)
    assert out["pearson"] == pytest.approx(100.0) and out["spearman"] == pytest.approx(100.0)


def test_clue_and_fewclue_files(assets_dir, tmp_path):
    clue = assets_dir / "clue"
    f = _write(tmp_path / "afqmc_predict.json", '{"id": 1, "label": "1"}\n{"id": 0, "label": "1"}\n')
    assert run_score("afqmc", clue, f) == {"accuracy": 50.0}  # gold 0, 1 (rows without id: row numbers)
    gold = json.loads((clue / "cmrc2018_public" / "dev.json").read_text(encoding="utf-8"))
    preds = {"DEV_0_QUERY_0": "越南罗马"}
    f = _write(tmp_path / "cmrc2018_predict.json", json.dumps(preds, ensure_ascii=False))
    ref = cmrc2018_evaluate(gold, preds)
    out = run_score("cmrc2018", clue, f)
    assert out == {k: pytest.approx(v) for k, v in ref.items()}
    f = _write(tmp_path / "c3_dev.json", '{"id": "d1-1-0", "label": 1}\n{"id": "m2-1-0", "label": 0}\n')
    assert run_score("c3", clue, f)["accuracy"] == 50.0  # gold 下雨 (1), 六点 (1); dev questions have no id: "<doc id>-<question>"
    few = assets_dir / "fewclue"
    # test_public of eprstmt: Positive, Negative, Positive (ids 23, 24, 25).
    f = _write(tmp_path / "eprstmt.json", '{"id": 23, "label": "Positive"}\n{"id": 24, "label": "Positive"}\n'
                                          '{"id": 25, "label": "Positive"}\n')
    assert run_score("eprstmt", few, f, split="test_public") == {"accuracy": pytest.approx(200 / 3)}
    # chid_fc test_public answers 1, 6, 4 (ids 1421, 1422, 1423).
    f = _write(tmp_path / "chidf.json", '{"id": 1421, "answer": 1}\n{"id": 1422, "answer": 6}\n'
                                        '{"id": 1423, "answer": 0}\n')
    assert run_score("chid_fc", few, f, split="test_public") == {"accuracy": pytest.approx(200 / 3)}


def test_unknown_task_and_missing_prediction_file(assets_dir, tmp_path):
    with pytest.raises(ToolkitError, match="Did you mean: rte"):
        run_score("rtee", assets_dir / "glue", tmp_path / "x.tsv")
    with pytest.raises(DataError, match=r"x\.tsv: prediction file not found"):
        run_score("rte", assets_dir / "glue", tmp_path / "x.tsv")
