"""Vocabulary trimming: keep the pieces a corpus and the task data use, slice the embeddings.

A multilingual encoder spends most of its parameters on its vocabulary: multilingual-e5-small
has 250,037 embedding rows of 384 (96M of its 118M parameters), of which a Chinese corpus and
its tasks touch a few percent. :func:`trim_vocabulary` keeps

* every token id that the tokenizer produces on the corpus (tokenized as the distillation
  packer does, sentence by sentence) and on every split of the tasks (tokenized as the jobs do,
  :mod:`toolkit.tasks.features`), used at least ``min_count`` times;
* every special and added token;

and writes a model folder whose tokenizer has only those pieces, in their old order, and
whose word-embedding rows (and a tied MLM decoder and its bias) are the old rows of those ids.

The old pieces keep their scores, so segmentation is unchanged on any text that the kept
pieces cover: a unigram model's best segmentation under the full vocabulary is still the best
among fewer pieces, and WordPiece's greedy longest match never picked a piece that is gone.
Ids map one to one (``kept_ids[new] = old``), so the trimmed model computes exactly what the
untrimmed one did on such text. The unknown-token penalty is kept too (the unigram ``<unk>``
entry carries the old minimum score). Other text falls back to the kept pieces or ``<unk>``.
The trim checks itself: a sample of the texts is tokenized by both tokenizers and must map.

Works on any fast tokenizer whose ``tokenizer.json`` model is ``Unigram`` (SentencePiece) or
``WordPiece``, and on any folder whose weights are safetensors (an encoder, an encoder with an
MLM head, or a multi-task model folder with its heads).
"""
from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

from toolkit.errors import DataError, ToolkitError

PathLike = Union[str, Path]

REPORT = "vocab_trim.json"
# Weight names (suffixes) indexed by token id along their first dimension.
ROW_TENSORS = ("word_embeddings.weight", "predictions.decoder.weight", "lm_head.decoder.weight",
               "predictions.bias", "predictions.decoder.bias", "lm_head.bias", "lm_head.decoder.bias")
# Files rewritten here (or dropped, when they would describe the old vocabulary).
_REWRITTEN = {"config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
              "model.safetensors", "model.safetensors.index.json", REPORT}
_STALE_SUFFIXES = (".model", ".bin")
_BATCH = 512        # sentences per tokenizer call
_VERIFY_TEXTS = 400  # texts re-tokenized by both tokenizers as the self-check


@dataclass
class TrimReport:
    """What :func:`trim_vocabulary` kept (also written as ``vocab_trim.json``)."""

    source: str
    original_size: int          # tokenizer length before
    original_rows: int          # embedding rows before (>= original_size)
    kept: int                   # tokens (and rows) after
    specials: int
    min_count: int
    corpus: List[str] = field(default_factory=list)
    corpus_documents: int = 0
    corpus_tokens: int = 0
    tasks: List[str] = field(default_factory=list)
    task_tokens: int = 0
    unk_in_sources: int = 0     # <unk> tokens already in the untrimmed tokenization
    verified_texts: int = 0
    kept_ids: List[int] = field(default_factory=list)   # new id -> old id


