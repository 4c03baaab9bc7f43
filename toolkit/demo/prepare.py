"""Turn registry-package data into the toolkit's ordinary formats for the demo pipeline.

``prepare_english(out_dir)`` (and :func:`toolkit.demo.chinese.prepare_chinese`, whose tasks live
in that module) write, under ``out_dir``::

    tasks/<name>/<name>.yaml        custom task files (schema: toolkit/tasks/custom.py)
    tasks/<name>/train.tsv|jsonl    training split
    tasks/<name>/dev.tsv|jsonl      held-out dev split (stratified by label for classification)
    corpus/shard-00000.txt ...      unlabeled text: one document per blank-line-separated block
    manifest.json                   what was written; paths relative to out_dir (see docs/DATA.md)

Nothing downstream knows where the data came from. Output is a pure function of
(package versions, preset, seed): every random choice draws from a ``random.Random`` seeded
with the seed and the task name. Work happens in ``<out_dir>.partial`` and is renamed into
place at the end, so an interrupted run never leaves a manifest over incomplete files, and a
second call with the same preset and seed returns the existing manifest.
"""
from __future__ import annotations

import bz2
import csv
import html
import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import yaml

from toolkit.demo import resources as res
from toolkit.errors import DataError, ToolkitError

# Bump whenever the written files would change, so existing demo folders are rebuilt.
FORMAT_VERSION = 2
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Preset:
    """Sizes of one demo preset. ``None`` means "everything available"."""

    train_size: Optional[int]   # training rows per task
    dev_size: Optional[int]     # dev rows per task; None = 10% of the task's data
    corpus_chars: Optional[int]  # characters of unlabeled corpus
    num_shards: int


PRESETS: Dict[str, Preset] = {
    "tiny": Preset(train_size=300, dev_size=100, corpus_chars=300_000, num_shards=4),
    "default": Preset(train_size=1800, dev_size=400, corpus_chars=2_500_000, num_shards=8),
    "large": Preset(train_size=None, dev_size=None, corpus_chars=None, num_shards=16),
}

# Corpus documents longer than this are cut at a sentence end, so shards stay balanced and a
# 230-speech corpus still gives the streaming loader enough documents to shard.
MAX_DOC_CHARS = 4000


# ----- text cleaning ----------------------------------------------------------------------
_WS = re.compile(r"\s+")
# Control (Cc) and invisible format (Cf: soft hyphen, zero-width, bidi marks, BOM) characters.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u180e"
                        "\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb]")
# In the tweet corpus, runs of 2+ Latin-1 supplement characters, or one wrapped in underscores, are
# mis-decoded emoji and curly quotes; inside a word they were an apostrophe.
_MOJIBAKE = re.compile(r"_?[\u0080-\u00ff][\u0080-\u00ff_]*[\u0080-\u00ff]_?|_[\u0080-\u00ff]_")


def _unmojibake(m: "re.Match[str]") -> str:
    s, i, j = m.string, m.start(), m.end()
    inside_word = 0 < i and j < len(s) and s[i - 1].isalpha() and s[j].isalpha()
    return "'" if inside_word else " "


def clean_text(text: str) -> str:
    """One line of text: whitespace runs (tabs, newlines, ideographic space) -> one space,
    control and zero-width format characters removed, ends stripped."""
    return _WS.sub(" ", _INVISIBLE.sub("", _WS.sub(" ", text))).strip()


def clean_tweet(text: str) -> str:
    """Tweets are latin-1 decoded UTF-8/MacRoman bytes with HTML entities: undo what is cheap."""
    return clean_text(_MOJIBAKE.sub(_unmojibake, html.unescape(text)))


def clean_paragraphs(text: str) -> str:
    """A corpus document: cleaned non-empty paragraphs joined by single newlines."""
    paras = (clean_text(p) for p in re.split(r"[\r\n\u2028\u2029]+", text))
    return "\n".join(p for p in paras if p)


def truncate_words(text: str, max_words: int) -> str:
    words = text.split(" ")
    return text if len(words) <= max_words else " ".join(words[:max_words])


