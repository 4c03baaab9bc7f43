"""Streaming unlabeled corpus for task-agnostic distillation, with exact resume.

Pipeline per loader worker: shards (``sources.py``) -> documents -> sentences -> token ids ->
packed ``[CLS] A [SEP] B [SEP]`` rows (``packing.py``) -> bounded shuffle buffer -> samples
``{input_ids, attention_mask, token_type_ids}`` (torch.long ``[seq_length]``).

Sharding. Global worker ``g = rank * num_workers + worker_id`` of ``W = world_size *
num_workers``. With at least ``W`` shards, the shard at position ``i`` of the epoch's file
order goes to worker ``i % W``; otherwise every worker reads every shard and keeps document
``j`` (its index within the shard) when ``j % W == g``. Either way every document is read by
exactly one worker per epoch. The file order is re-shuffled each epoch with ``seed + epoch``.

Randomness. A document's packing (short targets, A/B split points) uses a generator seeded by
``(seed, epoch, shard, document)``, so it does not depend on the sharding; the shuffle buffer
uses one generator per global worker seeded by ``(seed, g)``.

Exact resume. A :class:`WorkerStream` is a worker's whole position: epoch, file position,
reader cursor (byte offset or row), the rows of the current document not yet in the buffer,
the buffer's rows and generator state, and the stats. ``snapshot()`` returns it as a dict
of ints, lists and int32 arrays; a stream rebuilt from it produces exactly the samples the
original would have produced next. ``state_dict()`` turns the arrays into tensors (uint16
where the values fit), which ``torch.save`` writes in one block and
``torch.load(weights_only=True)`` accepts; ``to_plain`` makes a JSON-ready copy. The snapshot
holds the buffered token ids, unpadded: about ``4 * shuffle_buffer * mean_tokens`` bytes in
memory (half that saved, for vocabularies below 65536), e.g. at most 512 KB for a buffer of
1000 sequences of 128 tokens, plus one document's rows.
:class:`toolkit.data.loader.StatefulLoader` carries these snapshots from DataLoader workers
and restores them; iterated in-process, :class:`StreamingCorpus` keeps them itself.

Memory. A worker holds at most ``shuffle_buffer`` rows plus one document's rows, and readers
stream line by line (Parquet: one row group), so corpus size never matters.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from toolkit.config import arg
from toolkit.errors import ConfigError, DataError
from toolkit.data.packing import Row, SequencePacker, pad_row
from toolkit.data.sources import (READERS, ReadOptions, SkipTracker, resolve_shards,
                                  start_cursor)
from toolkit.utils.fingerprint import file_digest

logger = logging.getLogger(__name__)

DOC_SEPARATORS = ("blank_line", "line")
STATE_VERSION = 1
# Settings that change the stream: resuming with a different value would not be exact.
FINGERPRINT_FIELDS = ("format", "text_field", "doc_separator", "seq_length", "shuffle_buffer", "seed",
                      "short_seq_prob")


@dataclass
class CorpusConfig:
    """Unlabeled corpus for task-agnostic distillation (the ``corpus:`` block of a distill job)."""

    sources: List[str] = arg(factory=list, help="files, folders, globs (corpus/**/*.jsonl.gz) or hf:<local dir or files>[#split]")
    format: str = arg("auto", help="auto (by extension) | text | jsonl | parquet | hf")
    text_field: str = arg("text", help="JSONL field / Parquet column / datasets column holding the text")
    doc_separator: str = arg("blank_line", help="text files: blank_line (documents are blocks) | line (one per line)")
    seq_length: int = arg(128, help="tokens per packed sequence, [CLS]/[SEP] included")
    shuffle_buffer: int = arg(1000, help="packed sequences held for shuffling (0 = no shuffling); resume state grows with it")
    seed: int = arg(42, help="seed of file order, packing and shuffling")
    epochs: int = arg(0, help="passes over the corpus; 0 = endless (stop by steps)")
    num_workers: int = arg(2, help="DataLoader worker processes per rank (0 = read in the training process)")
    state_every: int = arg(32, help="batches between a worker's full stream snapshots (they hold the shuffle buffer); "
                                    "a resume replays fewer than this many batches per worker")
    strict: bool = arg(False, help="raise on bad lines and empty files instead of skipping and counting them")
    short_seq_prob: float = arg(0.1, help="probability of targeting a random shorter sequence (BERT's 0.1)")

    def __post_init__(self) -> None:
        formats = ("auto", *READERS)
        if self.format not in formats:
            raise ConfigError("format", f"must be one of {list(formats)}, got {self.format!r}")
        if self.doc_separator not in DOC_SEPARATORS:
            raise ConfigError("doc_separator", f"must be one of {list(DOC_SEPARATORS)}, got {self.doc_separator!r}")
        if not self.text_field:
            raise ConfigError("text_field", "must name the field or column holding the text")
        if self.seq_length < 5:
            raise ConfigError("seq_length", f"must be at least 5 ([CLS] a [SEP] b [SEP]), got {self.seq_length}")
        for name in ("shuffle_buffer", "epochs", "num_workers", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.state_every < 1:
            raise ConfigError("state_every", f"must be >= 1, got {self.state_every}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ConfigError("short_seq_prob", f"must be in [0, 1], got {self.short_seq_prob}")
        if isinstance(self.sources, str):
            self.sources = [self.sources]


def new_stats() -> Dict[str, Any]:
    """Per-worker counters; ``skipped`` maps reason -> lines."""
    return {"documents": 0, "empty_documents": 0, "sequences": 0, "tokens": 0, "truncations": 0,
            "split_documents": 0, "skipped": {}, "peak_buffered": 0}


def _flatten(rows: List[Row]) -> Dict[str, np.ndarray]:
    lens = np.asarray([len(r[0]) for r in rows], dtype=np.int32)
    tokens = np.concatenate([r[0] for r in rows]).astype(np.int32) if rows else np.zeros(0, np.int32)
    return {"tokens": tokens, "lens": lens, "n_a": np.asarray([r[1] for r in rows], dtype=np.int32)}


def _unflatten(flat: Dict[str, Any]) -> List[Row]:
    tokens = np.asarray(flat["tokens"], dtype=np.int32)
    ends = np.cumsum(np.asarray(flat["lens"], dtype=np.int64))
    starts = ends - np.asarray(flat["lens"], dtype=np.int64)
    return [(tokens[s:e].copy(), int(n)) for s, e, n in zip(starts, ends, flat["n_a"])]


def to_checkpoint(obj: Any, _key: Optional[str] = None) -> Any:
    """Numpy arrays -> CPU tensors, numpy scalars -> ints, recursively: a checkpoint-ready state.

    Token-id arrays (key ``tokens``) whose values fit are stored as uint16 (vocabularies below
    65536): half the bytes. A 10k x 512 shuffle buffer saved as Python lists of ints took 1.2 s
    to ``torch.save`` and 26 MiB; as tensors it is written in one block, 17.5 MiB in 0.01 s
    (benchmarks/bench_loader.py). Tensors load with ``torch.load(weights_only=True)``; older
    list-valued states still load. (uint16 tensors support few torch ops: read them through
    numpy, as :class:`WorkerStream` does, or ``.to(torch.int32)``.)
    """
    if isinstance(obj, np.ndarray):
        if _key == "tokens" and obj.dtype.kind in "iu" and obj.size and 0 <= obj.min() and obj.max() < 2 ** 16:
            obj = obj.astype(np.uint16)
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_checkpoint(v, k) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_checkpoint(v) for v in obj]
    return obj


def to_plain(obj: Any) -> Any:
    """Numpy arrays, tensors and numpy scalars -> lists and ints, recursively (JSON-ready)."""
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    return obj


class ShuffleBuffer:
    """A bounded reservoir of packed rows; a full buffer emits a random row for each new one.

    Rows live in a preallocated ``[capacity, seq_length]`` int32 array so a snapshot is one copy.
    """

    def __init__(self, capacity: int, seq_length: int, rng: np.random.Generator):
        self.capacity = capacity
        self.rng = rng
        self.ids = np.zeros((capacity, seq_length), dtype=np.int32)
        self.lens = np.zeros(capacity, dtype=np.int32)
        self.n_a = np.zeros(capacity, dtype=np.int32)
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def _get(self, j: int) -> Row:
        return self.ids[j, :self.lens[j]].copy(), int(self.n_a[j])

    def _put(self, j: int, row: Row) -> None:
        ids, n_a = row
        self.ids[j, :len(ids)] = ids
        self.lens[j] = len(ids)
        self.n_a[j] = n_a

    def push(self, row: Row) -> Optional[Row]:
        """Add a row; returns the row to emit, or None while the buffer fills."""
        if self.capacity == 0:
            return row
        if self.size < self.capacity:
            self._put(self.size, row)
            self.size += 1
            return None
        j = int(self.rng.integers(self.capacity))
        out = self._get(j)
        self._put(j, row)
        return out

    def pop(self) -> Row:
        """Remove and return a random row (draining at the end of the stream)."""
        j = int(self.rng.integers(self.size))
        out = self._get(j)
        self.size -= 1
        if j != self.size:
            self._put(j, self._get(self.size))
        return out

    def snapshot(self) -> Dict[str, Any]:
        """Rows (flattened, unpadded) and the generator state."""
        lens = self.lens[:self.size].copy()
        mask = np.arange(self.ids.shape[1])[None, :] < lens[:, None]
        return {"tokens": self.ids[:self.size][mask], "lens": lens, "n_a": self.n_a[:self.size].copy(),
                "rng": copy.deepcopy(self.rng.bit_generator.state)}

    def restore(self, snap: Dict[str, Any]) -> None:
        rows = _unflatten(snap)
        if len(rows) > self.capacity:
            raise DataError(None, f"resume state holds {len(rows)} buffered rows but shuffle_buffer is {self.capacity}")
        self.size = 0
        for row in rows:
            self._put(self.size, row)
            self.size += 1
        self.rng.bit_generator.state = snap["rng"]


class WorkerStream:
    """One global worker's slice of the corpus: an iterator of packed rows with a snapshot.

    Args:
        corpus: the dataset (settings, shards, packer).
        global_worker: ``g = rank * num_workers + worker_id``.
        num_global: ``W = world_size * num_workers`` (``num_workers`` counted as 1 when 0).
        state: a :meth:`snapshot` (or its :func:`to_plain` form) to continue from.
    """

    def __init__(self, corpus: "StreamingCorpus", global_worker: int, num_global: int,
                 state: Optional[Dict[str, Any]] = None):
        cfg = corpus.cfg
        self.cfg = cfg
        self.shards = corpus.shards
        self.packer = corpus.packer
        self.g, self.W = global_worker, num_global
        self.by_file = len(self.shards) >= num_global
        self.opts = ReadOptions(cfg.text_field, cfg.doc_separator)
        self.epoch, self.file_pos, self.epoch_docs = 0, 0, 0
        self.cursor: Optional[Dict[str, int]] = None
        self.pending: List[Row] = []
        self.stats = new_stats()
        self.done = False
        rng = np.random.Generator(np.random.PCG64([cfg.seed, global_worker, 0x5B]))
        self.buffer = ShuffleBuffer(cfg.shuffle_buffer, cfg.seq_length, rng)
        self._reader: Optional[Iterator[Tuple[str, Dict[str, int]]]] = None
        self._shard_index = -1
        self._order_epoch, self._order_cache = -1, np.zeros(0, dtype=np.int64)
        if state is not None:
            self._restore(state)
        self.skips = SkipTracker(self.stats["skipped"], cfg.strict, self._owns_line)

    def _owns_line(self, line: int) -> bool:
        return self.by_file or (line - 1) % self.W == self.g

    def _order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order_cache = np.random.default_rng([self.cfg.seed + self.epoch, 0xF11E]).permutation(len(self.shards))
            self._order_epoch = self.epoch
        return self._order_cache

    def snapshot(self) -> Dict[str, Any]:
        """This worker's position (token arrays as int32 numpy arrays; see :func:`to_checkpoint`)."""
        return {"version": STATE_VERSION, "worker": self.g, "num_global": self.W, "epoch": self.epoch,
                "file_pos": self.file_pos, "epoch_docs": self.epoch_docs,
                "cursor": dict(self.cursor) if self.cursor else None, "pending": _flatten(self.pending),
                "buffer": self.buffer.snapshot(), "stats": copy.deepcopy(self.stats), "done": self.done}

    def _restore(self, state: Dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("worker") != self.g or state.get("num_global") != self.W:
            raise DataError(None, f"corpus resume state is for worker {state.get('worker')} of "
                                  f"{state.get('num_global')}, not {self.g} of {self.W}",
                            hint="resume with the same world size and corpus.num_workers")
        self.epoch, self.file_pos = int(state["epoch"]), int(state["file_pos"])
        self.epoch_docs = int(state["epoch_docs"])
        self.cursor = {k: int(v) for k, v in state["cursor"].items()} if state["cursor"] else None
        self.pending = _unflatten(state["pending"])
        self.buffer.restore(state["buffer"])
        self.stats = copy.deepcopy(state["stats"])
        self.done = bool(state["done"])

    def _end_epoch(self) -> None:
        if self.epoch_docs == 0 and self.cfg.epochs == 0:
            # An endless stream that owns nothing would spin forever without yielding.
            raise DataError(self.shards[0].name, f"loader worker {self.g} of {self.W} got no documents in epoch "
                            f"{self.epoch}: the corpus is too small for this many ranks x workers",
                            hint="add data or lower corpus.num_workers")
        self.epoch += 1
        self.file_pos, self.epoch_docs, self.cursor = 0, 0, None

    def _next_document(self) -> Optional[Tuple[int, int, str]]:
        """The next document this worker owns as ``(shard, doc index, text)``; None at epoch end."""
        while True:
            if self._reader is None:
                if self.file_pos >= len(self.shards):
                    self._end_epoch()
                    return None
                if self.by_file and self.file_pos % self.W != self.g:
                    self.file_pos += 1
                    continue
                self._shard_index = int(self._order()[self.file_pos])
                shard = self.shards[self._shard_index]
                self._reader = READERS[shard.kind](shard, self.opts, self.cursor or start_cursor(), self.skips)
            item = next(self._reader, None)
            if item is None:
                self._reader, self.cursor = None, None
                self.file_pos += 1
                continue
            text, self.cursor = item
            doc = self.cursor["doc"] - 1
            if self.by_file or doc % self.W == self.g:
                return self._shard_index, doc, text

    def _pack(self, shard: int, doc: int, text: str) -> None:
        rng = np.random.default_rng([self.cfg.seed, self.epoch, shard, doc])
        result = self.packer.pack_text(text, rng)
        self.epoch_docs += 1
        stats = self.stats
        stats["documents"] += 1
        if not result.rows:
            stats["empty_documents"] += 1
        stats["truncations"] += result.cut_sentences
        stats["split_documents"] += int(len(result.rows) > 1)
        self.pending = result.rows
        stats["peak_buffered"] = max(stats["peak_buffered"], len(self.buffer) + len(self.pending))

    def _emit(self, row: Row) -> Row:
        self.stats["sequences"] += 1
        self.stats["tokens"] += len(row[0])
        return row

    def __iter__(self) -> Iterator[Row]:
        epochs = self.cfg.epochs
        while not self.done:
            while self.pending:
                out = self.buffer.push(self.pending.pop(0))
                if out is not None:
                    yield self._emit(out)
            if epochs and self.epoch >= epochs:
                while len(self.buffer):
                    yield self._emit(self.buffer.pop())
                self.done = True
                return
            doc = self._next_document()
            if doc is not None:
                self._pack(*doc)


class StreamingCorpus(IterableDataset):
    """Packed BERT sequences streamed from unlabeled text, sharded over ranks and workers.

    Iterating yields ``{input_ids, attention_mask, token_type_ids}``, each torch.long
    ``[seq_length]``. Inside a DataLoader worker it reads that worker's slice; in the main
    process it reads worker 0 of 1 and keeps its position for :meth:`state_dict`. Use
    :class:`toolkit.data.loader.StatefulLoader` for exact resume with worker processes.

    Args:
        cfg: corpus settings.
        tokenizer: (fast) BERT/ERNIE tokenizer.
        rank: this process's rank.
        world_size: number of ranks.

    Raises:
        DataError: sources match nothing / are all empty (at construction, not in a worker).
    """

    def __init__(self, cfg: CorpusConfig, tokenizer: Any, rank: int = 0, world_size: int = 1):
        super().__init__()
        if not cfg.sources:
            raise ConfigError("sources", "no corpus given: list files, globs or hf: specs")
        if world_size < 1:
            raise ConfigError("world_size", f"must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ConfigError("rank", f"must be in [0, {world_size}), got {rank}")
        self.cfg = cfg
        self.rank, self.world_size = rank, world_size
        self.packer = SequencePacker(tokenizer, cfg.seq_length, cfg.short_seq_prob)
        self.shards, self.empty_files = resolve_shards(cfg.sources, cfg.format, cfg.strict)
        self._resume: Dict[int, Dict[str, Any]] = {}
        self._stream: Optional[WorkerStream] = None
        self._fingerprint: Optional[Dict[str, Any]] = None

    @property
    def tokens_per_sample(self) -> int:
        """Positions per sample (padding included), for tokens/s reports."""
        return self.cfg.seq_length

    @property
    def pad_id(self) -> int:
        return self.packer.pad_id

    def fingerprint(self) -> Dict[str, Any]:
        """What a resume state must match: data-affecting settings, shards, rank layout.

        Each file shard is named with its size and a sha256 of its first and last 64 KiB, so a
        shard regenerated under the same name stops a resume instead of being read from a stale
        byte offset. Computed once, when the corpus is opened.
        """
        if self._fingerprint is None:
            self._fingerprint = {"shards": [shard_fingerprint(s) for s in self.shards], "rank": self.rank,
                                 "world_size": self.world_size,
                                 **{k: getattr(self.cfg, k) for k in FINGERPRINT_FIELDS}}
        return self._fingerprint

    def worker_stream(self, worker_id: int, num_workers: int, state: Optional[Dict[str, Any]] = None) -> WorkerStream:
        """The row stream of DataLoader worker ``worker_id`` of ``num_workers`` on this rank."""
        n = max(1, num_workers)
        return WorkerStream(self, self.rank * n + worker_id, self.world_size * n, state)

    def iter_with_state(self, worker_id: int = 0, num_workers: int = 1,
                        state: Optional[Dict[str, Any]] = None) -> Iterator[Tuple[Dict[str, torch.Tensor], Dict[str, Any]]]:
        """Yield ``(sample, state after it)``; each state is a full snapshot (simple, not cheap)."""
        stream = self.worker_stream(worker_id, num_workers, state)
        for row in stream:
            yield pad_row(row, self.cfg.seq_length, self.pad_id), stream.snapshot()

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = self.worker_stream(wid, nw, self._resume.get(wid))
        if info is None:
            self._stream = stream
        for row in stream:
            yield pad_row(row, self.cfg.seq_length, self.pad_id)

    def state_dict(self) -> Dict[str, Any]:
        """In-process position (after the last sample yielded); arrays as tensors (:func:`to_checkpoint`)."""
        workers = [self._stream.snapshot()] if self._stream is not None else [self._resume.get(0)]
        return to_checkpoint({"version": STATE_VERSION, "fingerprint": self.fingerprint(), "workers": workers})

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue the next in-process iteration from ``state`` (from :meth:`state_dict`)."""
        check_fingerprint(state, self.fingerprint())
        self._resume = {0: state["workers"][0]} if state["workers"][0] is not None else {}
        self._stream = None

    @property
    def stats(self) -> Dict[str, Any]:
        """Counters of the in-process stream (see :class:`StatefulLoader` for worker processes)."""
        stats = copy.deepcopy(self._stream.stats) if self._stream is not None else new_stats()
        stats["empty_files"] = len(self.empty_files)
        return stats


def shard_fingerprint(shard: Any) -> Dict[str, Any]:
    """``{"name", "size", "sha256_head_tail"}`` of a file shard; ``{"name"}`` for an ``hf:`` one."""
    if shard.kind == "hf":
        return {"name": shard.name}
    try:
        return {"name": shard.name, **file_digest(shard.path)}
    except OSError as e:
        raise DataError(shard.path, f"cannot read the corpus file: {e.strerror}") from None


_FRESH = "start fresh instead: a new output_dir, or resume=false"


def _check_shards(saved: Any, now: List[Dict[str, Any]]) -> None:
    """Name the first shard that was added, removed or changed since the checkpoint."""
    def as_dict(x: Any) -> Dict[str, Any]:
        return x if isinstance(x, dict) else {"name": x}   # states saved before sizes/hashes: names

    old = [as_dict(x) for x in (saved or [])]
    old_names, new_names = [x["name"] for x in old], [x["name"] for x in now]
    for name in new_names:
        if name not in old_names:
            raise DataError(name, f"corpus shard added since the checkpoint; resume with the files it was made "
                            f"with, or {_FRESH}")
    for name in old_names:
        if name not in new_names:
            raise DataError(name, f"corpus shard missing since the checkpoint; resume with the files it was made "
                            f"with, or {_FRESH}")
    if old_names != new_names:
        raise DataError(new_names[0], f"the corpus shards are in another order than at the checkpoint; {_FRESH}")
    for o, n in zip(old, now):
        if "size" not in o:
            continue
        if o.get("size") != n.get("size"):
            raise DataError(n["name"], f"corpus shard changed since the checkpoint (size {o.get('size')} -> "
                            f"{n.get('size')} bytes): the saved stream position would point into other text; "
                            f"restore the original file, or {_FRESH}")
        if o.get("sha256_head_tail") != n.get("sha256_head_tail"):
            raise DataError(n["name"], f"corpus shard changed since the checkpoint (same size, other content in its "
                            f"first or last 64 KiB); restore the original file, or {_FRESH}")


def check_fingerprint(state: Dict[str, Any], expected: Dict[str, Any]) -> None:
    """Raise a ToolkitError naming the first setting or shard that differs from the saved stream."""
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise DataError(None, "not a corpus resume state (or from another toolkit version)",
                        hint="start the data stream fresh")
    saved = state.get("fingerprint", {})
    if not isinstance(saved, dict):
        raise DataError(None, "corpus resume state without a valid fingerprint", hint=_FRESH)
    _check_shards(saved.get("shards"), expected.get("shards", []))
    for key, value in expected.items():
        if key == "shards":
            continue
        if saved.get(key) != value:
            field = f"corpus.{key}" if key in FINGERPRINT_FIELDS else key
            raise ConfigError(field, f"differs from the checkpoint's data stream ({saved.get(key)!r} there, "
                                     f"{value!r} now): resume with the same corpus and layout, or {_FRESH}")
