"""A DataLoader over :class:`StreamingCorpus` whose position can be saved and restored exactly.

Each DataLoader worker batches its own rows and sends every batch together with a snapshot
of its stream (``WorkerStream.snapshot``) taken right after the batch. The loader hands
batches out in a fixed round-robin over workers (worker 0, 1, ..., skipping finished ones, the
DataLoader's own order), re-ordering what arrives if needed, and remembers for each worker the
snapshot of its last *consumed* batch plus whose turn is next. ``state_dict()`` is therefore the
position after the last batch the training loop received, whatever the workers prefetched;
a loader built with the same settings and given that state yields exactly the batches an
uninterrupted run would have yielded next.

With ``num_workers=0`` the same code runs in-process as one worker.
"""
from __future__ import annotations

import itertools
import logging
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from toolkit import errors
from toolkit.data.corpus import (STATE_VERSION, CorpusConfig, StreamingCorpus, check_fingerprint, new_stats,
                                 to_plain)
from toolkit.data.packing import pad_rows
from toolkit.errors import ConfigError, ToolkitError

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
    """Per worker: ``{"worker", "batch", "state"}`` items, then ``{"worker", "end", "state"}``."""

    def __init__(self, corpus: StreamingCorpus, batch_size: int, num_workers: int, drop_last: bool,
                 states: List[Optional[Dict[str, Any]]]):
        super().__init__()
        self.corpus, self.batch_size, self.num_workers = corpus, batch_size, num_workers
        self.drop_last, self.states = drop_last, states

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        info = get_worker_info()
        wid = info.id if info is not None else 0
        cfg = self.corpus.cfg
        try:
            stream = self.corpus.worker_stream(wid, self.num_workers, self.states[wid])
            rows_iter = iter(stream)
            while True:
                rows = list(itertools.islice(rows_iter, self.batch_size))
                if rows and (len(rows) == self.batch_size or not self.drop_last):
                    yield {"worker": wid, "batch": pad_rows(rows, cfg.seq_length, self.corpus.pad_id),
                           "state": stream.snapshot()}
                if len(rows) < self.batch_size:
                    break
            yield {"worker": wid, "end": True, "state": stream.snapshot()}
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
                 pin_memory: bool = False, prefetch_factor: int = 2):
        if batch_size < 1:
            raise ConfigError("batch_size", f"must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ConfigError("num_workers", f"must be >= 0, got {num_workers}")
        self.corpus = corpus
        self.batch_size, self.num_workers = batch_size, num_workers
        self.drop_last, self.pin_memory, self.prefetch_factor = drop_last, pin_memory, prefetch_factor
        n = max(1, num_workers)
        self._states: List[Optional[Dict[str, Any]]] = [None] * n
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
        stream = _BatchStream(self.corpus, self.batch_size, self.num_workers, self.drop_last, list(self._states))
        loader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                            pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None)
        arrived: List[Deque[Dict[str, Any]]] = [deque() for _ in self._active]
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
            self._states[w] = item["state"]
            if item.get("end"):
                self._active[w] = False
                continue
            self._next = (w + 1) % len(self._active)
            self.batches += 1
            yield item["batch"]

    def _fingerprint(self) -> Dict[str, Any]:
        return {**self.corpus.fingerprint(), "num_workers": self.num_workers}

    def state_dict(self) -> Dict[str, Any]:
        """Position after the last batch handed out: plain ints/lists/dicts (JSON- and torch.save-safe).

        Size: about ``4 bytes x shuffle_buffer x mean tokens`` per worker (as lists of ints).
        """
        return to_plain({"version": STATE_VERSION, "fingerprint": self._fingerprint(),
                         "batch_size": self.batch_size, "next_worker": self._next, "active": list(self._active),
                         "batches": self.batches, "workers": self._states})

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` of a loader with the same corpus, ranks and workers.

        Raises:
            ConfigError: a setting that shapes the stream differs (names it).
        """
        check_fingerprint(state, self._fingerprint())
        if state["batch_size"] != self.batch_size:
            logger.warning("corpus resume: batch size %d -> %d; no sequence is repeated or skipped, but batches "
                           "differ from an uninterrupted run", state["batch_size"], self.batch_size)
        self._states = list(state["workers"])
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
        for state in self._states:
            if state is None:
                continue
            for key, value in state["stats"].items():
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
                          pin_memory=pin_memory)