# Zero-width split points after a sentence end (Latin: only when a space follows, so "1.5" and
# "U.S." stay whole) or a line end; the pieces keep their separators and concatenate back.
_SENT_END = re.compile(r"(?<=[.!?][ \t])|(?<=[。！？\n])")


def split_long(doc: str, max_chars: int = MAX_DOC_CHARS) -> List[str]:
    """Cut a document into pieces of at most ~max_chars at sentence ends (a sentence longer
    than that stays whole)."""
    if len(doc) <= max_chars:
        return [doc]
    pieces, cur = [], ""
    for sent in _SENT_END.split(doc):
        if cur.strip() and len(cur) + len(sent) > max_chars:
            pieces.append(cur.strip())
            cur = ""
        cur += sent
    if cur.strip():
        pieces.append(cur.strip())
    return pieces


# ----- splitting --------------------------------------------------------------------------
Row = Dict[str, Any]


def dedup(rows: Iterable[Row], key: str) -> List[Row]:
    """Drop rows whose ``key`` is empty or seen before (first occurrence wins)."""
    seen, out = set(), []
    for row in rows:
        k = row[key] if isinstance(row[key], str) else "\x00".join(row[key])
        if not k or k.lower() in seen:
            continue
        seen.add(k.lower())
        out.append(row)
    return out


def sample(rows: Sequence[Row], n: Optional[int], rng: random.Random,
           label_key: Optional[str] = None) -> Tuple[List[Row], List[Row]]:
    """Pick ``n`` rows (all when None or more than available), stratified by ``label_key``.

    Returns:
        (picked, rest), both in a seeded random order.
    """
    rows = list(rows)
    if n is None or n >= len(rows):
        rng.shuffle(rows)
        return rows, []
    if label_key is None:
        rng.shuffle(rows)
        return rows[:n], rows[n:]
    groups: Dict[str, List[Row]] = {}
    for row in rows:
        groups.setdefault(row[label_key], []).append(row)
    # Largest-remainder quotas keep label proportions and sum to exactly n.
    exact = {lab: n * len(g) / len(rows) for lab, g in groups.items()}
    quota = {lab: int(v) for lab, v in exact.items()}
    for lab in sorted(exact, key=lambda x: (quota[x] - exact[x], x))[: n - sum(quota.values())]:
        quota[lab] += 1
    picked, rest = [], []
    for lab in sorted(groups):
        g = groups[lab]
        rng.shuffle(g)
        picked += g[:quota[lab]]
        rest += g[quota[lab]:]
    rng.shuffle(picked)
    rng.shuffle(rest)
    return picked, rest


