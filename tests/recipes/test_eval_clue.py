"""`toolkit eval --tasks clue,fewclue`: one submission folder and one zip per leaderboard, each
file under the leaderboard's name and in its line format, rows in test-file order."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VOCAB = ROOT / "tokenizers" / "chinese-char-21128" / "vocab.txt"

# CLUE classification: file name -> (fixture test file, allowed labels).
CLUE_LINES = {
    "afqmc_predict.json": ("afqmc_public/test.json", {"0", "1"}),
    "tnews11_predict.json": ("tnews_public/test.json", {"100", "101", "102", "103", "104", "106", "107", "108",
                                                        "109", "110", "112", "113", "114", "115", "116"}),
    "iflytek_predict.json": ("iflytek_public/test.json", {str(i) for i in range(119)}),
    "cmnli_predict.json": ("cmnli_public/test.json", {"entailment", "neutral", "contradiction"}),
    "ocnli_50k_predict.json": ("ocnli_public/test.json", {"entailment", "neutral", "contradiction"}),
    "cluewsc11_predict.json": ("cluewsc2020_public/test.json", {"true", "false"}),
    "csl_predict.json": ("csl_public/test.json", {"0", "1"}),
}
# FewCLUE: file name -> (task folder, value field, allowed values; None = CSLDCP's 67 labels).
FEWCLUE_LINES = {
    "eprstmt_predict.json": ("eprstmt", "label", {"Positive", "Negative"}),
    "csldcp_predict.json": ("csldcp", "label", None),
    "tnewsf_predict.json": ("tnews", "label", set(CLUE_LINES["tnews11_predict.json"][1])),
    "iflytekf_predict.json": ("iflytek", "label", {str(i) for i in range(119)}),
    "ocnlif_predict.json": ("ocnli", "label", {"entailment", "neutral", "contradiction"}),
    "bustm_predict.json": ("bustm", "label", {"0", "1"}),
    "chidf_predict.json": ("chid", "answer", set(range(7))),
    "cslf_predict.json": ("csl", "label", {"0", "1"}),
    "cluewscf_predict.json": ("cluewsc", "label", {"true", "false"}),
}


@pytest.fixture(scope="module")
def tiny_zh_ernie(tmp_path_factory) -> Path:
    import torch
    from transformers import BertTokenizerFast, ErnieConfig, ErnieModel

    d = tmp_path_factory.mktemp("zh_ernie")
    tok = BertTokenizerFast(vocab=str(VOCAB), do_lower_case=True)
    torch.manual_seed(0)
    cfg = ErnieConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=256, use_task_id=True, task_type_vocab_size=3)
    ErnieModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def zh_data(assets_dir, tmp_path_factory) -> Path:
    """One data root holding CLUE's and FewCLUE's official folders side by side."""
    root = tmp_path_factory.mktemp("zh_data")
    for family in ("clue", "fewclue"):
        for d in (assets_dir / family).iterdir():
            (root / d.name).symlink_to(d, target_is_directory=True)
    return root


def _jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _ids(rows, row_key="id"):
    return [r.get(row_key, i) for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def evaluated(tiny_zh_ernie, zh_data, tmp_path_factory):
    from toolkit.recipes.evaluate import EvalConfig, run_eval

    out = tmp_path_factory.mktemp("ev")
    res = run_eval(EvalConfig(model=str(tiny_zh_ernie), tasks=["clue", "fewclue"], data_dir=str(zh_data),
                              output_dir=str(out), max_steps=1, max_seq_length=48))
    return out, res


def test_clue_submission_folder_and_zip(evaluated, zh_data):
    out, res = evaluated
    folder = out / "submissions" / "clue"
    expected = sorted(CLUE_LINES) + ["c311_predict.json", "chid11_predict.json", "cmrc2018_predict.json"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)
    with zipfile.ZipFile(out / "submissions" / "clue.zip") as z:
        assert sorted(z.namelist()) == sorted(expected)
    assert res["submissions"]["clue"]["missing"] == []
    # Classification: JSON lines {"id", "label"}, one per test row, in the test file's order.
    for name, (source, allowed) in CLUE_LINES.items():
        rows = _jsonl(folder / name)
        test = _jsonl(zh_data / source)
        assert [r["id"] for r in rows] == _ids(test), name
        assert all(isinstance(r["label"], str) and r["label"] in allowed for r in rows), name
        keys = {"id", "label", "label_desc"} if name.startswith("tnews") else {"id", "label"}
        assert all(set(r) == keys for r in rows), name
    # C3: JSON lines with the choice index; CHID: one object keyed by blank; CMRC2018: {qid: text}.
    c3 = _jsonl(folder / "c311_predict.json")
    assert [r["id"] for r in c3] == [0, 1] and all(isinstance(r["label"], int) for r in c3)
    chid = json.loads((folder / "chid11_predict.json").read_text())
    assert list(chid) == ["#idiom200000#", "#idiom200001#"] and all(0 <= v < 10 for v in chid.values())
    cmrc = json.loads((folder / "cmrc2018_predict.json").read_text(encoding="utf-8"))
    test_doc = json.loads((zh_data / "cmrc2018_public" / "test.json").read_text(encoding="utf-8"))
    context = test_doc["data"][0]["paragraphs"][0]["context"]
    assert list(cmrc) == ["TEST_0_QUERY_0"] and cmrc["TEST_0_QUERY_0"] in context


def test_fewclue_submission_folder_and_zip(evaluated, zh_data):
    out, res = evaluated
    folder = out / "submissions" / "fewclue"
    assert sorted(p.name for p in folder.iterdir()) == sorted(FEWCLUE_LINES)
    with zipfile.ZipFile(out / "submissions" / "fewclue.zip") as z:
        assert sorted(z.namelist()) == sorted(FEWCLUE_LINES)
    assert res["submissions"]["fewclue"]["missing"] == []
    from toolkit.tasks.clue import CSLDCP_LABELS

    for name, (task_dir, field, allowed) in FEWCLUE_LINES.items():
        rows = _jsonl(folder / name)
        test = _jsonl(zh_data / task_dir / "test.json")
        assert [r["id"] for r in rows] == [t["id"] for t in test], name  # ids as the file has them
        assert all(set(r) == {"id", field} for r in rows), name
        allowed = set(CSLDCP_LABELS) if allowed is None else allowed
        assert all(r[field] in allowed for r in rows), name
    # FewCLUE tasks also report their public test set, never used to pick the run.
    for task in ("eprstmt", "csldcp", "tnews_fc", "iflytek_fc", "ocnli_fc", "bustm", "chid_fc", "csl_fc",
                 "cluewsc_fc"):
        t = res["tasks"][task]
        assert set(t["best"]["metrics"]) == {"accuracy", "accuracy_test_public"}, task
        assert t["columns"] == ["accuracy_test_public"]
    table = (out / "results.md").read_text(encoding="utf-8")
    assert "| task | main metric | score |" in table and "accuracy_test_public" in table


def test_rerun_replaces_the_folder(evaluated, tiny_zh_ernie, zh_data):
    """A second eval into the same folder with fewer tasks ships only its own files."""
    from toolkit.recipes.evaluate import EvalConfig, run_eval

    out, _ = evaluated
    res = run_eval(EvalConfig(model=str(tiny_zh_ernie), tasks=["bustm"], data_dir=str(zh_data),
                              output_dir=str(out / "again"), max_steps=1, max_seq_length=48))
    (out / "again" / "submissions" / "fewclue" / "stale.json").write_text("{}")
    res = run_eval(EvalConfig(model=str(tiny_zh_ernie), tasks=["bustm"], data_dir=str(zh_data),
                              output_dir=str(out / "again"), max_steps=1, max_seq_length=48))
    assert [p.name for p in (out / "again" / "submissions" / "fewclue").iterdir()] == ["bustm_predict.json"]
    assert len(res["submissions"]["fewclue"]["missing"]) == 8
