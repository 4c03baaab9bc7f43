"""Custom YAML tasks: every format and type, schema errors, data errors, prediction files."""
from __future__ import annotations

import json

import pytest

from toolkit.errors import ConfigError, DataError, ToolkitError
from toolkit.tasks import get_task, load_custom_task


@pytest.fixture()
def custom_dir(assets_dir):
    return assets_dir / "custom"


def test_tsv_classification_with_ids(custom_dir):
    task = get_task(str(custom_dir / "sentiment.yaml"))
    assert task.name == "sentiment" and task.labels == ["neg", "pos"] and task.num_labels == 2
    assert task.metrics == ("accuracy", "f1", "macro_f1") and task.main_metric == "accuracy"
    dev = task.load("dev")
    assert [e.index for e in dev] == ["d0", "d1", "d2", "d3", "d4"] and dev[1].label == "neg"
    test = task.load("test")
    assert [e.label for e in test] == [None, None] and test[1].text_a == "boring"
    assert task.eval_splits == ("dev",) and task.test_splits == ("test",)


def test_csv_without_header_regression(custom_dir):
    task = load_custom_task(custom_dir / "similarity.yaml")
    assert task.task_type == "regression" and task.labels is None and task.metrics == ("pearson", "spearman")
    train = task.load("train")
    assert train[0].text_b == "a cat sat, on the mat" and train[0].label == 4.5
    dev = task.load("dev")
    assert dev[1].text_a == 'the "blue" house' and [e.label for e in dev] == [4.0, 2.5, 0.0]


def test_jsonl_labels_default_to_sorted_train_labels(custom_dir):
    task = get_task(str(custom_dir / "topic.yaml"))
    assert task.labels == ["spam", "sport", "tech"]
    dev = task.load("dev")
    assert [e.label for e in dev] == ["spam", "sport", "tech"] and dev[0].index == 0


def test_token_classification(custom_dir):
    task = get_task(str(custom_dir / "ner.yaml"))
    assert task.labels == ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]
    dev = task.load("dev")  # tags given as a whitespace-separated string
    assert dev[1].tokens == ["bob", "smith", "visited", "london"]
    assert dev[1].labels == ["B-PER", "I-PER", "O", "B-LOC"]
    preds = [["O", "O", "O", "B-LOC"], ["B-PER", "O", "O", "B-LOC"]]
    out = task.score(dev, preds)
    # gold entities: LOC, PER(2 tokens), LOC; predicted LOC, PER(1 token), LOC -> 2 of 3; tokens 7/8.
    assert out["seqeval_f1"] == pytest.approx(100 * 2 / 3) and out["accuracy"] == pytest.approx(87.5)


def test_multiple_choice_columns_and_list_field(custom_dir):
    task = get_task(str(custom_dir / "choice.yaml"))
    assert task.num_choices == 3 and task.labels is None
    dev = task.load("dev")
    assert dev[2].choices == ["blue", "green", "red"] and dev[2].label == 2 and dev[2].question == "what color"
    assert task.score(dev, [1, 1, 1])["accuracy"] == pytest.approx(100 / 3)
    lst = get_task(str(custom_dir / "choice_list.yaml"))
    ex = lst.load("dev")
    assert ex[1].choices == ["four", "one", "ten"] and ex[0].label == 1 and ex[0].question == ""


def test_f1_positive_class_is_second_label(custom_dir):
    task = get_task(str(custom_dir / "sentiment.yaml"))
    dev = task.load("dev")  # gold pos neg pos neg pos
    out = task.score(dev, ["pos", "pos", "neg", "neg", "pos"])
    # positive "pos": TP 2, FP 1, FN 1 -> 66.67; accuracy 3/5.
    assert out["f1"] == pytest.approx(100 * 2 / 3) and out["accuracy"] == pytest.approx(60.0)


def _write(tmp_path, yaml_text, files):
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    y = tmp_path / "task.yaml"
    y.write_text(yaml_text, encoding="utf-8")
    return y


BASE = "name: t\ntype: classification\ntrain: train.tsv\ndev: dev.tsv\ntext_a: s\nlabel: l\n"
TRAIN = "s\tl\na\tx\nb\ty\n"


@pytest.mark.parametrize("yaml_text, field, message", [
    ("type: classification\ntrain: a.tsv\ntext_a: s\nlabel: l\n", "name", "is required"),
    (BASE.replace("name: t", "name: MyTask"), "name", "lower-case"),
    (BASE.replace("classification", "ranking"), "type", "must be one of"),
    (BASE + "colour: red\n", "colour", "unknown field"),
    (BASE + "metric: acc\n", "metric", "unknown metric 'acc'"),
    (BASE + "header: false\n", "text_a", "0-based integers"),
    (BASE + "choices: [a, b]\n", "choices", "only used by type multiple_choice"),
    (BASE.replace("train: train.tsv\ndev: dev.tsv\n", ""), "train", "at least a train or a dev file"),
    (BASE.replace("train.tsv", "train.dat") + "", "format", "cannot infer the format"),
    (BASE + "encoding: klingon\n", "encoding", "unknown text encoding"),
    (BASE.replace("classification", "regression") + "labels: [a]\n", "labels", "only for classification"),
])
def test_schema_errors_name_file_and_field(tmp_path, yaml_text, field, message):
    y = _write(tmp_path, yaml_text, {})
    with pytest.raises(ConfigError) as e:
        load_custom_task(y)
    assert e.value.field == field and str(y) in str(e.value) and message in str(e.value)


