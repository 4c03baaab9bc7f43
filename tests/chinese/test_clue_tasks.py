"""CLUE / FewCLUE loaders on the official-format fixtures in tests/assets/clue/."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.errors import DataError, ToolkitError
from toolkit.tasks import clue
from toolkit.tasks.base import CLASSIFICATION, MULTIPLE_CHOICE, SPAN, ChoiceExample, SpanExample, TextExample
from toolkit.tasks.registry import group_names, task_names

CLUE_DIR = Path(__file__).resolve().parents[1] / "assets" / "clue"


def task(cls):
    return cls(CLUE_DIR / cls.default_dir)


def test_registry_names_and_groups():
    names = set(task_names())
    expected = {"afqmc", "tnews", "iflytek", "cmnli", "ocnli", "cluewsc2020", "csl", "cmrc2018", "chid", "c3",
                "eprstmt", "bustm", "csldcp"}
    assert expected <= names
    groups = group_names()
    assert groups["clue"] == ["afqmc", "tnews", "iflytek", "cmnli", "ocnli", "cluewsc2020", "csl", "cmrc2018",
                              "chid", "c3"]
    assert groups["fewclue"] == ["eprstmt", "bustm", "csldcp"]


def test_every_task_loads_every_fixture_split():
    for cls in (clue.AFQMC, clue.TNEWS, clue.IFLYTEK, clue.CMNLI, clue.OCNLI, clue.CLUEWSC2020, clue.CSL,
                clue.CMRC2018, clue.CHID, clue.C3, clue.EPRSTMT, clue.BUSTM, clue.CSLDCP):
        t = task(cls)
        assert t.language == "zh"
        assert (CLUE_DIR / cls.default_dir).is_dir()
        for split in ("train", "dev", "test"):
            assert t.has_split(split), (cls.name, split)
            assert t.load(split), (cls.name, split)


def test_label_sets():
    assert clue.TNEWS.labels == ["100", "101", "102", "103", "104", "106", "107", "108", "109", "110", "112",
                                 "113", "114", "115", "116"]
    assert len(clue.IFLYTEK.labels) == 119 and clue.IFLYTEK.labels[-1] == "118"
    assert task(clue.AFQMC).num_labels == 2
    assert task(clue.CMNLI).num_labels == 3
    assert sorted(clue.EPRSTMT.labels) == ["Negative", "Positive"]
    # CSLDCP's label set comes from train + dev, sorted.
    t = task(clue.CSLDCP)
    assert t.labels == sorted(["材料科学与工程", "中国语言文学", "作物学", "心理学"])
    assert t.num_labels == 4
    assert clue.CSLDCP(None).labels is None


def test_afqmc_pairs_and_test_ids():
    t = task(clue.AFQMC)
    train = t.load("train")
    assert isinstance(train[0], TextExample) and t.task_type == CLASSIFICATION
    assert train[3].text_a == "借呗怎么还款" and train[3].text_b == "借呗如何还钱" and train[3].label == "1"
    assert train[0].index == 0  # no id in train: the row number
    test = t.load("test")
    assert [e.index for e in test] == [0, 1, 2] and all(e.label is None for e in test)


def test_tnews_and_iflytek_single_sentence():
    tn = task(clue.TNEWS).load("train")
    assert tn[0].text_b is None and tn[0].label == "102"
    ifl = task(clue.IFLYTEK).load("train")
    assert [e.label for e in ifl] == ["11", "0", "118"]


def test_nli_drops_dash_rows():
    cm = task(clue.CMNLI)
    train = cm.load("train")
    assert len(train) == 3 and "-" not in {e.label for e in train}
    assert len(cm.load("dev")) == 1
    oc = task(clue.OCNLI)
    assert oc.splits["train"] == "train.50k.json"
    dev = oc.load("dev")
    assert [e.label for e in dev] == ["entailment", "neutral"]
    assert [e.index for e in dev] == [0, 2]  # official ids kept


def test_cluewsc_marks_spans():
    t = task(clue.CLUEWSC2020)
    ex = t.load("train")[0]
    assert ex.text_a.startswith("这时候放在_床_上")
    assert "现在[它]突然响了" in ex.text_a
    assert ex.text_b == "它指的是床吗？" and ex.label == "false"
    # dev fixture has a wrong span1_index (14 instead of 15): the nearest occurrence is used.
    dev = t.load("dev")[0]
    assert "一座_小桥_，[它]横跨" in dev.text_a and dev.label == "true"


def test_cluewsc_span_not_in_text(tmp_path):
    row = {"target": {"span1_text": "猫", "span1_index": 0, "span2_text": "它", "span2_index": 2},
           "label": "true", "text": "小狗说它饿了"}
    (tmp_path / "train.json").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"train.json:1: span1_text '猫' does not occur"):
        clue.CLUEWSC2020(tmp_path).load("train")


def test_csl_keywords_and_abstract():
    ex = task(clue.CSL).load("train")[0]
    assert ex.text_a == "合成孔径雷达，舰船检测，深度学习"
    assert ex.text_b.startswith("针对近年来") and ex.label == "1" and ex.index == 1


def test_cmrc2018_spans():
    t = task(clue.CMRC2018)
    assert t.task_type == SPAN
    train = t.load("train")
    assert isinstance(train[0], SpanExample) and train[0].guid == "TRAIN_186_QUERY_0"
    for ex in train:
        a = ex.answers[0]
        assert ex.context[a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"]
    dev = t.load("dev")
    assert len(dev[0].answers) == 3
    assert t.load("test")[0].answers == []


def test_chid_one_example_per_blank():
    t = task(clue.CHID)
    assert t.task_type == MULTIPLE_CHOICE and t.num_choices == 10
    train = t.load("train")
    assert [e.guid for e in train] == ["#idiom000000#", "#idiom000001#", "#idiom000002#", "#idiom000003#"]
    assert [e.label for e in train] == [2, 1, 3, 7]
    first = train[0]
    assert isinstance(first, ChoiceExample) and len(first.choices) == 10
    assert first.choices[first.label] == "咬文嚼字"
    # The asked blank is [MASK]; the other blank of the same text is [UNK].
    assert first.context == "他读书总是[MASK]，一个字也不放过。后来他做事又总是[UNK]，从不担心。"
    assert train[1].context.endswith("后来他做事又总是[MASK]，从不担心。") and "[UNK]" in train[1].context
    test = t.load("test")
    assert len(test) == 2 and all(e.label is None for e in test)


def test_chid_window_and_missing_answer(tmp_path):
    t = clue.CHID(tmp_path)
    t.window = 3
    cands = [f"成语{i}" for i in range(10)]
    row = {"candidates": cands, "content": ["一二三四五六#idiom000009#七八九十"]}
    (tmp_path / "dev.json").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match="dev_answer.json"):
        t.load("dev")
    (tmp_path / "dev_answer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match=r"dev.json:1: blank #idiom000009# has no answer"):
        t.load("dev")
    (tmp_path / "dev_answer.json").write_text('{"#idiom000009#": 5}', encoding="utf-8")
    (ex,) = t.load("dev")
    assert ex.context == "四五六[MASK]七八九" and ex.label == 5


def test_c3_reads_d_and_m_files_with_variable_choices():
    t = task(clue.C3)
    train = t.load("train")
    assert len(train) == 4  # 3 questions in d-train + 1 in m-train
    assert [len(e.choices) for e in train] == [4, 2, 3, 3]
    assert [e.label for e in train] == [2, 1, 0, 0]
    assert train[0].context.startswith("男：你今天晚上有时间吗") and "\n女：" in train[0].context
    assert t.num_choices is None
    assert len(t.load("dev")) == 2
    test = t.load("test")
    assert [e.index for e in test] == [0, 1] and all(e.label is None for e in test)


def test_c3_answer_not_in_choices(tmp_path):
    doc = [[["上下文"], [{"question": "问？", "choice": ["甲", "乙"], "answer": "丙"}], "x-1"]]
    (tmp_path / "d-train.json").write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError, match="answer '丙' is not one of the choices"):
        clue.C3(tmp_path).load("train")


def test_fewclue_file_choice(tmp_path):
    ep = task(clue.EPRSTMT)
    assert len(ep.load("train")) == 3  # train_few_all.json preferred over train_0.json
    assert len(ep.load("dev")) == 1  # no dev_few_all.json: dev_0.json
    assert ep.load("test_public")[0].label == "Positive"
    bu = task(clue.BUSTM)
    assert [e.label for e in bu.load("train")] == ["1", "0"] and bu.load("train")[0].index == 5
    assert not clue.BUSTM(tmp_path).has_split("train")
    with pytest.raises(DataError, match="train_few_all.json' or 'train_0.json"):
        clue.BUSTM(tmp_path).load("train")


def test_malformed_lines_name_file_and_line(tmp_path):
    (tmp_path / "train.json").write_text('{"sentence1": "a", "sentence2": "b", "label": "0"}\n{oops\n',
                                         encoding="utf-8")
    with pytest.raises(DataError, match=r"train.json:2: invalid JSON"):
        clue.AFQMC(tmp_path).load("train")
    (tmp_path / "train.json").write_text('{"sentence1": "a", "label": "0"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train.json:1: missing field 'sentence2'"):
        clue.AFQMC(tmp_path).load("train")
    (tmp_path / "train.json").write_text('{"sentence1": "a", "sentence2": "b", "label": "7"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train.json:1: label '7' is not in the label set"):
        clue.AFQMC(tmp_path).load("train")
    with pytest.raises(DataError, match="missing data file"):
        clue.AFQMC(tmp_path).load("dev")


def test_score_accuracy():
    t = task(clue.AFQMC)
    dev = t.load("dev")
    assert t.score(dev, ["0", "1"]) == {"accuracy": 100.0}
    assert t.score(dev, ["1", "1"]) == {"accuracy": 50.0}
    with pytest.raises(ToolkitError, match="without gold labels"):
        t.score(t.load("test"), ["0", "0", "0"])
    c3 = task(clue.C3)
    assert c3.score(c3.load("dev"), [1, 0])["accuracy"] == 50.0
    cm = task(clue.CMRC2018)
    dev = cm.load("dev")
    assert cm.score(dev, ["越南"]) == {"em": 100.0, "f1": 100.0, "average": 100.0}


@pytest.mark.parametrize("cls,name", [
    (clue.AFQMC, "afqmc_predict.json"), (clue.TNEWS, "tnews11_predict.json"),
    (clue.IFLYTEK, "iflytek_predict.json"), (clue.OCNLI, "ocnli_50k_predict.json"),
    (clue.CMNLI, "cmnli_predict.json"), (clue.CLUEWSC2020, "cluewsc11_predict.json"),
    (clue.CSL, "csl_predict.json"), (clue.CMRC2018, "cmrc2018_predict.json"),
    (clue.CHID, "chid11_predict.json"), (clue.C3, "c3_predict.json"),
    (clue.EPRSTMT, "eprstmt_predict.json"), (clue.BUSTM, "bustm_predict.json"),
    (clue.CSLDCP, "csldcp_predict.json"),
])
def test_submission_round_trip(tmp_path, cls, name):
    t = task(cls)
    assert t.submission_name("test") == name
    examples = t.load("test")
    if t.task_type == CLASSIFICATION:
        preds = [t.labels[i % len(t.labels)] for i in range(len(examples))]
    elif t.task_type == MULTIPLE_CHOICE:
        preds = [i % len(e.choices) for i, e in enumerate(examples)]
    else:
        preds = ["保禄·若瑟" for _ in examples]
    path = tmp_path / t.submission_name()
    t.write_predictions(examples, preds, path)
    assert t.read_predictions(path, examples) == preds
    # Drop the first example: its id is now missing from the file.
    with pytest.raises(DataError, match="prediction for unknown id"):
        t.read_predictions(path, examples[1:])
    t.write_predictions(examples[1:], preds[1:], path)
    with pytest.raises(DataError, match=rf"{name}: no prediction for id"):
        t.read_predictions(path, examples)


def test_submission_formats(tmp_path):
    tn = task(clue.TNEWS)
    ex = tn.load("test")
    tn.write_predictions(ex, ["102", "116"], tmp_path / "t.json")
    rows = [json.loads(line) for line in (tmp_path / "t.json").read_text(encoding="utf-8").splitlines()]
    assert rows[0] == {"id": 0, "label": "102", "label_desc": "news_entertainment"}
    ch = task(clue.CHID)
    ex = ch.load("test")
    ch.write_predictions(ex, [5, 8], tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == {"#idiom200000#": 5, "#idiom200001#": 8}
    cm = task(clue.CMRC2018)
    ex = cm.load("test")
    cm.write_predictions(ex, ["保禄·若瑟"], tmp_path / "m.json")
    assert json.loads((tmp_path / "m.json").read_text(encoding="utf-8")) == {"TEST_0_QUERY_0": "保禄·若瑟"}
