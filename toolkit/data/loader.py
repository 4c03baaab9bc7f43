"""A DataLoader over :class:`StreamingCorpus` whose position can be saved and restored exactly.

Each DataLoader worker batches its own rows and sends them with its counters; every
``state_every``-th batch (and its last) also carries a full snapshot of its stream
(``WorkerStream.snapshot``) taken right after that batch. The loader hands batches out in a
fixed round-robin over workers (worker 0, 1, ..., skipping finished ones, the DataLoader's own
order), re-ordering what arrives if needed, and remembers for each worker the newest snapshot it
has *consumed* plus how many rows that worker has handed out since (``skip_rows``), and whose
turn is next. ``state_dict()`` is therefore the position after the last batch the training loop
received, whatever the workers prefetched; a resumed worker restores its snapshot and replays
``skip_rows`` rows (fewer than ``state_every`` batches) without yielding them, so a loader built
with the same settings and given that state yields exactly the batches an uninterrupted run
would have yielded next.

Why not a snapshot with every batch: a snapshot holds the shuffle buffer's token ids (about
``4 x shuffle_buffer x mean tokens`` bytes: 26 MB at 10k x 512 on real text). Gathering,
pickling and unpickling that per batch slows the training process and halves the workers'
rate at that size, while the replay costs a restart a fraction of a second
(``benchmarks/bench_loader.py`` measures both).

With ``num_workers=0`` the same code runs in-process as one worker.
"""
from __future__ import annotations

import atexit
import copy
import itertools
import logging
import multiprocessing
import signal
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from toolkit import errors
from toolkit.data.corpus import (STATE_VERSION, CorpusConfig, StreamingCorpus, check_fingerprint, new_stats,
                                 to_checkpoint)
from toolkit.data.packing import pad_rows
from toolkit.errors import ConfigError, ToolkitError
from toolkit.utils.stop_signals import blocked, ignore_in_child


def _kill_leftover_workers() -> None:
    """At interpreter exit, kill the DataLoader workers still alive. They ignore SIGTERM (see
    :meth:`StatefulLoader.__iter__`), so after a crash whose traceback keeps the loader alive,
    multiprocessing's exit handler would ``terminate()`` them in vain and wait for them forever.
    Registered after multiprocessing's own handler, so it runs first."""
    workers = [p for p in multiprocessing.active_children() if p.daemon]
    if workers:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)   # torch's handler would report the kill as a failure
    for p in workers:
        p.kill()


atexit.register(_kill_leftover_workers)

logger = logging.getLogger(__name__)


def _identity(item: Any) -> Any:
    # batch_size=None would otherwise run default_convert over the (large) state dict.
    return item


def _error_payload(e: ToolkitError) -> Dict[str, Any]:
    # ToolkitError subclasses take several constructor arguments, which the DataLoader's
    # re-raise cannot rebuild (it turns them into RuntimeError); carry them by hand instead.
    return {"type": type(e).__name__, "message": str(e), "attrs": dict(vars(e))}


def _raise_payload(payload: Dict[str, Any]) -> None:
    cls = getattr(errors, payload["type"], ToolkitError)
    if not (isinstance(cls, type) and issubclass(cls, ToolkitError)):
        cls = ToolkitError
    exc = cls.__new__(cls)
    Exception.__init__(exc, payload["message"])
    exc.__dict__.update(payload["attrs"])
    raise exc


