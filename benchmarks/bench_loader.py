"""The resumable corpus loader: what its resume snapshots cost per batch, by ``state_every``.

A loader worker's snapshot holds its shuffle buffer's token ids (about ``4 x shuffle_buffer x
mean tokens`` bytes). With ``state_every=1`` (what every release before this option did) a
worker snapshots, pickles and ships it with every batch and the training process unpickles
it; with the default, once every 32 batches. For each (shuffle buffer, ``state_every``) the
script builds a fresh loader over the same corpus, lets the buffer fill, then times
``--batches`` batches and reports:

* **trainer CPU ms/batch**: CPU time of this (the training) process per batch received,
  i.e. what the loader takes from the training loop;
* **loader ms/batch**: wall time per batch while the loop does nothing else, i.e. the rate the
  workers sustain (on a 2-core machine, workers and trainer share the cores);
* **state_dict / torch.save**: one checkpoint's loader state, and its size;
* **resume s**: a new loader given that state, until its first batch (what a restart waits:
  worker start, snapshot restore, and the replay of up to ``state_every - 1`` batches per
  worker), with the rows it had to replay.

Nothing is asserted on time. Usage::

    python benchmarks/bench_loader.py --buffers 1000,10000 --seq 512 --batch 32 --workers 2
    python benchmarks/bench_loader.py --corpus 'my_corpus/*.jsonl' --tokenizer tokenizers/bert-base-uncased
"""
from __future__ import annotations

import argparse
import io
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import load_average, markdown_table, parse_int_list  # noqa: E402
from toolkit.data import CorpusConfig, build_loader  # noqa: E402
from toolkit.errors import ConfigError, ToolkitError  # noqa: E402
from toolkit.models.encoder import load_tokenizer  # noqa: E402

DEFAULT_TOKENIZER = ROOT / "tokenizers" / "bert-base-uncased"


def default_corpus() -> List[str]:
    """The State of the Union speeches the demo uses (real English text), one paragraph per line."""
    from toolkit.demo.resources import sotu_dir

    return [str(sotu_dir() / "*.txt")]


def smoke_corpus(folder: Path, vocab: Path, docs: int = 60) -> List[str]:
    """A small corpus of random vocabulary words (for ``--smoke``: no demo resources needed)."""
    words = [w for w in vocab.read_text(encoding="utf-8").split() if w.isalpha() and len(w) > 2]
    rng = random.Random(0)
    path = folder / "smoke.txt"
    path.write_text("\n".join(" ".join(rng.choices(words, k=rng.randint(40, 200))) + "." for _ in range(docs)),
                    encoding="utf-8")
    return [str(path)]


def measure(sources: List[str], tokenizer: Any, buffer: int, every: int, args: argparse.Namespace) -> Dict[str, Any]:
    cfg = CorpusConfig(sources=sources, seq_length=args.seq, shuffle_buffer=buffer, num_workers=args.workers,
                       doc_separator="line", epochs=0, state_every=every, seed=1)
    loader = build_loader(cfg, tokenizer, args.batch)
    it = iter(loader)
    for _ in range(buffer // args.batch + 2 * every + 2):   # fill the buffer; reach steady state
        next(it)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for _ in range(args.batches):
        next(it)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    t0 = time.perf_counter()
    state = loader.state_dict()
    t_state = time.perf_counter() - t0
    buf = io.BytesIO()
    t0 = time.perf_counter()
    torch.save(state, buf)
    t_save = time.perf_counter() - t0
    expected = next(it)
    del it
    replay = sum(w["skip_rows"] for w in state["workers"])
    resumed = build_loader(cfg, tokenizer, args.batch)
    t0 = time.perf_counter()
    resumed.load_state_dict(state)
    first = next(iter(resumed))
    t_resume = time.perf_counter() - t0
    if not all(torch.equal(first[k], expected[k]) for k in expected):
        raise ToolkitError(f"resume check failed (buffer {buffer}, state_every {every}): the resumed loader's "
                           f"first batch differs from the uninterrupted one")
    return {"buffer": buffer, "state_every": every, "trainer_cpu_ms": 1e3 * cpu / args.batches,
            "loader_ms": 1e3 * wall / args.batches, "state_dict_s": t_state, "save_s": t_save,
            "state_mib": buf.tell() / 2 ** 20, "resume_s": t_resume, "replayed_rows": replay}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--buffers", default="1000,10000", help="shuffle_buffer sizes")
    ap.add_argument("--state-every", default="1,32", help="state_every values (1 = a snapshot with every batch)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=64, help="timed batches per setting")
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (median reported)")
    ap.add_argument("--corpus", action="append", help="corpus sources (default: the demo's SOTU speeches)")
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--smoke", action="store_true", help="tiny synthetic corpus and sizes (tests)")
    args = ap.parse_args(argv)
    try:
        buffers = parse_int_list(args.buffers, "--buffers")
        everies = parse_int_list(args.state_every, "--state-every")
        for name in ("seq", "batch", "batches", "repeats"):
            if getattr(args, name) < 1:
                raise ConfigError(f"--{name}", f"must be >= 1, got {getattr(args, name)}")
        if min(everies) < 1:
            raise ConfigError("--state-every", f"values must be >= 1, got {everies}")
        tokenizer = load_tokenizer(args.tokenizer)
        with tempfile.TemporaryDirectory() as tmp:
            sources = (smoke_corpus(Path(tmp), Path(args.tokenizer) / "vocab.txt") if args.smoke
                       else args.corpus or default_corpus())
            print(f"torch {torch.__version__}, seq {args.seq}, batch {args.batch}, {args.workers} workers, "
                  f"{args.batches} timed batches x {args.repeats}, loadavg {load_average()}\n", flush=True)
            rows = []
            for buffer in buffers:
                for every in everies:
                    runs = [measure(sources, tokenizer, buffer, every, args) for _ in range(args.repeats)]
                    r = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
                    rows.append([buffer, every, f"{r['trainer_cpu_ms']:.2f}", f"{r['loader_ms']:.1f}",
                                 f"{r['state_dict_s']:.2f}", f"{r['save_s']:.2f}", f"{r['state_mib']:.1f}",
                                 f"{r['resume_s']:.2f}", f"{r['replayed_rows']:.0f}"])
                    print(f"buffer {buffer} state_every {every}: trainer CPU {r['trainer_cpu_ms']:.2f} ms/batch, "
                          f"loader {r['loader_ms']:.1f} ms/batch", flush=True)
    except (ConfigError, ToolkitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(markdown_table(["shuffle_buffer", "state_every", "trainer CPU ms/batch", "loader ms/batch",
                          "state_dict s", "torch.save s", "state MiB", "resume s (to first batch)",
                          "rows replayed"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
