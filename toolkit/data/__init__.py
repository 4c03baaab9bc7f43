"""Streaming unlabeled corpus for task-agnostic distillation (see ``corpus.py`` for the design)."""
from toolkit.data.corpus import CorpusConfig, StreamingCorpus, WorkerStream, to_plain
from toolkit.data.loader import StatefulLoader, build_loader
from toolkit.data.packing import SequencePacker, pad_rows, split_sentences
from toolkit.data.sources import READERS, Shard, resolve_shards

__all__ = ["CorpusConfig", "StreamingCorpus", "WorkerStream", "StatefulLoader", "build_loader", "SequencePacker",
           "split_sentences", "pad_rows", "READERS", "Shard", "resolve_shards", "to_plain"]
