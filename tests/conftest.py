"""Shared tiny fixtures: a small WordPiece vocabulary and tiny BERT / ERNIE model directories.

Everything is built here from code (no downloads): 2 layers, hidden 32, 4 heads, a vocab of a
few hundred words. Helpers exposed as fixtures so every test module uses the same models.
"""
from __future__ import annotations

import os
import re
import random
from pathlib import Path
from typing import Dict, List

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Triton picks interpreter or compiled mode at its first import, for the whole process; set
# the interpreter before anything (torch included) imports it, on machines without a GPU.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ASSETS = Path(__file__).parent / "assets"

# Under CI=true a skip for want of something .ci/run installs fails (tests/ci_skips.py).
pytest_plugins = ["ci_skips"]

#: Per-test time limits (pytest-timeout): pytest.ini's default, and this for the tests that
#: start processes or run whole pipelines (a hung rendezvous must not stall CI for an hour).
LONG_TIMEOUT_S = 1800
_LONG_MARKERS = ("launcher", "slurm", "slow")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("timeout") is None and any(item.get_closest_marker(m) for m in _LONG_MARKERS):
            item.add_marker(pytest.mark.timeout(LONG_TIMEOUT_S))

_WORDS = (
    "the a an and or but if then of to in on at for with by from as is are was were be been "
    "it this that these those he she they we you i me him her them us my your our their "
    "good bad great terrible movie film plot story actor acting music scene fun boring love hate "
    "yes no not very really quite too so just more most less least best worst "
    "what who where when why how which question answer context paris france capital city river "
    "new york london berlin germany england united states president nation people government "
    "one two three four five six seven eight nine ten hundred thousand year years day days "
    "man woman child children work time world life hand part place case week company system "
    "program number group problem fact money water room mother father night point home state "
    "book eye job word business issue side kind head house service friend power hour game line "
    "end member law car name market team idea body information back parent face others level "
    "office door health person art war history party result change morning reason research girl "
    "guy moment air teacher force education sentence positive negative neutral news sport tech "
    "spam ham free win call now text reply stop cat dog sat mat ran fast slow red blue green"
).split()


def write_vocab(path: Path, extra: tuple = ()) -> Path:
    """Write a BERT-style vocab.txt: specials, a-z chars, ##suffix chars, the word list."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"()-")
    subs = ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    seen, toks = set(), []
    for t in specials + chars + subs + _WORDS + list(extra):
        if t not in seen:
            seen.add(t)
            toks.append(t)
    path.write_text("\n".join(toks) + "\n", encoding="utf-8")
    return path


def make_tokenizer(dirpath: Path):
    from transformers import BertTokenizerFast

    dirpath.mkdir(parents=True, exist_ok=True)
    vocab = write_vocab(dirpath / "vocab.txt")
    # transformers 5.x ignores vocab_file= here (the tokenizer silently keeps only the
    # special tokens); vocab= loads the file.
    tok = BertTokenizerFast(vocab=str(vocab), do_lower_case=True)
    return tok


def make_tiny_model_dir(dirpath: Path, arch: str = "bert", num_layers: int = 2, hidden: int = 32,
                        heads: int = 4, intermediate: int = 64, seed: int = 0) -> Path:
    """Save a random tiny BERT or ERNIE with its tokenizer as a ``save_pretrained`` directory."""
    import torch
    from transformers import BertConfig, BertModel, ErnieConfig, ErnieModel

    torch.manual_seed(seed)
    tok = make_tokenizer(dirpath)
    common = dict(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=num_layers,
                  num_attention_heads=heads, intermediate_size=intermediate,
                  max_position_embeddings=128, type_vocab_size=2)
    if arch == "ernie":
        cfg = ErnieConfig(**common, use_task_id=True, task_type_vocab_size=3)
        model = ErnieModel(cfg)
    else:
        cfg = BertConfig(**common)
        model = BertModel(cfg)
    model.save_pretrained(dirpath, safe_serialization=True)
    tok.save_pretrained(dirpath)
    return dirpath


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny_tok")
    make_tokenizer(d).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tok(tiny_tokenizer_dir):
    """The tiny WordPiece vocabulary above as a fast BERT tokenizer."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab=str(tiny_tokenizer_dir / "vocab.txt"), do_lower_case=True)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """2 layers, hidden 32, 4 heads: the default teacher in tests."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_bert"), "bert", num_layers=2, hidden=32, heads=4)


@pytest.fixture(scope="session")
def tiny_bert4_dir(tmp_path_factory) -> Path:
    """4 layers, hidden 48, 6 heads: a 'bigger' teacher whose sizes differ from the student's."""
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_bert4"), "bert", num_layers=4, hidden=48,
                               heads=6, intermediate=96, seed=1)


@pytest.fixture(scope="session")
def tiny_ernie_dir(tmp_path_factory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny_ernie"), "ernie", num_layers=2, hidden=32, heads=4)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return ASSETS


# ---- fixture tasks and corpus for recipe / launcher tests ----------------------------

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


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
             "CROSS_RANK", "CROSS_SIZE")


REPO_ROOT = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict:
    """os.environ for a child job, without the one-process world that in-process tests set
    up (a stale MASTER_PORT would collide with this process's rendezvous port), with this
    checkout first on PYTHONPATH (children import the toolkit under test, not an installed one)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO_ROOT]
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *paths])
    env.update(extra)
    return env


@pytest.fixture(autouse=True)
def _relation_kl_registry():
    """Each test starts and ends with the same relation-KL registry (a test that registers a toy
    implementation, or sees one fail, must not change what later tests run)."""
    from toolkit.losses import relation_kl

    saved = dict(relation_kl._IMPLS), dict(relation_kl._FAILED)
    yield
    relation_kl._IMPLS.clear()
    relation_kl._IMPLS.update(saved[0])
    relation_kl._FAILED.clear()
    relation_kl._FAILED.update(saved[1])


def launcher_excerpt(text: str, tail: int = 3000, lines_per_rank: int = 60) -> str:
    """What a failed multi-rank launch printed, for an assertion message: the start of each
    rank's first traceback (the launcher interleaves the ranks' output, so the rank that failed
    first is rarely in the tail) and then the output's tail."""
    lines = text.splitlines()
    first: dict = {}
    for i, line in enumerate(lines):
        m = re.match(r"\s*\[rank(\d+)\]:", line)
        if m and m.group(1) not in first:
            first[m.group(1)] = i
    parts = [f"--- rank {r} ---\n" + "\n".join(lines[i:i + lines_per_rank]) for r, i in sorted(first.items())]
    return "\n".join(parts + ["--- tail ---", text[-tail:]])
