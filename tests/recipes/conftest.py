"""Fixture tasks and corpus for recipe tests: custom YAML tasks over the tiny vocabulary."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Dict, List

import pytest

POS = "good great fun love best".split()
NEG = "bad terrible boring hate worst".split()
FILL = "the movie film plot story actor music scene was very really quite".split()
TOPICS = {"sport": "team game win point".split(), "tech": "system program information research".split(),
          "news": "government president nation law".split()}


def _sent(rng: random.Random, key_words: List[str], n: int = 6) -> str:
    words = [rng.choice(FILL) for _ in range(n)] + [rng.choice(key_words) for _ in range(2)]
    rng.shuffle(words)
    return " ".join(words)


def write_task(root: Path, name: str, rows: Dict[str, List[List[str]]], labels: List[str],
               two_texts: bool = False, metric="accuracy") -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    cols = ["text", "text2", "label"] if two_texts else ["text", "label"]
    for split, rs in rows.items():
        lines = ["\t".join(cols)] + ["\t".join(r) for r in rs]
        (d / f"{split}.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    yaml_lines = [f"name: {name}", "type: classification", "language: en", "format: tsv", "header: true",
                  "train: train.tsv", "dev: dev.tsv", "text_a: text",
                  f"text_b: {'text2' if two_texts else 'null'}", "label: label",
                  f"labels: [{', '.join(labels)}]", f"metric: {metric}"]
    y = d / f"{name}.yaml"
    y.write_text("\n".join(yaml_lines) + "\n", encoding="utf-8")
    return y


@pytest.fixture(scope="session")
def fixture_tasks(tmp_path_factory) -> Dict[str, Path]:
    """Three small learnable tasks: binary sentiment, 3-way topic, and a sentence pair task."""
    root = tmp_path_factory.mktemp("tasks")
    rng = random.Random(0)

    def senti(n):
        out = []
        for i in range(n):
            lab = "pos" if i % 2 == 0 else "neg"
            out.append([_sent(rng, POS if lab == "pos" else NEG), lab])
        return out

    def topic(n):
        out = []
        for i in range(n):
            lab = list(TOPICS)[i % 3]
            out.append([_sent(rng, TOPICS[lab]), lab])
        return out

    def pair(n):
        out = []
        for i in range(n):
            same = i % 2 == 0
            a = rng.choice(list(TOPICS))
            b = a if same else rng.choice([t for t in TOPICS if t != a])
            out.append([_sent(rng, TOPICS[a]), _sent(rng, TOPICS[b]), "1" if same else "0"])
        return out

    return {
        "senti": write_task(root, "senti", {"train": senti(48), "dev": senti(16)}, ["neg", "pos"]),
        "topic": write_task(root, "topic", {"train": topic(36), "dev": topic(15)}, ["news", "sport", "tech"]),
        "pair": write_task(root, "pair", {"train": pair(40), "dev": pair(16)}, ["0", "1"], two_texts=True,
                           metric="[f1, accuracy]"),
    }


@pytest.fixture(scope="session")
def fixture_corpus(tmp_path_factory) -> Path:
    """Four plain-text shards of documents (blank-line separated) over the tiny vocabulary."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(1)
    words = POS + NEG + FILL + [w for ws in TOPICS.values() for w in ws]
    for s in range(4):
        docs = []
        for d in range(30):
            sents = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 14))) + "." for _ in range(rng.randint(2, 6))]
            docs.append(" ".join(sents))
        (root / f"shard{s}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return root