class _BatchStream(IterableDataset):
    """Per worker: ``{"worker", "batch", "rows", "stats"[, "state"]}`` items, then
    ``{"worker", "end", "rows": 0, "stats", "state"}``; ``state`` on every ``state_every``-th batch."""

    def __init__(self, corpus: StreamingCorpus, batch_size: int, num_workers: int, drop_last: bool,
                 positions: List[Dict[str, Any]], state_every: int):
        super().__init__()
        self.corpus, self.batch_size, self.num_workers = corpus, batch_size, num_workers
        self.drop_last, self.positions, self.state_every = drop_last, positions, state_every

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        wid = info.id if info is not None else 0
        cfg = self.corpus.cfg
        pos = self.positions[wid]
        try:
            stream = self.corpus.worker_stream(wid, self.num_workers, pos["base"])
            rows_iter = iter(stream)
            # Replay what this worker handed out after its snapshot (deterministic: same rows).
            replayed = sum(1 for _ in itertools.islice(rows_iter, pos["skip_rows"]))
            if replayed < pos["skip_rows"]:
                raise ToolkitError(f"corpus resume: worker {wid} replayed {replayed} of {pos['skip_rows']} rows after "
                                   f"its snapshot before its stream ended; the corpus files changed since the "
                                   f"checkpoint (resume with the same files, or start the stream fresh)")
            n = 0
            while True:
                rows = list(itertools.islice(rows_iter, self.batch_size))
                if rows and (len(rows) == self.batch_size or not self.drop_last):
                    n += 1
                    item = {"worker": wid, "batch": pad_rows(rows, cfg.seq_length, self.corpus.pad_id),
                            "rows": len(rows), "stats": copy.deepcopy(stream.stats)}
                    if n % self.state_every == 0:
                        item["state"] = stream.snapshot()
                    yield item
                if len(rows) < self.batch_size:
                    break
            yield {"worker": wid, "end": True, "rows": 0, "stats": copy.deepcopy(stream.stats),
                   "state": stream.snapshot()}
        except ToolkitError as e:
            yield {"worker": wid, "error": _error_payload(e)}


