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
FEWCLUE_DIR = Path(__file__).resolve().parents[1] / "assets" / "fewclue"
FEWCLUE = (clue.EPRSTMT, clue.CSLDCP, clue.TNEWSFC, clue.IFLYTEKFC, clue.OCNLIFC, clue.BUSTM, clue.CHIDFC, clue.CSLFC,
           clue.CLUEWSCFC)


def task(cls):
    root = FEWCLUE_DIR if cls in FEWCLUE else CLUE_DIR
    return cls(root / cls.default_dir)


def test_registry_names_and_groups():
    names = set(task_names())
    expected = {"afqmc", "tnews", "iflytek", "cmnli", "ocnli", "cluewsc2020", "csl", "cmrc2018", "chid", "c3",
                "eprstmt", "csldcp", "tnews_fc", "iflytek_fc", "ocnli_fc", "bustm", "chid_fc", "csl_fc", "cluewsc_fc"}
    assert expected <= names
    groups = group_names()
    assert groups["clue"] == ["afqmc", "tnews", "iflytek", "cmnli", "ocnli", "cluewsc2020", "csl", "cmrc2018",
                              "chid", "c3"]
    assert groups["fewclue"] == ["eprstmt", "csldcp", "tnews_fc", "iflytek_fc", "ocnli_fc", "bustm", "chid_fc",
                                 "csl_fc", "cluewsc_fc"]
    # The spellings resolve too.
    from toolkit.tasks import get_task
    assert get_task("TNEWS-FC").name == "tnews_fc" and get_task("CLUEWSC-FC").name == "cluewsc_fc"
    assert {get_task(n).benchmark for n in groups["clue"]} == {"clue"}
    assert {get_task(n).benchmark for n in groups["fewclue"]} == {"fewclue"}


def test_every_task_loads_every_fixture_split():
    for cls in (clue.AFQMC, clue.TNEWS, clue.IFLYTEK, clue.CMNLI, clue.OCNLI, clue.CLUEWSC2020, clue.CSL,
                clue.CMRC2018, clue.CHID, clue.C3) + FEWCLUE:
        t = task(cls)
        assert t.language == "zh"
        assert t.data_dir.is_dir()
        for split in ("train", "dev", "test"):
            assert t.has_split(split), (cls.name, split)
            assert t.load(split), (cls.name, split)


@pytest.mark.parametrize("cls", FEWCLUE, ids=lambda c: c.name)
def test_fewclue_official_layout(cls):
    """train_0..4, train_few_all, dev_0..4, dev_few_all, test_public, test (and unlabeled)."""
    t = task(cls)
    named = [f"train_{k}" for k in range(5)] + ["train_few_all"] + [f"dev_{k}" for k in range(5)]
    named += ["dev_few_all", "test_public", "test"]
    for split in named:
        assert t.split_path(split).name == f"{split}.json"
        examples = t.load(split)
        labels = [e.label for e in examples]
        assert examples and (all(v is None for v in labels) if split == "test" else None not in labels), split
    # train / dev are the merged few-shot sets.
    assert [e.index for e in t.load("train")] == [e.index for e in t.load("train_few_all")]
    assert [e.index for e in t.load("dev")] == [e.index for e in t.load("dev_few_all")]
    assert t.report_splits == (("test_public", "_test_public"),)
    if cls is clue.CLUEWSCFC:
        assert not t.has_split("unlabeled")  # the official CLUEWSC has no unlabeled data
    else:
        assert all(e.label is None for e in t.load("unlabeled"))


def test_fewclue_falls_back_to_partition_0(tmp_path):
    import shutil

    shutil.copytree(FEWCLUE_DIR / "bustm", tmp_path / "bustm")
    (tmp_path / "bustm" / "train_few_all.json").unlink()
    (tmp_path / "bustm" / "dev_few_all.json").unlink()
    t = clue.BUSTM(tmp_path / "bustm")
    assert t.split_path("train").name == "train_0.json" and t.split_path("dev").name == "dev_0.json"
    assert [e.index for e in t.load("train")] == [5, 6]
    for name in ("train_0.json", "train_few_all.json"):
        (tmp_path / "bustm" / name).unlink(missing_ok=True)
    with pytest.raises(DataError, match="'train_few_all.json' or 'train_0.json'"):
        t.load("train")