# ----- counting -------------------------------------------------------------------------------
def _batches(texts: Iterable[str], size: int = _BATCH) -> Iterator[List[str]]:
    batch: List[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def corpus_documents(sources: Sequence[str], fmt: str = "auto", text_field: str = "text",
                     doc_separator: str = "blank_line") -> Iterator[str]:
    """Every document of the corpus ``sources`` (globs, files, ``hf:`` specs), as the corpus
    stream reads them."""
    from toolkit.data.sources import READERS, ReadOptions, SkipTracker, resolve_shards, start_cursor

    shards, _ = resolve_shards(list(sources), fmt, strict=False)
    opts = ReadOptions(text_field, doc_separator)
    for shard in shards:
        for text, _ in READERS[shard.kind](shard, opts, start_cursor(), SkipTracker()):
            yield text


def count_corpus(tokenizer: Any, sources: Sequence[str], counts: Counter, samples: List[str], **read: Any
                 ) -> Tuple[int, int]:
    """Add the ids of the corpus (split and tokenized as the packer does) to ``counts``.

    Returns:
        (documents, tokens); a few sentences are appended to ``samples`` for the self-check.
    """
    from toolkit.data.packing import split_sentences

    docs = tokens = 0

    def sentences() -> Iterator[str]:
        nonlocal docs
        for doc in corpus_documents(sources, **read):
            docs += 1
            yield from split_sentences(doc)

    for batch in _batches(sentences()):
        enc = tokenizer(batch, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
                        verbose=False)["input_ids"]
        for ids in enc:
            counts.update(ids)
            tokens += len(ids)
        if len(samples) < _VERIFY_TEXTS // 2:
            samples.extend(batch[:8])
    return docs, tokens


def _example_texts(ex: Any) -> List[str]:
    """The strings the task encoders hand to the tokenizer (features.py), pre-split words aside."""
    from toolkit.tasks.base import ChoiceExample, SpanExample, TextExample

    if isinstance(ex, TextExample):
        return [t for t in (ex.text_a, ex.text_b) if t]
    if isinstance(ex, SpanExample):
        return [ex.question.lstrip(), ex.context]
    if isinstance(ex, ChoiceExample):
        return [ex.context, *[f"{ex.question} {c}".strip() if ex.question else c for c in ex.choices]]
    return []


def count_tasks(tokenizer: Any, tasks: Sequence[Any], counts: Counter, samples: List[str]) -> int:
    """Add the ids of every available split of ``tasks`` to ``counts``; returns the token count."""
    from toolkit.tasks.base import TokenExample
    from toolkit.tasks.features import word_encoder

    words_tok, prepare = word_encoder(tokenizer)
    total = 0
    for task in tasks:
        for split in task.splits:
            if not task.has_split(split):
                continue
            examples = task.load(split)
            words = [prepare(list(ex.tokens)) for ex in examples if isinstance(ex, TokenExample)]
            for batch in _batches(words, 64):
                for ids in words_tok(batch, is_split_into_words=True, add_special_tokens=False)["input_ids"]:
                    counts.update(ids)
                    total += len(ids)
            texts = [t for ex in examples for t in _example_texts(ex)]
            for batch in _batches(texts):
                for ids in tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]:
                    counts.update(ids)
                    total += len(ids)
            if len(samples) < _VERIFY_TEXTS:
                samples.extend(texts[:4])
    return total


# ----- rewriting the tokenizer ------------------------------------------------------------------
def _remap_processor(node: Any, new_id: Dict[int, int]) -> Any:
    """Special-token ids inside a ``post_processor`` entry, mapped to the new ids."""
    if isinstance(node, list):
        return [_remap_processor(v, new_id) for v in node]
    if not isinstance(node, dict):
        return node
    out = dict(node)
    kind = node.get("type")
    if kind == "TemplateProcessing":
        out["special_tokens"] = {k: dict(v, ids=[new_id[i] for i in v["ids"]])
                                 for k, v in node.get("special_tokens", {}).items()}
    elif kind in ("RobertaProcessing", "BertProcessing"):
        for key in ("sep", "cls"):
            if key in node:
                out[key] = [node[key][0], new_id[node[key][1]]]
    elif kind == "Sequence":
        out["processors"] = [_remap_processor(p, new_id) for p in node.get("processors", [])]
    return out


def trim_tokenizer_json(data: Dict[str, Any], kept_ids: Sequence[int]) -> Dict[str, Any]:
    """A ``tokenizer.json`` (as a dict) with only ``kept_ids``, renumbered in their old order.

    Raises:
        ToolkitError: a model type other than Unigram or WordPiece, or a special id not kept.
    """
    new_id = {old: new for new, old in enumerate(kept_ids)}
    out = dict(data)
    model = dict(data["model"])
    kind = model.get("type")
    if kind == "Unigram":
        vocab = model["vocab"]
        old_min = min(float(s) for _, s in vocab)
        unk = model.get("unk_id")
        new_vocab = [[vocab[i][0], float(vocab[i][1])] for i in kept_ids]
        if unk is not None:
            if unk not in new_id:
                raise ToolkitError("the unknown token must be kept")
            # tokenizers scores an unknown character min(score) - 10: pin the old minimum
            new_vocab[new_id[unk]][1] = min(new_vocab[new_id[unk]][1], old_min)
            model["unk_id"] = new_id[unk]
        model["vocab"] = new_vocab
    elif kind == "WordPiece":
        old = {int(i): t for t, i in model["vocab"].items()}
        model["vocab"] = {old[i]: new_id[i] for i in kept_ids}
        if model.get("unk_token") not in model["vocab"]:
            raise ToolkitError(f"the unknown token {model.get('unk_token')!r} must be kept")
    else:
        raise ToolkitError(f"cannot trim a {kind} tokenizer: only Unigram (SentencePiece) and WordPiece "
                           f"vocabularies keep their segmentation when pieces are removed")
    out["model"] = model
    added = []
    for tok in data.get("added_tokens") or []:
        if tok["id"] not in new_id:
            raise ToolkitError(f"added token {tok['content']!r} (id {tok['id']}) was not kept")
        added.append(dict(tok, id=new_id[tok["id"]]))
    out["added_tokens"] = added
    if data.get("post_processor") is not None:
        out["post_processor"] = _remap_processor(data["post_processor"], new_id)
    return out


