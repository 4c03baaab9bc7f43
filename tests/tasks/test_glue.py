"""GLUE loaders on fixtures in the official formats; submission files; metrics."""
from __future__ import annotations

import shutil

import pytest

from toolkit.errors import DataError, ToolkitError
from toolkit.tasks import get_task, resolve_tasks

# task -> {split: rows} of tests/assets/glue
COUNTS = {
    "cola": {"train": 4, "dev": 3, "test": 2},
    "sst2": {"train": 3, "dev": 4, "test": 2},
    "mrpc": {"train": 3, "dev": 4, "test": 2},
    "stsb": {"train": 3, "dev": 5, "test": 2},
    "qqp": {"train": 3, "dev": 5, "test": 2},
    "mnli": {"train": 4, "dev_matched": 3, "dev_mismatched": 2, "test_matched": 1, "test_mismatched": 2},
    "qnli": {"train": 3, "dev": 2, "test": 1},
    "rte": {"train": 2, "dev": 3, "test": 1},
    "wnli": {"train": 2, "dev": 2, "test": 1},
    "ax": {"test": 3},
}


@pytest.fixture()
def glue_dir(assets_dir):
    return assets_dir / "glue"


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_every_split_loads(name, glue_dir):
    task = get_task(name, glue_dir)
    assert set(task.splits) == set(COUNTS[name])
    for split, n in COUNTS[name].items():
        examples = task.load(split)
        assert len(examples) == n, (name, split)
        for i, ex in enumerate(examples):
            assert ex.text_a.strip()
            if split.startswith("test"):
                assert ex.label is None and ex.index == str(i)  # fixtures number test rows 0..n-1
            else:
                assert ex.label is not None and ex.index == i
                if task.labels:
                    assert ex.label in task.labels


def test_fields_read_by_official_layout(glue_dir):
    cola = get_task("cola", glue_dir).load("dev")
    assert cola[1].label == "0" and cola[1].text_a == "The car honked down the road." and cola[1].text_b is None
    # MRPC has a BOM before "Quality" in the official files.
    mrpc = get_task("mrpc", glue_dir).load("train")
    assert mrpc[1].label == "0" and mrpc[1].text_b.startswith("Yucaipa bought")
    stsb = get_task("stsb", glue_dir).load("dev")
    assert [ex.label for ex in stsb] == [5.0, 4.75, 5.0, 2.4, 2.75]
    qqp = get_task("qqp", glue_dir).load("dev")  # unbalanced quotes stay in the text
    assert qqp[4].text_a == 'What is the best "book for a beginner?' and qqp[4].label == "0"
    assert get_task("qqp", glue_dir).load("test")[1].index == "1"
    mnli = get_task("mnli", glue_dir)
    dm = mnli.load("dev_matched")
    assert dm[0].text_b == "Everyone really likes the newest benefits " and dm[1].label == "contradiction"
    assert mnli.load("train")[1].text_a.endswith('if "if they decide')
    qnli = get_task("qnli", glue_dir).load("dev")
    assert qnli[0].text_a.startswith("What came") and qnli[1].label == "not_entailment"


def test_task_attributes():
    mnli = get_task("mnli")
    assert mnli.eval_splits == ("dev_matched", "dev_mismatched") and mnli.eval_suffixes == ("_m", "_mm")
    assert mnli.test_splits == ("test_matched", "test_mismatched")
    assert mnli.submission_name("test_matched") == "MNLI-m.tsv"
    assert mnli.submission_name("test_mismatched") == "MNLI-mm.tsv"
    names = {n: get_task(n).submission_name("test") for n in COUNTS if n != "mnli"}
    assert names == {"cola": "CoLA.tsv", "sst2": "SST-2.tsv", "mrpc": "MRPC.tsv", "stsb": "STS-B.tsv",
                     "qqp": "QQP.tsv", "qnli": "QNLI.tsv", "rte": "RTE.tsv", "wnli": "WNLI.tsv", "ax": "AX.tsv"}
    assert get_task("cola").main_metric == "mcc"
    assert get_task("mrpc").metrics == ("f1", "accuracy") and get_task("mrpc").main_metric == "f1"
    assert get_task("stsb").task_type == "regression" and get_task("stsb").main_metric == "pearson"
    assert get_task("ax").labels == get_task("mnli").labels


def test_resolve_glue_group(glue_dir):
    tasks = resolve_tasks("glue", glue_dir)
    assert [t.name for t in tasks] == ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
    assert tasks[0].data_dir == glue_dir / "CoLA"
    assert get_task("ax", glue_dir).data_dir == glue_dir / "diagnostic"
    # Pointing at a task's own folder works too.
    assert len(get_task("SST-2", glue_dir / "SST-2").load("dev")) == 4


def _copy(glue_dir, tmp_path, folder):
    shutil.copytree(glue_dir / folder, tmp_path / folder)
    return tmp_path / folder