def dev_count(n_rows: int, preset: Preset) -> int:
    return preset.dev_size if preset.dev_size is not None else max(1, n_rows // 10)


# ----- task specs -------------------------------------------------------------------------
@dataclass
class BuiltTask:
    """A prepared task before writing: its YAML fields, splits and corpus contribution."""

    name: str
    task_type: str
    language: str
    labels: List[str]
    metrics: List[str]
    in_domain: bool
    train: List[Row]
    dev: List[Row]
    sources: List[str]                      # resource names (for the manifest)
    corpus: Dict[str, List[str]] = field(default_factory=dict)  # corpus source -> documents
    # An extra in-domain task: offered to the multi-task teacher by the "more tasks" variant of
    # the pipeline's ablation, not part of the evaluation suite.
    extra: bool = False


Builder = Callable[[Preset, random.Random, int], BuiltTask]


def _check_rows(rows: List[Row], path: Path, what: str) -> List[Row]:
    if not rows:
        raise DataError(path, f"no usable {what} rows found; the package file looks damaged",
                        hint=f"reinstall with `{res.FETCH_COMMAND}`")
    return rows


def _holdout(rows: List[Row], preset: Preset, rng: random.Random, stratify: bool = True
             ) -> Tuple[List[Row], List[Row], List[Row]]:
    """(train, dev, rest-of-train-pool) from one pool of rows."""
    key = "label" if stratify else None
    dev, pool = sample(rows, dev_count(len(rows), preset), rng, key)
    train, rest = sample(pool, preset.train_size, rng, key)
    return train, dev, rest


def build_rt_sentiment(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """Rotten Tomatoes review snippets, fresh vs rotten; the 1,097 'plot' synopses are dropped
    (they are not opinions, and keeping them would make the task 'is this a synopsis')."""
    path = res.rotten_tomatoes_csv()
    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        rows = [{"text": clean_text(r["text"] or ""), "label": r["category"]} for r in reader
                if r.get("category") in ("fresh", "rotten")]
    rows = _check_rows(dedup(rows, "text"), path, "fresh/rotten")
    train, dev, _ = _holdout(rows, preset, rng)
    return BuiltTask("rt_sentiment", "classification", "en", ["fresh", "rotten"], ["accuracy", "macro_f1"],
                     True, train, dev, ["rotten_tomatoes"])


def build_sms_spam(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """SMS spam collection (87% ham): macro-F1 is the main metric because accuracy of the
    all-ham guess is already 87%."""
    path = res.spam_csv()
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            label, sep, text = line.rstrip("\n").partition("\t")
            if not sep or label not in ("ham", "spam"):
                raise DataError(path, f"expected 'ham|spam<TAB>text', got {line[:40]!r}", line=lineno)
            rows.append({"text": clean_text(text), "label": label})
    rows = _check_rows(dedup(rows, "text"), path, "sms")
    train, dev, _ = _holdout(rows, preset, rng)
    return BuiltTask("sms_spam", "classification", "en", ["ham", "spam"], ["macro_f1", "accuracy"],
                     True, train, dev, ["spam"])


def build_bbc_topic(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """BBC news topic from the title and the first ~60 words; the other articles' full text
    (never the dev articles) feeds the corpus."""
    root = res.bbc_dir()
    labels = sorted(p.name for p in root.iterdir() if p.is_dir())
    rows = []
    for label in labels:
        for path in sorted((root / label).glob("*.txt")):
            raw = html.unescape(path.read_bytes().decode("utf-8", errors="replace"))
            lines = [ln for ln in raw.splitlines() if ln.strip()]
            if len(lines) < 2:
                continue
            title, body = clean_text(lines[0]), clean_paragraphs("\n".join(lines[1:]))
            text = truncate_words(f"{title.rstrip('.')}. {body.replace(chr(10), ' ')}", 60)
            rows.append({"text": text, "label": label, "_title": title, "_doc": f"{title}\n{body}"})
    # Some stories come twice (edited versions, same title): one copy could sit in dev and
    # the other in train or the corpus, so titles are deduplicated as well as texts.
    rows = _check_rows(dedup(dedup(rows, "_title"), "text"), root, "article")
    train, dev, rest = _holdout(rows, preset, rng)
    docs = [r["_doc"] for r in train + rest]
    train, dev = ([{"text": r["text"], "label": r["label"]} for r in split] for split in (train, dev))
    return BuiltTask("bbc_topic", "classification", "en", labels, ["accuracy", "macro_f1"],
                     True, train, dev, ["bbc"], corpus={"bbc": docs})


def build_tweet_sentiment(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """Tweet sentiment (self-driving cars, airlines, ...): an extra in-domain task. Its label
    semantics are the movie reviews' (positive / negative opinion), so it is never used as an
    out-of-domain task."""
    path = res.tweets_csv()
    labels = ["negative", "neutral", "positive"]
    with open(path, encoding="latin-1", newline="") as f:
        rows = [{"text": clean_tweet(r["text"] or ""), "label": r["sentiment"]}
                for r in csv.DictReader(f) if r.get("sentiment") in labels]
    rows = _check_rows(dedup(rows, "text"), path, "tweet")
    train, dev, _ = _holdout(rows, preset, rng)
    return BuiltTask("tweet_sentiment", "classification", "en", labels, ["accuracy", "macro_f1"],
                     True, train, dev, ["tweets"], extra=True)


def build_nyt_sentiment(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """NYT editorial sentences with the mean of human sentiment ratings (VADER's ground truth,
    -4..4): a regression task, an extra in-domain task for the teacher."""
    path = res.resource_path("nyt_editorials")
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.rstrip("\n").split("\t")
            if lineno == 1 and parts[:2] == ["id", "sentiment"]:
                continue
            if len(parts) < 3:
                raise DataError(path, f"expected 'id<TAB>sentiment<TAB>text', got {line[:40]!r}", line=lineno)
            try:
                score = float(parts[1])
            except ValueError:
                raise DataError(path, f"sentiment {parts[1]!r} is not a number", line=lineno) from None
            rows.append({"text": clean_text(" ".join(parts[2:])), "label": f"{score:g}"})
    rows = _check_rows(dedup(rows, "text"), path, "editorial")
    train, dev, _ = _holdout(rows, preset, rng, stratify=False)
    return BuiltTask("nyt_sentiment", "regression", "en", [], ["pearson", "spearman"], True, train, dev,
                     ["nyt_editorials"], extra=True)


# ----- out-of-domain tasks: other sources, other label sets, other kinds --------------------
def build_trec_question(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """TREC question classification (Li and Roth's 5,500 training questions, 6 coarse answer
    types: ABBR, DESC, ENTY, HUM, LOC, NUM). The file joins the 1,000..5,500 training sets;
    deduplication keeps each question once."""
    path = res.resource_path("trec_questions")
    rows = []
    with open(path, encoding="latin-1") as f:
        for lineno, line in enumerate(f, 1):
            label, sep, text = line.strip().partition(" ")
            coarse = label.split(":", 1)[0]
            if not sep or ":" not in label or not coarse.isupper():
                raise DataError(path, f"expected 'COARSE:fine question', got {line[:40]!r}", line=lineno)
            rows.append({"text": clean_text(text), "label": coarse})
    rows = _check_rows(dedup(rows, "text"), path, "question")
    labels = sorted({r["label"] for r in rows})
    train, dev, _ = _holdout(rows, preset, rng)
    return BuiltTask("trec_question", "classification", "en", labels, ["accuracy", "macro_f1"], False, train, dev,
                     ["trec_questions"])


_TAG = re.compile(r"<[^>]+>")


def _jeopardy_rows() -> Tuple[Path, List[Row]]:
    path = res.resource_path("jeopardy")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg}", line=e.lineno, hint=f"reinstall with `{res.FETCH_COMMAND}`") \
            from None
    rows = []
    for item in data:
        if not isinstance(item, dict) or not {"Category", "Question"} <= set(item):
            raise DataError(path, f"expected clues with Category and Question, got {str(item)[:60]!r}")
        clue = clean_text(html.unescape(_TAG.sub(" ", str(item["Question"]))))
        if clue:
            rows.append({"text": clue, "label": clean_text(str(item["Category"]))})
    return path, _check_rows(dedup(rows, "text"), path, "clue")


def build_jeopardy_topic(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """Jeopardy! clues -> their category (40 categories, many-class topic classification; some
    categories overlap, e.g. HISTORY and WORLD HISTORY, as the show's do)."""
    path, rows = _jeopardy_rows()
    labels = sorted({r["label"] for r in rows})
    train, dev, _ = _holdout(rows, preset, rng)
    train, dev = ([{"text": r["text"], "label": r["label"]} for r in split] for split in (train, dev))
    return BuiltTask("jeopardy_topic", "classification", "en", labels, ["accuracy", "macro_f1"], False, train, dev,
                     ["jeopardy"])


def build_jeopardy_category(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """Clue-category matching on Jeopardy! clues, a sentence-pair task: (clue, category name) ->
    yes when the clue was asked under that category. Each clue gives one right pair and one
    wrong pair, whose category shares no word with the clue's own (so WORLD HISTORY is never the
    wrong match for a HISTORY clue). Train and dev clues differ."""
    path, rows = _jeopardy_rows()
    categories = sorted({r["label"] for r in rows})
    words = {c: set(re.findall(r"\w+", c.lower())) for c in categories}
    unlike = {c: [o for o in categories if not words[c] & words[o]] for c in categories}
    alone = [c for c, others in unlike.items() if not others]
    if alone:
        raise DataError(path, f"category {alone[0]!r} shares a word with every other category, so it has no "
                        "wrong match for clue-category pairs")
    half = Preset(None if preset.train_size is None else preset.train_size // 2,
                  None if preset.dev_size is None else preset.dev_size // 2, preset.corpus_chars, preset.num_shards)
    train_clues, dev_clues, _ = _holdout(rows, half, rng)

    def pairs(clues: List[Row]) -> List[Row]:
        out = []
        for r in clues:
            out.append({"text": r["text"], "text_b": r["label"], "label": "yes"})
            out.append({"text": r["text"], "text_b": rng.choice(unlike[r["label"]]), "label": "no"})
        rng.shuffle(out)
        return out

    return BuiltTask("jeopardy_category", "classification", "en", ["no", "yes"], ["accuracy", "f1"], False,
                     pairs(train_clues), pairs(dev_clues), ["jeopardy"])


def build_party_stance(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """2012 US party-convention speeches: which party's convention a paragraph (15+ words, cut
    at 80) was spoken at (democrat / republican), a stance / ideology task. Dev paragraphs come
    from held-out speakers, so no speaker is in both splits."""
    path = res.resource_path("convention_speeches")
    by_speaker: Dict[Tuple[str, str], List[str]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for i, r in enumerate(csv.DictReader(f)):
            party = (r.get("party") or "").strip()
            # A few speeches have no speaker name: each is its own group then.
            speaker = (r.get("speaker") or "").strip() or f"speech {i}"
            if party not in ("democrat", "republican"):
                raise DataError(path, f"expected party democrat or republican, got {party!r}", line=i + 2)
            for para in re.split(r"[\r\n]+", r.get("text") or ""):
                para = clean_text(para)
                if len(para.split()) >= 15:
                    by_speaker.setdefault((party, speaker), []).append(truncate_words(para, 80))
    if not by_speaker:
        raise DataError(path, "no speeches found", hint=f"reinstall with `{res.FETCH_COMMAND}`")
    total = sum(len(v) for v in by_speaker.values())
    want_dev = dev_count(total, preset)
    dev, pool = [], []
    for party in ("democrat", "republican"):
        speakers = sorted(k for k in by_speaker if k[0] == party)
        rng.shuffle(speakers)
        share = sum(len(by_speaker[k]) for k in speakers) / total
        quota, got = round(want_dev * share), 0
        for k in speakers:
            rows = [{"text": t, "label": party} for t in by_speaker[k]]
            if got < quota:
                dev += rows
                got += len(rows)
            else:
                pool += rows
    dev = dedup(dev, "text")
    dev_keys = {r["text"].lower() for r in dev}
    pool = [r for r in dedup(pool, "text") if r["text"].lower() not in dev_keys]
    train, _ = sample(pool, preset.train_size, rng, "label")
    rng.shuffle(dev)
    return BuiltTask("party_stance", "classification", "en", ["democrat", "republican"], ["macro_f1", "accuracy"],
                     False, train, dev, ["convention_speeches"])


# ----- corpus -----------------------------------------------------------------------------
def sotu_docs() -> List[str]:
    """State of the Union speeches, one document each (cut later by split_long)."""
    root = res.sotu_dir()
    docs = []
    for path in sorted(root.glob("*.json")):
        try:
            text = json.loads(path.read_text(encoding="utf-8"))["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(path, f"not a SOTU speech JSON with a 'text' field ({e})",
                            hint=f"re-fetch with `{res.FETCH_COMMAND}`") from None
        doc = clean_paragraphs(text)
        if doc:
            docs.append(doc)
    if not docs:
        raise DataError(root, "no speeches (*.json) found", hint=f"re-fetch with `{res.FETCH_COMMAND}`")
    return docs


def select_corpus(sources: Dict[str, List[str]], weights: Dict[str, float], budget: Optional[int],
                  rng: random.Random) -> List[str]:
    """Documents for the corpus: each source gets ``weight * budget`` characters (all when the
    budget is None); long documents are cut first. Returns documents in seeded random order."""
    picked: List[str] = []
    for name in sorted(sources):
        docs = [p for d in sources[name] for p in split_long(d)]
        rng.shuffle(docs)
        if budget is None:
            picked += docs
            continue
        quota, used = weights[name] * budget, 0
        for d in docs:
            if used >= quota:
                break
            picked.append(d)
            used += len(d)
    rng.shuffle(picked)
    return picked


def write_corpus(docs: List[str], out: Path, num_shards: int) -> Dict[str, Any]:
    """Deal documents round-robin into ``shard-NNNNN.txt`` files (blank line between docs)."""
    if not docs:
        raise ToolkitError("the demo corpus came out empty; check the packages with "
                           f"`{res.FETCH_COMMAND}`")
    num_shards = max(1, min(num_shards, len(docs)))
    out.mkdir(parents=True, exist_ok=True)
    for s in range(num_shards):
        shard = docs[s::num_shards]
        (out / f"shard-{s:05d}.txt").write_text("\n\n".join(shard) + "\n", encoding="utf-8")
    return {"glob": f"{out.name}/shard-*.txt", "num_shards": num_shards,
            "num_chars": sum(len(d) for d in docs), "num_docs": len(docs)}


# ----- writing ----------------------------------------------------------------------------
def _write_tsv(rows: List[Row], path: Path) -> None:
    pair = bool(rows) and "text_b" in rows[0]
    with open(path, "w", encoding="utf-8", newline="") as f:
        # Texts are cleaned to one tab-free line, so nothing needs quoting or escaping.
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar=None, quotechar=None,
                       lineterminator="\n")
        w.writerow(["text", "text_b", "label"] if pair else ["text", "label"])
        for r in rows:
            w.writerow([r["text"], r["text_b"], r["label"]] if pair else [r["text"], r["label"]])


def _write_jsonl(rows: List[Row], path: Path) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps({"tokens": r["tokens"], "tags": r["tags"]}, ensure_ascii=False) + "\n")


def write_task(task: BuiltTask, root: Path) -> Dict[str, Any]:
    """Write one task's YAML and split files under ``root/<name>/``; returns its manifest entry."""
    d = root / task.name
    d.mkdir(parents=True, exist_ok=True)
    token = task.task_type == "token_classification"
    ext = "jsonl" if token else "tsv"
    writer = _write_jsonl if token else _write_tsv
    writer(task.train, d / f"train.{ext}")
    writer(task.dev, d / f"dev.{ext}")
    spec = {
        "name": task.name,
        "type": task.task_type,
        "language": task.language,
        "format": ext,
        "header": not token,
        "train": f"train.{ext}",
        "dev": f"dev.{ext}",
        "text_a": "tokens" if token else "text",
        "text_b": "text_b" if task.train and "text_b" in task.train[0] else None,
        "label": "tags" if token else "label",
        "labels": list(task.labels) or None,
        "metric": list(task.metrics),
        "encoding": "utf-8",
    }
    yaml_path = d / f"{task.name}.yaml"
    yaml_path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True, default_flow_style=None),
                         encoding="utf-8")
    return {"name": task.name, "yaml": str(yaml_path.relative_to(root.parent)), "in_domain": task.in_domain,
            "extra": task.extra, "task_type": task.task_type, "train_size": len(task.train),
            "dev_size": len(task.dev), "num_labels": len(task.labels)}


# ----- languages --------------------------------------------------------------------------
@dataclass(frozen=True)
class Language:
    """What one language's demo consists of."""

    code: str
    builders: Tuple[Builder, ...]
    corpus_weights: Dict[str, float]             # corpus source -> share of the char budget
    extra_corpus: Callable[[], Dict[str, List[str]]]  # sources not tied to a task
    teacher: Callable[[], Optional[Path]]
    vocab: Callable[[], Path]
    extra_sources: Tuple[str, ...]


ENGLISH = Language(
    code="en",
    builders=(build_rt_sentiment, build_sms_spam, build_bbc_topic, build_trec_question, build_jeopardy_topic,
              build_jeopardy_category, build_party_stance, build_tweet_sentiment, build_nyt_sentiment),
    corpus_weights={"sotu": 0.7, "bbc": 0.3},
    extra_corpus=lambda: {"sotu": sotu_docs()},
    teacher=res.teacher_dir,
    vocab=res.english_vocab,
    extra_sources=("teacher", "sotu"),
)

#: language code -> "module:attribute" of its :class:`Language` (imported when asked for).
LANGUAGES: Dict[str, str] = {
    "en": "toolkit.demo.prepare:ENGLISH",
    "zh": "toolkit.demo.chinese:CHINESE",
}


def get_language(code: str) -> Language:
    """The :class:`Language` registered for ``code``."""
    import importlib

    if code not in LANGUAGES:
        raise ToolkitError(f"unknown demo language '{code}' (choose one of: {', '.join(LANGUAGES)})")
    module, _, attr = LANGUAGES[code].partition(":")
    return getattr(importlib.import_module(module), attr)


def load_manifest(out_dir: Union[str, Path]) -> Dict[str, Any]:
    """Read ``out_dir/manifest.json`` with task YAML paths and the corpus glob made absolute."""
    out = Path(out_dir)
    path = out / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(path, "no demo manifest here", hint="run prepare_english/prepare_chinese first") from None
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg}", line=e.lineno) from None
    data = dict(data)
    data["tasks"] = [dict(t, yaml=str(out / t["yaml"])) for t in data["tasks"]]
    data["corpus"] = dict(data["corpus"], glob=str(out / data["corpus"]["glob"]))
    return data


def _is_complete(out: Path, code: str, preset: str, seed: int) -> bool:
    try:
        m = load_manifest(out)
    except (DataError, KeyError, TypeError):
        return False
    if (m.get("format"), m.get("language"), m.get("preset"), m.get("seed")) != (FORMAT_VERSION, code, preset, seed):
        return False
    return all(Path(t["yaml"]).is_file() for t in m["tasks"]) and m["corpus"]["num_shards"] > 0


def prepare(code: str, out_dir: Union[str, Path], preset: str = "default", seed: int = 0) -> Dict[str, Any]:
    """Prepare language ``code``'s demo tasks and corpus in ``out_dir`` (see :func:`prepare_language`)."""
    return prepare_language(get_language(code), out_dir, preset, seed)


def prepare_language(lang: Language, out_dir: Union[str, Path], preset: str = "default", seed: int = 0
                     ) -> Dict[str, Any]:
    """Prepare the demo tasks and corpus of ``lang`` in ``out_dir``.

    Args:
        lang: the language's builders, corpus weights and resources.
        out_dir: output folder; created, or replaced when it holds an older demo manifest.
        preset: "tiny", "default" or "large" (see PRESETS).
        seed: seeds every split and sample.

    Returns:
        The manifest with absolute paths (see load_manifest).
    """
    if preset not in PRESETS:
        raise ToolkitError(f"unknown demo preset '{preset}' (choose one of: {', '.join(PRESETS)})")
    code = lang.code
    out = Path(out_dir).resolve()
    if _is_complete(out, code, preset, seed):
        return load_manifest(out)
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ToolkitError(f"{out} exists and is not a demo data folder (no {MANIFEST}); "
                           "choose an empty or new output folder")
    cfg = PRESETS[preset]
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    entries, corpus_sources, source_names = [], lang.extra_corpus(), list(lang.extra_sources)
    for build in lang.builders:
        name = build.__name__[len("build_"):]
        rng = random.Random(f"{seed}:{name}")
        task = build(cfg, rng, seed)
        entries.append(write_task(task, tmp / "tasks"))
        source_names += task.sources
        for src, docs in task.corpus.items():
            corpus_sources.setdefault(src, []).extend(docs)
    docs = select_corpus(corpus_sources, lang.corpus_weights, cfg.corpus_chars, random.Random(f"{seed}:corpus"))
    teacher = lang.teacher()
    manifest = {
        "format": FORMAT_VERSION,
        "language": code,
        "preset": preset,
        "seed": seed,
        "teacher": str(teacher) if teacher is not None else None,
        "vocab": str(lang.vocab()),
        "tasks": entries,
        "corpus": write_corpus(docs, tmp / "corpus", cfg.num_shards),
        "sources": res.sources(source_names),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return load_manifest(out)


def prepare_english(out_dir: Union[str, Path], preset: str = "default", seed: int = 0) -> Dict[str, Any]:
    """English demo: rt_sentiment, sms_spam, bbc_topic (in domain); trec_question,
    jeopardy_topic, jeopardy_category, party_stance (out of domain); tweet_sentiment and
    nyt_sentiment (extra in-domain tasks); SOTU + BBC corpus; all-MiniLM-L6-v2 teacher. See
    prepare()."""
    return prepare("en", out_dir, preset, seed)