# ----- rewriting the weights ---------------------------------------------------------------------
def _weight_files(src: Path) -> List[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [src / f for f in files]
    single = src / "model.safetensors"
    if not single.is_file():
        raise DataError(single, "no safetensors weights", hint="save the model with save_pretrained (safetensors)")
    return [single]


def slice_rows(state: Dict[str, Any], kept_ids: Sequence[int], rows: int) -> List[str]:
    """Replace the token-indexed tensors of ``state`` by their ``kept_ids`` rows; returns their names."""
    import torch

    index = torch.as_tensor(list(kept_ids), dtype=torch.long)
    done = []
    for name, t in list(state.items()):
        if name.endswith(ROW_TENSORS):
            if t.shape[0] != rows:
                raise ToolkitError(f"tensor {name} has {t.shape[0]} rows but config.json says vocab_size={rows}")
            state[name] = t.index_select(0, index).contiguous()
            done.append(name)
    if not any(n.endswith("word_embeddings.weight") for n in done):
        raise ToolkitError("no word_embeddings.weight in the checkpoint: not a BERT/ERNIE-style encoder")
    return done


# ----- the whole job ------------------------------------------------------------------------------
def trim_vocabulary(model_dir: PathLike, out_dir: PathLike, corpus: Sequence[str] = (),
                    tasks: Sequence[str] = (), data_dir: Optional[PathLike] = None, min_count: int = 1,
                    corpus_format: str = "auto", text_field: str = "text",
                    doc_separator: str = "blank_line") -> TrimReport:
    """Write ``model_dir`` with its vocabulary trimmed to what ``corpus`` and ``tasks`` use.

    Args:
        model_dir: a ``save_pretrained`` folder with a fast tokenizer (``tokenizer.json``).
        out_dir: the trimmed folder (written beside it as ``<out_dir>.partial``, then renamed);
            an existing earlier trim there is replaced, any other non-empty folder refused.
        corpus: corpus sources as ``corpus.sources`` of a distill job takes them.
        tasks: task names, groups or custom task YAML paths (every split found is read).
        data_dir: data root of registered tasks.
        min_count: drop pieces used fewer times than this (1 keeps every used piece).
        corpus_format, text_field, doc_separator: how to read the corpus (as ``corpus.*``).

    Returns:
        a :class:`TrimReport`.
    """
    from safetensors.torch import load_file, save_file

    from toolkit.models.encoder import load_tokenizer
    from toolkit.tasks import resolve_tasks

    src, out = Path(model_dir), Path(out_dir)
    if min_count < 1:
        raise ToolkitError(f"min_count must be >= 1, got {min_count}")
    if not corpus and not tasks:
        raise ToolkitError("give a corpus and/or tasks: the vocabulary is trimmed to what they use")
    if out.exists() and any(out.iterdir()) and not (out / REPORT).is_file():
        raise ToolkitError(f"{out} exists and is not a trimmed model folder (no {REPORT}); choose a new folder")
    if not (src / "tokenizer.json").is_file():
        raise DataError(src / "tokenizer.json", "missing: trimming rewrites a fast tokenizer's tokenizer.json")
    cfg_path = src / "config.json"
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(cfg_path, "missing: not a save_pretrained model folder") from None
    rows = int(config["vocab_size"])
    tokenizer = load_tokenizer(src)
    if len(tokenizer) > rows:
        raise DataError(src, f"tokenizer has {len(tokenizer)} ids but the model only {rows} rows")

    counts: Counter = Counter()
    samples: List[str] = []
    report = TrimReport(source=str(src), original_size=len(tokenizer), original_rows=rows, kept=0, specials=0,
                        min_count=min_count, corpus=list(corpus), tasks=[str(t) for t in tasks])
    if corpus:
        report.corpus_documents, report.corpus_tokens = count_corpus(
            tokenizer, corpus, counts, samples, fmt=corpus_format, text_field=text_field, doc_separator=doc_separator)
        if not report.corpus_tokens:
            raise DataError(", ".join(corpus), "the corpus produced no tokens")
    if tasks:
        report.task_tokens = count_tasks(tokenizer, resolve_tasks(list(tasks), data_dir), counts, samples)
    data = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    specials = set(tokenizer.all_special_ids) | {int(t["id"]) for t in data.get("added_tokens") or []}
    if tokenizer.unk_token_id is not None:
        specials.add(tokenizer.unk_token_id)
        report.unk_in_sources = int(counts.get(tokenizer.unk_token_id, 0))
    kept = sorted({i for i, c in counts.items() if c >= min_count} | specials)
    report.kept, report.specials, report.kept_ids = len(kept), len(specials), kept

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    new_json = trim_tokenizer_json(data, kept)
    (tmp / "tokenizer.json").write_text(json.dumps(new_json, ensure_ascii=False), encoding="utf-8")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            tk = json.loads((src / name).read_text(encoding="utf-8"))
            tk.pop("added_tokens_decoder", None)   # keyed by old ids; tokenizer.json has them
            (tmp / name).write_text(json.dumps(tk, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if new_json["model"]["type"] == "WordPiece" and (src / "vocab.txt").is_file():
        by_id = sorted(new_json["model"]["vocab"].items(), key=lambda kv: kv[1])
        (tmp / "vocab.txt").write_text("".join(t + "\n" for t, _ in by_id), encoding="utf-8")

    new_id = {old: new for new, old in enumerate(kept)}
    state: Dict[str, Any] = {}
    for f in _weight_files(src):
        state.update(load_file(str(f)))
    slice_rows(state, kept, rows)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config["vocab_size"] = len(kept)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id"):
        if isinstance(config.get(key), int) and config[key] in new_id:
            config[key] = new_id[config[key]]
        elif isinstance(config.get(key), int):
            config[key] = None
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for f in src.iterdir():
        if f.is_file() and f.name not in _REWRITTEN and not f.name.startswith("model-") \
                and not f.name.endswith(_STALE_SUFFIXES):
            shutil.copy2(f, tmp / f.name)

    report.verified_texts = _verify(tokenizer, load_tokenizer(tmp), samples, new_id, min_count)
    write_report(report, tmp / REPORT)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return report


def write_report(report: TrimReport, path: Path) -> None:
    """``vocab_trim.json``: the fields one per line, ``kept_ids`` on one line."""
    d = asdict(report)
    ids = d.pop("kept_ids")
    path.write_text(json.dumps(d, indent=2, ensure_ascii=False)[:-2] + f',\n  "kept_ids": {json.dumps(ids)}\n}}\n',
                    encoding="utf-8")


def read_report(model_dir: PathLike) -> TrimReport:
    """The :class:`TrimReport` of a trimmed folder."""
    path = Path(model_dir) / REPORT
    try:
        return TrimReport(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, json.JSONDecodeError, TypeError) as e:
        raise DataError(path, f"not a vocabulary-trim report ({e})") from None


def _verify(old: Any, new: Any, texts: Sequence[str], new_id: Dict[int, int], min_count: int) -> int:
    """Both tokenizers on ``texts``: the ids must map one to one (texts the kept pieces cover)."""
    if len(new) != len(new_id):
        raise ToolkitError(f"trimmed tokenizer has {len(new)} ids, expected {len(new_id)}")
    checked = 0
    for text in texts[:_VERIFY_TEXTS]:
        a = old(text)["input_ids"]
        if min_count > 1 and any(i not in new_id for i in a):
            continue
        b = new(text)["input_ids"]
        if [new_id.get(i, -1) for i in a] != b:
            raise ToolkitError(f"the trimmed tokenizer segments {text[:60]!r} differently; please report this")
        checked += 1
    return checked
