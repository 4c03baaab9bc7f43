"""Sharding over ranks x workers, epochs, shuffle buffer memory bound, exact resume."""
from __future__ import annotations

import collections
import io
import itertools
import json
from pathlib import Path
from typing import Dict, List

import pytest
import torch

from corpus_testlib import count_ids, expected_counts, write_text
from toolkit.data import CorpusConfig, StreamingCorpus, build_loader, to_plain
from toolkit.data.packing import pad_rows
from toolkit.errors import ConfigError, DataError, ToolkitError


def _cfg(sources, **kw) -> CorpusConfig:
    base = dict(seq_length=32, shuffle_buffer=4, epochs=1, num_workers=0, short_seq_prob=0.3, seed=7)
    base.update(kw)
    return CorpusConfig(sources=[str(s) for s in sources], **base)


def _corpus_files(d: Path, n_files: int, docs_per_file: int) -> List[Path]:
    d.mkdir(parents=True, exist_ok=True)
    return [write_text(d / f"shard{f:02d}.txt", list(range(f * docs_per_file, (f + 1) * docs_per_file)))
            for f in range(n_files)]


def _rank_batches(cfg: CorpusConfig, tok, rank: int, world: int, batch: int = 3) -> List[Dict[str, torch.Tensor]]:
    return list(build_loader(cfg, tok, batch, rank=rank, world_size=world))


