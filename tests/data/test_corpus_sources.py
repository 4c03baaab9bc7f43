"""Corpus sources: each format, globs, resumable cursors, bad input skipped/counted or strict."""
from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path
from typing import List, Tuple

import pytest

from corpus_testlib import count_ids, doc_text, expected_counts, write_text
from toolkit.data import CorpusConfig, StatefulLoader, StreamingCorpus
from toolkit.data.sources import READERS, ReadOptions, SkipTracker, resolve_shards, start_cursor
from toolkit.errors import DataError


def _read_all(corpus: StreamingCorpus, batch_size: int = 4, num_workers: int = 0) -> StatefulLoader:
    loader = StatefulLoader(corpus, batch_size, num_workers=num_workers)
    loader.collected = list(loader)  # type: ignore[attr-defined]
    return loader


def _cfg(sources, **kw) -> CorpusConfig:
    base = dict(seq_length=32, shuffle_buffer=3, epochs=1, num_workers=0, short_seq_prob=0.0)
    base.update(kw)
    return CorpusConfig(sources=[str(s) for s in sources], **base)


def _write_jsonl(path: Path, ids: List[int], field: str = "text") -> Path:
    lines = "".join(json.dumps({field: doc_text(k), "id": k}) + "\n" for k in ids)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(lines)
    else:
        path.write_text(lines, encoding="utf-8")
    return path


def _write_parquet(path: Path, ids: List[int], row_group_size: int = 4) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": ids, "body": [doc_text(k) for k in ids]})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _make_source(kind: str, d: Path) -> Tuple[List[str], dict, List[int]]:
    """Sources, extra config and document ids for one format."""
    d.mkdir(parents=True, exist_ok=True)
    ids = list(range(11))
    if kind == "text_blank":
        write_text(d / "a.txt", ids)
        return [str(d / "a.txt")], {}, ids
    if kind == "text_line":
        write_text(d / "a.txt", ids, "line")
        return [str(d / "a.txt")], {"doc_separator": "line"}, ids
    if kind == "jsonl_gz":
        _write_jsonl(d / "a.jsonl.gz", ids, field="content")
        return [str(d / "a.jsonl.gz")], {"text_field": "content"}, ids
    if kind == "parquet":
        _write_parquet(d / "a.parquet", ids)
        return [str(d / "a.parquet")], {"text_field": "body"}, ids
    if kind == "hf":
        _write_jsonl(d / "x.jsonl", ids[:6])
        _write_jsonl(d / "y.jsonl", ids[6:])
        return [f"hf:{d}"], {}, ids
    raise AssertionError(kind)