def test_malformed_row_names_file_and_line(glue_dir, tmp_path):
    d = _copy(glue_dir, tmp_path, "CoLA")
    lines = (d / "dev.tsv").read_text().splitlines()
    lines[1] = "gj04\t0"  # too few columns
    (d / "dev.tsv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"dev\.tsv:2: row has 2 columns"):
        get_task("cola", d).load("dev")

    d = _copy(glue_dir, tmp_path, "RTE")
    text = (d / "dev.tsv").read_text().replace("\tentailment\n", "\tentails\n", 1)
    (d / "dev.tsv").write_text(text)
    with pytest.raises(DataError, match=r"dev\.tsv:3: label 'entails' is not in the label set"):
        get_task("rte", d).load("dev")

    d = _copy(glue_dir, tmp_path, "STS-B")
    text = (d / "train.tsv").read_text().replace("\t3.800\n", "\tn/a\n", 1)
    (d / "train.tsv").write_text(text)
    with pytest.raises(DataError, match=r"train\.tsv:3: score 'n/a' is not a number"):
        get_task("stsb", d).load("train")


def test_wrong_header_and_missing_file(glue_dir, tmp_path):
    d = _copy(glue_dir, tmp_path, "QNLI")
    (d / "dev.tsv").write_text("index\tq\tsentence\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(DataError, match=r"dev\.tsv:1: header lacks column 'question'"):
        get_task("qnli", d).load("dev")
    (d / "train.tsv").unlink()
    with pytest.raises(DataError, match=r"QNLI/train\.tsv: missing data file"):
        get_task("qnli", d).load("train")


def test_predictions_round_trip_and_scores(glue_dir, tmp_path):
    mrpc = get_task("mrpc", glue_dir)
    dev = mrpc.load("dev")
    gold = [ex.label for ex in dev]
    path = tmp_path / mrpc.submission_name("dev")
    mrpc.write_predictions(dev, gold, path)
    assert path.read_text().splitlines()[:2] == ["index\tprediction", "0\t1"]
    assert mrpc.read_predictions(path, dev) == gold
    assert mrpc.score(dev, gold) == {"f1": 100.0, "accuracy": 100.0}
    # gold 1 0 0 1, predicted 1 1 0 0: TP 1, FP 1, FN 1 -> F1 50, accuracy 50.
    assert mrpc.score(dev, ["1", "1", "0", "0"]) == {"f1": 50.0, "accuracy": 50.0}

    stsb = get_task("stsb", glue_dir)
    sdev = stsb.load("dev")
    stsb.write_predictions(sdev, [ex.label for ex in sdev], tmp_path / "STS-B.tsv")
    back = stsb.read_predictions(tmp_path / "STS-B.tsv", sdev)
    assert back == [5.0, 4.75, 5.0, 2.4, 2.75]
    scores = stsb.score(sdev, back)
    assert scores["pearson"] == pytest.approx(100.0) and scores["spearman"] == pytest.approx(100.0)

    mnli = get_task("mnli", glue_dir)
    test = mnli.load("test_mismatched")
    mnli.write_predictions(test, ["entailment", "neutral"], tmp_path / "MNLI-mm.tsv")
    assert (tmp_path / "MNLI-mm.tsv").read_text() == "index\tprediction\n0\tentailment\n1\tneutral\n"
    with pytest.raises(ToolkitError, match="no gold labels"):
        mnli.score(test, ["entailment", "neutral"])
    with pytest.raises(ToolkitError, match="not a label"):
        mnli.write_predictions(test, ["entailment", "maybe"], tmp_path / "x.tsv")


@pytest.mark.parametrize("body, message", [
    ("0\t1\n1\t0\n2\t0\n", r"missing prediction for index '3'"),
    ("0\t1\n1\t0\n2\t0\n3\t1\n4\t1\n", r"MRPC\.tsv:6: unknown index '4'"),
    ("0\t1\n1\t0\n1\t0\n", r"MRPC\.tsv:4: duplicate index '1' \(first at line 3\)"),
    ("0\t1\n1\t2\n2\t0\n3\t1\n", r"MRPC\.tsv:3: prediction '2' is not one of the labels"),
    ("", r"bad header ''"),
])
def test_bad_prediction_files(glue_dir, tmp_path, body, message):
    mrpc = get_task("mrpc", glue_dir)
    path = tmp_path / "MRPC.tsv"
    path.write_text(("index\tprediction\n" if body else "\n") + body)
    with pytest.raises(DataError, match=message):
        mrpc.read_predictions(path, mrpc.load("dev"))


def test_writer_refuses_non_finite_regression_values(assets_dir, tmp_path):
    from toolkit.errors import ToolkitError

    stsb = get_task("stsb", assets_dir / "glue")
    test = stsb.load("test")
    with pytest.raises(ToolkitError, match="non-finite prediction nan"):
        stsb.write_predictions(test, [float("nan")] + [1.0] * (len(test) - 1), tmp_path / "STS-B.tsv")