def test_fewclue_texts_and_ids():
    tn = task(clue.TNEWSFC).load("train")
    assert tn[0].label == "103" and tn[0].text_a == "女排姑娘们又能在赛场上看到了"  # int label 103 in the file
    assert task(clue.TNEWSFC).load("test")[0].index == "1490"  # test ids are strings there: kept as is
    assert [e.index for e in task(clue.IFLYTEKFC).load("train_0")] == [0, 1]  # no id in train: row numbers
    oc = task(clue.OCNLIFC).load("train_0")[0]
    assert (oc.text_a, oc.text_b, oc.label) == ("身上裹一件工厂发的棉大衣,手插在袖筒里", "身上至少一件衣服", "entailment")
    cs = task(clue.CSLFC).load("train_0")[0]
    assert cs.text_a == "水声学，波束形成，成像声呐" and cs.label == "1"
    ws = task(clue.CLUEWSCFC)
    assert [e.index for e in ws.load("train_0")] == [30, 31]  # train rows carry "idx"
    assert [e.index for e in ws.load("test")] == [288, 289, 290]  # test rows carry "id"
    assert ws.load("test")[1].text_a == "穆萨把两个妹妹嫁得远远的，只剩_玉凤_还和[他们]住在一起。"
    assert task(clue.CSLDCP).load("dev_0")[0].text_a == "提出了一种改进的图像分割算法。"