KINDS = ["text_blank", "text_line", "jsonl_gz", "parquet", "hf"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_format_yields_every_document_once(kind, tmp_path, tok):
    sources, extra, ids = _make_source(kind, tmp_path / kind)
    loader = _read_all(StreamingCorpus(_cfg(sources, **extra), tok))
    assert count_ids(loader.collected, tok) == expected_counts(ids)
    assert loader.stats["documents"] == len(ids)
    assert loader.stats["skipped"] == {}


@pytest.mark.parametrize("kind", KINDS)
def test_reader_resumes_from_cursor(kind, tmp_path, tok):
    sources, extra, _ = _make_source(kind, tmp_path / kind)
    cfg = _cfg(sources, **extra)
    shard = resolve_shards(cfg.sources, cfg.format)[0][0]
    opts = ReadOptions(cfg.text_field, cfg.doc_separator)
    read = READERS[shard.kind]
    full = list(read(shard, opts, start_cursor(), SkipTracker()))
    assert len(full) == 11
    for k in (0, 4, 10):
        rest = list(read(shard, opts, full[k][1], SkipTracker()))
        assert rest == full[k + 1:]


def test_globs_sorted_dedup_and_errors(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.txt", "sub/c.jsonl", "sub/notes.csv"):
        (tmp_path / name).write_text("x\n", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    shards, empty = resolve_shards([str(tmp_path / "*.txt"), str(tmp_path / "a.txt"), str(tmp_path / "**/*.jsonl")])
    assert [Path(s.path).name for s in shards] == ["a.txt", "b.txt", "c.jsonl"]
    assert [s.kind for s in shards] == ["text", "text", "jsonl"]
    assert [Path(e).name for e in empty] == ["empty.txt"]
    # A folder under format auto keeps only known corpus extensions.
    assert [Path(s.path).name for s in resolve_shards([str(tmp_path / "sub")])[0]] == ["c.jsonl"]
    with pytest.raises(DataError, match=r"nomatch/\*\.txt.*matched no files"):
        resolve_shards([str(tmp_path / "nomatch/*.txt")])
    with pytest.raises(DataError, match=r"notes\.csv.*extension"):
        resolve_shards([str(tmp_path / "sub/*")])
    with pytest.raises(DataError, match=r"empty\.txt.*empty"):
        resolve_shards([str(tmp_path / "*.txt")], strict=True)


def _bad_corpus(d: Path) -> None:
    d.mkdir()
    good = [json.dumps({"text": doc_text(k)}) for k in range(6)]
    lines = [good[0], "{broken json", good[1], json.dumps({"body": "no text field"}), good[2],
             json.dumps({"text": 5}), good[3], good[4], "", good[5]]
    (d / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    raw = (doc_text(6, "\n") + "\n\n").encode() + b"\xff\xfe bad bytes\n" + (doc_text(7) + "\n").encode()
    (d / "b.txt").write_bytes(raw)
    (d / "c.txt").write_bytes(b"")


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_lines_skipped_and_counted_once(num_workers, tmp_path, tok, caplog):
    _bad_corpus(tmp_path / "c")
    cfg = _cfg([tmp_path / "c" / "*"], num_workers=num_workers)
    with caplog.at_level(logging.WARNING, logger="toolkit.data.sources"):
        corpus = StreamingCorpus(cfg, tok)
        loader = _read_all(corpus, num_workers=num_workers)
    assert corpus.empty_files and Path(corpus.empty_files[0]).name == "c.txt"
    assert count_ids(loader.collected, tok) == expected_counts(range(8))
    assert loader.stats["skipped"] == {"invalid_json": 1, "missing_field": 2, "invalid_utf8": 1}
    assert loader.stats["empty_files"] == 1
    if num_workers == 0:
        assert "a.jsonl:2: skipped (invalid_json)" in caplog.text
        assert "empty corpus file" in caplog.text


def test_skips_counted_once_when_workers_share_a_file(tmp_path, tok):
    _bad_corpus(tmp_path / "c")
    skipped: dict = {}
    documents = 0
    for rank in range(3):  # one file, 3 ranks: every rank reads it all, keeps every 3rd document
        corpus = StreamingCorpus(_cfg([tmp_path / "c" / "a.jsonl"]), tok, rank=rank, world_size=3)
        stream = corpus.worker_stream(0, 0)
        list(stream)
        documents += stream.stats["documents"]
        for reason, n in stream.stats["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + n
    assert documents == 6
    assert skipped == {"invalid_json": 1, "missing_field": 2}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_strict_raises_with_file_and_line(num_workers, tmp_path, tok):
    _bad_corpus(tmp_path / "c")
    cfg = _cfg([tmp_path / "c" / "a.jsonl"], strict=True, num_workers=num_workers)
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid JSON") as err:
        _read_all(StreamingCorpus(cfg, tok), num_workers=num_workers)
    assert err.value.line == 2 and err.value.path.endswith("a.jsonl")
    cfg = _cfg([tmp_path / "c" / "b.txt"], strict=True)
    with pytest.raises(DataError, match=r"b\.txt:3: line is not valid UTF-8"):
        _read_all(StreamingCorpus(cfg, tok))


def test_parquet_missing_column_and_hf_missing_path(tmp_path, tok):
    _write_parquet(tmp_path / "a.parquet", [1, 2])
    with pytest.raises(DataError, match="no column 'text'.*text_field"):
        _read_all(StreamingCorpus(_cfg([tmp_path / "a.parquet"]), tok))
    with pytest.raises(DataError, match="hf:.*nowhere.*load_dataset failed"):
        _read_all(StreamingCorpus(_cfg([f"hf:{tmp_path / 'nowhere'}"]), tok))


def test_hf_file_glob_with_split(tmp_path, tok):
    _write_jsonl(tmp_path / "p.jsonl", [1, 2, 3])
    loader = _read_all(StreamingCorpus(_cfg([f"hf:{tmp_path}/*.jsonl#train"]), tok))
    assert count_ids(loader.collected, tok) == expected_counts([1, 2, 3])


def test_hf_source_in_loader_workers(tmp_path, tok):
    # datasets re-shards by DataLoader worker on plain iteration; our sharding must stay in charge.
    _write_jsonl(tmp_path / "x.jsonl", list(range(9)))
    with (tmp_path / "x.jsonl").open("a", encoding="utf-8") as f:
        f.write(json.dumps({"other": "no text"}) + "\n")
    loader = _read_all(StreamingCorpus(_cfg([f"hf:{tmp_path}"], num_workers=2), tok), num_workers=2)
    assert count_ids(loader.collected, tok) == expected_counts(range(9))
    assert loader.stats["skipped"] == {"missing_field": 1}