@pytest.mark.parametrize("n_files", [1, 3, 6])  # 1 and 3: by document; 6 >= 4 workers: by file
def test_every_document_once_across_2_ranks_x_2_workers(n_files, tmp_path, tok):
    _corpus_files(tmp_path, n_files, 24 // n_files)
    cfg = _cfg([tmp_path / "*.txt"], num_workers=2)
    per_rank = [_rank_batches(cfg, tok, rank, 2) for rank in range(2)]
    assert count_ids(per_rank[0] + per_rank[1], tok) == expected_counts(range(24))
    for batches in per_rank:
        assert batches, "each rank gets data"
        for b in batches:
            assert b["input_ids"].dtype == torch.long and b["input_ids"].shape[1] == 32


def test_all_global_workers_in_process_and_epochs(tmp_path, tok):
    _corpus_files(tmp_path, 3, 7)
    cfg = _cfg([tmp_path / "*.txt"], epochs=3)
    orders = []
    rows = []
    for rank in range(4):  # 4 ranks x 1 in-process worker = 4 global workers over 3 files
        corpus = StreamingCorpus(cfg, tok, rank=rank, world_size=4)
        got = list(corpus.worker_stream(0, 0))
        rows += got
        orders.append([r[0].tolist() for r in got])
    assert count_ids([pad_rows(rows, 32, 0)], tok) == expected_counts(range(21), epochs=3)
    assert len({json.dumps(o) for o in orders}) == 4


def test_file_order_reshuffled_per_epoch(tmp_path, tok):
    _corpus_files(tmp_path, 8, 1)  # one document per file: the document order is the file order
    cfg = _cfg([tmp_path / "*.txt"], epochs=4, shuffle_buffer=0, short_seq_prob=0.0, seq_length=64)
    rows = list(StreamingCorpus(cfg, tok).worker_stream(0, 0))
    assert len(rows) == 4 * 8  # each document fits one sequence
    order = [next(iter(count_ids([pad_rows([r], 64, 0)], tok))) for r in rows]
    epochs = [order[e * 8:(e + 1) * 8] for e in range(4)]
    assert all(sorted(e) == list(range(8)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


def test_shuffle_buffer_bounds_memory(tmp_path, tok):
    _corpus_files(tmp_path, 2, 150)
    cfg = _cfg([tmp_path / "*.txt"], shuffle_buffer=8, seq_length=24)
    stream = StreamingCorpus(cfg, tok).worker_stream(0, 0)
    largest_doc = 0
    seen = 0
    for row in stream:
        if seen == 0:  # the first sample comes after filling the buffer, not after reading the corpus
            assert stream.stats["documents"] <= 8 + 1
        seen += 1
        largest_doc = max(largest_doc, len(stream.pending))
        assert len(stream.buffer) + len(stream.pending) <= 8 + 3  # a document here packs into <= 3 rows
    assert seen == stream.stats["sequences"] and stream.stats["documents"] == 300
    assert stream.stats["peak_buffered"] <= 8 + 3


def test_shuffle_changes_order_but_not_content(tmp_path, tok):
    _corpus_files(tmp_path, 1, 40)
    plain = list(StreamingCorpus(_cfg([tmp_path / "*.txt"], shuffle_buffer=0), tok).worker_stream(0, 0))
    mixed = list(StreamingCorpus(_cfg([tmp_path / "*.txt"], shuffle_buffer=16), tok).worker_stream(0, 0))
    key = [tuple(r[0].tolist()) for r in plain]
    assert key != [tuple(r[0].tolist()) for r in mixed]
    assert sorted(key) == sorted(tuple(r[0].tolist()) for r in mixed)


def _batches_equal(a: List[Dict[str, torch.Tensor]], b: List[Dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize("num_workers,stops,state_every", [(0, [1, 4, 9], 32), (2, [3, 8], 32), (0, [1, 4, 9], 1),
                                                            (0, [4, 9], 3), (2, [3, 8], 2)])
def test_resume_matches_uninterrupted_run(num_workers, stops, state_every, tmp_path, tok):
    # state_every 32: every resume replays from the stream's start; 1: from the last batch's
    # snapshot; 2-3: from an older snapshot plus a replay of the rows handed out since.
    _corpus_files(tmp_path, 3, 9)
    cfg = _cfg([tmp_path / "*.txt"], num_workers=num_workers, epochs=2, shuffle_buffer=5, state_every=state_every)
    full = list(build_loader(cfg, tok, 3))
    assert len(full) > max(stops) + 2
    for k in stops:
        loader = build_loader(cfg, tok, 3)
        head = list(itertools.islice(loader, k))
        state = loader.state_dict()
        if k % 2:   # a checkpoint: tensors, loadable with weights_only
            buf = io.BytesIO()
            torch.save(state, buf)
            buf.seek(0)
            state = torch.load(buf, weights_only=True)
        else:       # lists of ints, as states were saved before they held tensors (and JSON-ready)
            state = json.loads(json.dumps(to_plain(state)))
        resumed = build_loader(cfg, tok, 3)
        resumed.load_state_dict(state)
        tail = list(resumed)
        assert _batches_equal(head + tail, full), f"stopped after {k}"
        assert resumed.stats["sequences"] == sum(len(b["input_ids"]) for b in full)
        assert resumed.stats["tokens"] == sum(int(b["attention_mask"].sum()) for b in full)
    assert count_ids(full, tok) == expected_counts(range(27), epochs=2)


def test_resume_endless_stream_twice(tmp_path, tok):
    _corpus_files(tmp_path, 2, 5)
    cfg = _cfg([tmp_path / "*.txt"], epochs=0, shuffle_buffer=3)
    full = list(itertools.islice(build_loader(cfg, tok, 2), 40))  # several passes over 10 documents
    loader = build_loader(cfg, tok, 2)
    got = list(itertools.islice(loader, 13))
    for stop in (11, 16):
        nxt = build_loader(cfg, tok, 2)
        nxt.load_state_dict(loader.state_dict())
        got += list(itertools.islice(nxt, stop))
        loader = nxt
    assert _batches_equal(got, full)
    assert loader.stats["documents"] > 10


def test_state_size_and_mismatch(tmp_path, tok):
    _corpus_files(tmp_path, 2, 20)
    cfg = _cfg([tmp_path / "*.txt"], shuffle_buffer=6, state_every=1)
    loader = build_loader(cfg, tok, 2)
    next(iter(loader))
    state = loader.state_dict()
    assert state["workers"][0]["skip_rows"] == 0   # state_every=1: a snapshot after every batch
    buffered = state["workers"][0]["base"]["buffer"]
    assert len(buffered["lens"]) == 6 and len(buffered["tokens"]) == sum(buffered["lens"])
    assert isinstance(buffered["tokens"], torch.Tensor) and buffered["tokens"].dtype == torch.uint16
    assert len(json.dumps(to_plain(state))) < 6 * 32 * 8 + 4000
    buf = io.BytesIO()
    torch.save(state, buf)  # DeepSpeed client_state goes through torch.save / weights_only loads
    buf.seek(0)
    assert to_plain(torch.load(buf, weights_only=True)) == to_plain(state)
    other = build_loader(_cfg([tmp_path / "*.txt"], shuffle_buffer=6, seq_length=24), tok, 2)
    with pytest.raises(ConfigError, match="corpus.seq_length"):
        other.load_state_dict(state)
    with pytest.raises(ConfigError, match="world_size"):
        build_loader(cfg, tok, 2, rank=0, world_size=2).load_state_dict(state)


def test_snapshots_only_every_state_every_batches(tmp_path, tok):
    _corpus_files(tmp_path, 2, 20)
    loader = build_loader(_cfg([tmp_path / "*.txt"], shuffle_buffer=6, state_every=4), tok, 2)
    it = iter(loader)
    seen = []
    for k in range(1, 10):
        next(it)
        w = loader.state_dict()["workers"][0]
        seen.append((w["base"] is not None, w["skip_rows"]))
        assert w["stats"]["sequences"] == 2 * k   # counters are current after every batch
        assert loader.stats["sequences"] == 2 * k
    # Snapshots after batches 4 and 8; in between, the rows handed out since the last one.
    assert seen == [(False, 2), (False, 4), (False, 6), (True, 0), (True, 2), (True, 4), (True, 6), (True, 0),
                    (True, 2)]
    with pytest.raises(ConfigError, match="state_every"):
        _cfg([tmp_path / "*.txt"], state_every=0)


def test_resume_from_a_state_saved_before_state_every(tmp_path, tok):
    # Earlier checkpoints stored a bare snapshot per worker (one after every batch).
    _corpus_files(tmp_path, 2, 10)
    cfg = _cfg([tmp_path / "*.txt"], shuffle_buffer=4, state_every=1)
    full = list(build_loader(cfg, tok, 2))
    loader = build_loader(cfg, tok, 2)
    head = list(itertools.islice(loader, 3))
    state = loader.state_dict()
    state["workers"] = [w["base"] for w in state["workers"]]
    resumed = build_loader(_cfg([tmp_path / "*.txt"], shuffle_buffer=4), tok, 2)
    resumed.load_state_dict(state)
    assert resumed.stats["sequences"] == 6
    assert _batches_equal(head + list(resumed), full)


def test_replay_past_the_end_names_the_cause(tmp_path, tok):
    files = _corpus_files(tmp_path, 1, 12)
    cfg = _cfg([tmp_path / "*.txt"], shuffle_buffer=0, state_every=100)
    loader = build_loader(cfg, tok, 2)
    list(itertools.islice(loader, 5))
    state = loader.state_dict()
    assert state["workers"][0]["base"] is None and state["workers"][0]["skip_rows"] == 10
    write_text(files[0], [0, 1])                 # the corpus shrank since the checkpoint
    resumed = build_loader(cfg, tok, 2)
    # The shard's size and head/tail hash are in the fingerprint: the resume stops at once.
    with pytest.raises(DataError, match=r"shard00\.txt: corpus shard changed since the checkpoint \(size .*new output_dir"):
        resumed.load_state_dict(state)
    # Past the fingerprint (a source it cannot hash), the replay still names the cause.
    state["fingerprint"] = resumed._fingerprint()
    resumed.load_state_dict(state)
    with pytest.raises(ToolkitError, match="replayed .* of 10 rows.*corpus files changed"):
        list(resumed)


def test_a_regenerated_shard_of_the_same_size_stops_a_resume(tmp_path, tok):
    files = _corpus_files(tmp_path, 2, 12)
    cfg = _cfg([tmp_path / "*.txt"], shuffle_buffer=0)
    loader = build_loader(cfg, tok, 2)
    list(itertools.islice(loader, 3))
    state = loader.state_dict()
    text = files[1].read_text(encoding="utf-8")
    files[1].write_text(text.replace("a", "b", 1) if "a" in text else "x" + text[1:], encoding="utf-8")
    assert len(files[1].read_bytes()) == len(text.encode("utf-8"))
    with pytest.raises(DataError, match=r"shard01\.txt: corpus shard changed since the checkpoint \(same size"):
        build_loader(cfg, tok, 2).load_state_dict(state)
    files[1].write_text(text, encoding="utf-8")      # restored: the resume goes on
    build_loader(cfg, tok, 2).load_state_dict(state)


def test_too_small_corpus_for_endless_stream(tmp_path, tok):
    write_text(tmp_path / "a.txt", [1, 2])
    loader = build_loader(_cfg([tmp_path / "a.txt"], epochs=0), tok, 2, rank=2, world_size=3)
    with pytest.raises(DataError, match="too small"):
        next(iter(loader))
    with pytest.raises(ConfigError, match="'rank'"):
        build_loader(_cfg([tmp_path / "a.txt"]), tok, 2, rank=3, world_size=3)


def test_plain_iteration_and_in_process_state(tmp_path, tok):
    _corpus_files(tmp_path, 1, 12)
    cfg = _cfg([tmp_path / "*.txt"])
    corpus = StreamingCorpus(cfg, tok)
    assert corpus.tokens_per_sample == 32
    samples = list(corpus)
    assert samples[0]["input_ids"].shape == (32,) and samples[0]["input_ids"].dtype == torch.long
    corpus2 = StreamingCorpus(cfg, tok)
    head = list(itertools.islice(iter(corpus2), 5))
    state = json.loads(json.dumps(to_plain(corpus2.state_dict())))
    corpus3 = StreamingCorpus(cfg, tok)
    corpus3.load_state_dict(state)
    rest = list(corpus3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(head + rest, samples))
    assert len(head + rest) == len(samples)
    pairs = list(itertools.islice(StreamingCorpus(cfg, tok).iter_with_state(), 3))
    assert pairs[-1][1]["stats"]["sequences"] == 3
    # A plain DataLoader with workers also works (no resume there).
    dl = torch.utils.data.DataLoader(StreamingCorpus(cfg, tok), batch_size=4, num_workers=2)
    assert sum(len(b["input_ids"]) for b in dl) == len(samples)
    assert collections.Counter(count_ids(list(dl), tok)) == expected_counts(range(12))