class StatefulLoader:
    """Batches ``{input_ids, attention_mask, token_type_ids}`` (torch.long ``[b, seq_length]``).

    Args:
        corpus: the rank's corpus.
        batch_size: sequences per batch (per rank, i.e. the micro batch).
        num_workers: DataLoader worker processes (0 = in-process).
        drop_last: drop each worker's final partial batch (finite epochs only).
        pin_memory: DataLoader ``pin_memory``.
        prefetch_factor: DataLoader ``prefetch_factor`` (workers > 0).
    """

    def __init__(self, corpus: StreamingCorpus, batch_size: int, num_workers: int = 0, drop_last: bool = False,
                 pin_memory: bool = False, prefetch_factor: int = 2, state_every: int = 32):
        if batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {num_workers}")
        if isinstance(state_every, bool) or not isinstance(state_every, int) or state_every < 1:
            raise ConfigError("corpus.state_every", f"must be a positive integer, got {state_every!r}")
        self.corpus = corpus
        self.batch_size, self.num_workers = batch_size, num_workers
        self.drop_last, self.pin_memory, self.prefetch_factor = drop_last, pin_memory, prefetch_factor
        self.state_every = state_every
        n = max(1, num_workers)
        # Per worker: newest consumed snapshot (None: the stream's start) + rows handed out since.
        self._positions: List[Dict[str, Any]] = [{"base": None, "skip_rows": 0} for _ in range(n)]
        self._stats: List[Optional[Dict[str, Any]]] = [None] * n
        self._active = [True] * n
        self._next = 0
        self.batches = 0

    @property
    def tokens_per_sample(self) -> int:
        """Positions per sample (padding included): tokens/s = batches/s x batch x this."""
        return self.corpus.tokens_per_sample

    def _next_worker(self) -> int:
        n = len(self._active)
        for k in range(n):
            w = (self._next + k) % n
            if self._active[w]:
                return w
        raise RuntimeError("no active corpus worker")  # callers check any(self._active) first

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        if not any(self._active):
            return
        stream = _BatchStream(self.corpus, self.batch_size, self.num_workers, self.drop_last,
                              [dict(p) for p in self._positions], self.state_every)
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
                            worker_init_fn=ignore_in_child if self.num_workers > 0 else None)
        arrived: List[Deque[Dict[str, Any]]] = [deque() for _ in self._active]
        # Schedulers signal every process of a job. A worker killed by a preemption signal takes its
        # rank down with it ("DataLoader worker exited unexpectedly") before the rank checkpoints,
        # so workers ignore the signal; blocked while they are forked, it cannot reach one before
        # its worker_init_fn runs.
        with blocked():
            items = iter(loader)
        while any(self._active):
            w = self._next_worker()
            while not arrived[w]:
                item = next(items, None)
                if item is None:
                    raise ToolkitError(f"corpus loader worker {w} stopped without finishing its stream")
                if "error" in item:
                    _raise_payload(item["error"])
                arrived[item["worker"]].append(item)
            item = arrived[w].popleft()
            if "state" in item:
                self._positions[w] = {"base": item["state"], "skip_rows": 0}
            else:
                self._positions[w]["skip_rows"] += item["rows"]
            self._stats[w] = item["stats"]
            if item.get("end"):
                self._active[w] = False
                continue
            self._next = (w + 1) % len(self._active)
            self.batches += 1
            yield item["batch"]

    def _fingerprint(self) -> Dict[str, Any]:
        return {**self.corpus.fingerprint(), "num_workers": self.num_workers}

    def state_dict(self) -> Dict[str, Any]:
        """Position after the last batch handed out: ints, dicts and integer tensors (the buffered
        token ids, uint16 for vocabularies below 65536), for ``torch.save``; it loads with
        ``weights_only=True``, and ``to_plain`` gives a JSON copy.

        ``workers[w]`` is ``{"base": snapshot or None, "skip_rows": n, "stats": counters}``. Size:
        about ``2 bytes x shuffle_buffer x mean tokens`` per worker (4 for larger vocabularies).
        """
        workers = [{"base": p["base"], "skip_rows": p["skip_rows"], "stats": st}
                   for p, st in zip(self._positions, self._stats)]
        return to_checkpoint({"version": STATE_VERSION, "fingerprint": self._fingerprint(),
                         "batch_size": self.batch_size, "next_worker": self._next, "active": list(self._active),
                         "batches": self.batches, "workers": workers})

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a loader with the same corpus, ranks and workers.

        Raises:
            ConfigError: a setting that shapes the stream differs (names it).
        """
        check_fingerprint(state, self._fingerprint())
        if state["batch_size"] != self.batch_size:
            logger.warning("corpus resume: batch size %d -> %d; no sequence is repeated or skipped, but batches "
                           "differ from an uninterrupted run", state["batch_size"], self.batch_size)
        self._positions, self._stats = [], []
        for entry in state["workers"]:
            if entry is None or "skip_rows" not in entry:   # a bare snapshot (states saved before state_every)
                entry = {"base": entry, "skip_rows": 0, "stats": entry["stats"] if entry else None}
            self._positions.append({"base": entry["base"], "skip_rows": int(entry["skip_rows"])})
            self._stats.append(entry["stats"])
        self._active = [bool(a) for a in state["active"]]
        self._next = int(state["next_worker"])
        self.batches = int(state["batches"])

    @property
    def stats(self) -> Dict[str, Any]:
        """Counters summed over this rank's workers, as of the last consumed batch.

        Keys: documents, empty_documents, sequences, tokens (non-padding), truncations (cuts of
        over-long sentences), split_documents (documents spanning several sequences),
        skipped (reason -> lines), peak_buffered (max rows a worker held), empty_files, batches.
        """
        total = new_stats()
        for stats in self._stats:
            if stats is None:
                continue
            for key, value in stats.items():
                if key == "skipped":
                    for reason, count in value.items():
                        total["skipped"][reason] = total["skipped"].get(reason, 0) + int(count)
                elif key == "peak_buffered":
                    total[key] = max(total[key], int(value))
                else:
                    total[key] += int(value)
        total["empty_files"] = len(self.corpus.empty_files)
        total["batches"] = self.batches
        return total


def build_loader(cfg: CorpusConfig, tokenizer: Any, batch_size: int, rank: int = 0, world_size: int = 1, *,
                 drop_last: bool = False, pin_memory: bool = False) -> StatefulLoader:
    """The rank's resumable loader over ``cfg`` (``cfg.num_workers`` worker processes).

    Args:
        cfg: corpus settings.
        tokenizer: (fast) BERT/ERNIE tokenizer.
        batch_size: micro batch per rank.
        rank: this process's rank (from the engine; this module never asks torch.distributed).
        world_size: number of ranks.
    """
    corpus = StreamingCorpus(cfg, tokenizer, rank=rank, world_size=world_size)
    return StatefulLoader(corpus, batch_size, num_workers=cfg.num_workers, drop_last=drop_last,
                          pin_memory=pin_memory, state_every=cfg.state_every)