def test_chid_fc_blank_and_answer(tmp_path):
    t = task(clue.CHIDFC)
    assert t.task_type == MULTIPLE_CHOICE and t.num_choices == 7
    ex = t.load("train_0")[0]
    assert ex.context == "比赛打了对手一个[MASK]，让大家都很意外。" and ex.label == 1 and ex.choices[1] == "措手不及"
    assert ex.index == 1421
    assert [e.label for e in t.load("test")] == [None, None, None]
    cands = ["甲", "乙", "丙", "丁", "戊", "己", "庚"]
    (tmp_path / "train_0.json").write_text(
        json.dumps({"id": 1, "candidates": cands, "content": "没有空", "answer": 0}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    with pytest.raises(DataError, match=r"train_0.json:1: field 'content' has no #idiom# blank"):
        clue.CHIDFC(tmp_path).load("train_0")
    (tmp_path / "train_0.json").write_text(
        json.dumps({"id": 1, "candidates": cands, "content": "#idiom#", "answer": 7}, ensure_ascii=False) + "\n",
        encoding="utf-8")
    with pytest.raises(DataError, match=r"train_0.json:1: answer 7 is not a candidate index 0..6"):
        clue.CHIDFC(tmp_path).load("train_0")


def test_label_sets():
    assert clue.TNEWS.labels == ["100", "101", "102", "103", "104", "106", "107", "108", "109", "110", "112",
                                 "113", "114", "115", "116"]
    assert len(clue.IFLYTEK.labels) == 119 and clue.IFLYTEK.labels[-1] == "118"
    assert task(clue.AFQMC).num_labels == 2
    assert task(clue.CMNLI).num_labels == 3
    assert sorted(clue.EPRSTMT.labels) == ["Negative", "Positive"]
    # CSLDCP: the official 67 disciplines, whatever the data folder holds.
    assert clue.CSLDCP(None).num_labels == 67 == len(set(clue.CSLDCP_LABELS))
    assert clue.CSLDCP.labels[0] == "材料科学与工程" and clue.CSLDCP.labels[-2:] == ["地球物理学", "植物保护"]
    assert {e.label for e in task(clue.CSLDCP).load("train")} <= set(clue.CSLDCP_LABELS)
    assert clue.TNEWSFC.labels == clue.TNEWS.labels and clue.IFLYTEKFC.labels == clue.IFLYTEK.labels
    assert clue.OCNLIFC.labels == ["contradiction", "entailment", "neutral"]
    assert clue.CLUEWSCFC.labels == ["false", "true"] and clue.CSLFC.labels == clue.BUSTM.labels == ["0", "1"]


def test_csldcp_label_outside_official_list(tmp_path):
    (tmp_path / "train_0.json").write_text('{"content": "x", "label": "炼金术", "id": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"train_0.json:1: label '炼金术' is not in the label set of task 'csldcp'"):
        clue.CSLDCP(tmp_path).load("train")


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
    (clue.CHID, "chid11_predict.json"), (clue.C3, "c311_predict.json"),
    (clue.EPRSTMT, "eprstmt_predict.json"), (clue.CSLDCP, "csldcp_predict.json"),
    (clue.TNEWSFC, "tnewsf_predict.json"), (clue.IFLYTEKFC, "iflytekf_predict.json"),
    (clue.OCNLIFC, "ocnlif_predict.json"), (clue.BUSTM, "bustm_predict.json"), (clue.CHIDFC, "chidf_predict.json"),
    (clue.CSLFC, "cslf_predict.json"), (clue.CLUEWSCFC, "cluewscf_predict.json"),
], ids=lambda v: v if isinstance(v, str) else v.name)
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


def test_leaderboard_lines_exactly(tmp_path):
    """The written lines equal the leaderboards' sample lines, byte for byte."""
    c3 = task(clue.C3)
    c3.write_predictions(c3.load("test"), [1, 0], tmp_path / "c311_predict.json")
    assert (tmp_path / "c311_predict.json").read_text() == '{"id": 0, "label": 1}\n{"id": 1, "label": 0}\n'
    ch = task(clue.CHIDFC)
    ch.write_predictions(ch.load("test"), [3, 0, 2], tmp_path / "chidf_predict.json")
    assert (tmp_path / "chidf_predict.json").read_text() == (
        '{"id": 4997, "answer": 3}\n{"id": 4998, "answer": 0}\n{"id": 4999, "answer": 2}\n')
    tn = task(clue.TNEWSFC)
    tn.write_predictions(tn.load("test"), ["102", "116", "110"], tmp_path / "tnewsf_predict.json")
    assert (tmp_path / "tnewsf_predict.json").read_text().splitlines()[0] == '{"id": "1490", "label": "102"}'
    cs = task(clue.CSLDCP)
    cs.write_predictions(cs.load("test"), ["力学", "中国语言文学", "植物保护"], tmp_path / "csldcp_predict.json")
    assert (tmp_path / "csldcp_predict.json").read_text(encoding="utf-8").splitlines()[2] == \
        '{"id": 2, "label": "植物保护"}'


def test_reads_hand_written_leaderboard_files(tmp_path):
    # Key order and spacing as other tools write them (ocnlif: label first, no spaces).
    oc = task(clue.OCNLIFC)
    f = tmp_path / "ocnlif_predict.json"
    f.write_text('{"label":"neutral","id":0}\n{"label":"contradiction","id":1}\n{"label":"neutral","id":2}\n')
    assert oc.read_predictions(f, oc.load("test")) == ["neutral", "contradiction", "neutral"]
    ws = task(clue.CLUEWSCFC)
    f = tmp_path / "cluewscf_predict.json"
    f.write_text('{"id": 290, "label": "true"}\n{"id": 288, "label": "false"}\n{"id": 289, "label": "false"}\n')
    assert ws.read_predictions(f, ws.load("test")) == ["false", "false", "true"]  # aligned by id
    ch = task(clue.CHIDFC)
    f = tmp_path / "chidf_predict.json"
    f.write_text('{"id": 4997, "answer": 6}\n{"id": 4998, "answer": 0}\n{"id": 4999, "label": 1}\n')
    with pytest.raises(DataError, match=r"chidf_predict.json:3: missing field 'answer'"):
        ch.read_predictions(f, ch.load("test"))
    f.write_text('{"id": 4997, "answer": 6}\n{"id": 4998, "answer": 0}\n{"id": 4999, "answer": "1"}\n')
    with pytest.raises(DataError, match="candidate indices"):
        ch.read_predictions(f, ch.load("test"))


def test_chid_prefers_the_clue_1_1_test_file(tmp_path):
    import shutil

    shutil.copytree(CLUE_DIR / "chid_public", tmp_path / "chid_public")
    t = clue.CHID(tmp_path / "chid_public")
    assert t.split_path("test").name == "test.json"
    row = {"candidates": [f"成语{i}" for i in range(10)], "content": ["他#idiom300000#。"]}
    (tmp_path / "chid_public" / "test1.1.json").write_text(json.dumps(row, ensure_ascii=False) + "\n",
                                                            encoding="utf-8")
    assert t.split_path("test").name == "test1.1.json"
    assert [e.guid for e in t.load("test")] == ["#idiom300000#"]