def test_missing_yaml_and_data_files(tmp_path):
    with pytest.raises(DataError, match=r"nope\.yaml: custom task file not found"):
        get_task(str(tmp_path / "nope.yaml"))
    y = _write(tmp_path, BASE, {"train.tsv": TRAIN})
    with pytest.raises(DataError, match=r"dev\.tsv: missing data file"):
        load_custom_task(y).load("dev")


@pytest.mark.parametrize("yaml_extra, files, message", [
    ("", {"train.tsv": TRAIN, "dev.tsv": "s\tl\na\tx\nb\tz\n"}, r"dev\.tsv:3: label 'z' is not in the label set"),
    ("", {"train.tsv": TRAIN, "dev.tsv": "s\tl\na\tx\nb\n"}, r"dev\.tsv:3: row has 1 columns"),
    ("", {"train.tsv": TRAIN, "dev.tsv": "s\tlabel\na\tx\n"}, r"dev\.tsv:1: header has no column 'l'"),
    ("format: jsonl\n", {"train.tsv": '{"s": "a", "l": "x"}\n', "dev.tsv": '{"s": "a", "l": "x"}\n{"s": "b"\n'},
     r"dev\.tsv:2: invalid JSON"),
    ("format: jsonl\n", {"train.tsv": '{"s": "a", "l": "x"}\n', "dev.tsv": '{"s": "a", "l": "x"}\n\n{"s": "b"}\n'},
     r"dev\.tsv:3: missing field 'l'"),
])
def test_data_errors_name_file_and_line(tmp_path, yaml_extra, files, message):
    task = load_custom_task(_write(tmp_path, BASE + yaml_extra, files))
    with pytest.raises(DataError, match=message):
        task.load("dev")


def test_token_and_choice_row_errors(tmp_path):
    y = _write(tmp_path, "name: n\ntype: token_classification\nformat: jsonl\ndev: d.jsonl\n"
               "text_a: w\nlabel: t\nlabels: [O, B-X]\n",
               {"d.jsonl": json.dumps({"w": ["a", "b"], "t": ["O"]}) + "\n"})
    with pytest.raises(DataError, match=r"d\.jsonl:1: 2 tokens but 1 labels"):
        load_custom_task(y).load("dev")
    y = _write(tmp_path, "name: c\ntype: multiple_choice\ndev: d.tsv\ntext_a: c\nchoices: [a, b]\nlabel: y\n",
               {"d.tsv": "c\ta\tb\ty\nctx\tone\ttwo\t2\n"})
    with pytest.raises(DataError, match=r"d\.tsv:2: label 2 is out of range for 2 choices"):
        load_custom_task(y).load("dev")
    # Without a train file the label set must be listed.
    y = _write(tmp_path, "name: c\ntype: classification\ndev: d.tsv\ntext_a: c\nlabel: y\n", {"d.tsv": "c\ty\nq\t1\n"})
    with pytest.raises(ConfigError, match="labels"):
        load_custom_task(y).load("dev")


def test_prediction_files_tsv_and_plain(custom_dir, tmp_path):
    task = get_task(str(custom_dir / "sentiment.yaml"))
    dev = task.load("dev")
    gold = [e.label for e in dev]
    path = tmp_path / task.submission_name("dev")
    task.write_predictions(dev, gold, path)
    assert path.read_text().splitlines()[:2] == ["index\tprediction", "d0\tpos"]
    assert task.read_predictions(path, dev) == gold
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(gold) + "\n\n")
    assert task.read_predictions(plain, dev) == gold
    plain.write_text("\n".join(gold[:3]) + "\n")
    with pytest.raises(DataError, match="3 predictions for 5 examples; the first missing is for index 'd3'"):
        task.read_predictions(plain, dev)
    plain.write_text("\n".join(gold + ["pos"]) + "\n")
    with pytest.raises(DataError, match=r"plain\.txt:6: extra prediction"):
        task.read_predictions(plain, dev)
    path.write_text("index\tprediction\nd0\tpos\nd1\tneg\nd2\tpos\nd4\tpos\n")
    with pytest.raises(DataError, match="missing prediction for index 'd3'"):
        task.read_predictions(path, dev)

    ner = get_task(str(custom_dir / "ner.yaml"))
    ndev = ner.load("dev")
    ner.write_predictions(ndev, [e.labels for e in ndev], tmp_path / "ner.tsv")
    assert ner.read_predictions(tmp_path / "ner.tsv", ndev) == [e.labels for e in ndev]

    choice = get_task(str(custom_dir / "choice.yaml"))
    cdev = choice.load("dev")
    (tmp_path / "c.txt").write_text("1\n0\nx\n")
    with pytest.raises(DataError, match=r"c\.txt:3: prediction 'x' is not a choice index"):
        choice.read_predictions(tmp_path / "c.txt", cdev)
    with pytest.raises(ToolkitError, match="2 predictions for 3 examples"):
        choice.score(cdev, [1, 0])
