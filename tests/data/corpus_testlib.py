"""Corpus test helpers (imported by the tests/data modules): documents whose sentences carry their document id.

Document ``k`` has ``1 + k % 3`` sentences; each starts with ``k`` spelled as three digit words
(``one``=0 ... ``ten``=9). No other word is a digit word, so the ids in any packed batch can be
read back and counted: each document must show up exactly ``1 + k % 3`` times per epoch.
"""
from __future__ import annotations

import collections
from pathlib import Path
from typing import Counter, Dict, Iterable, List

import torch

DIGITS = "one two three four five six seven eight nine ten".split()
FILLERS = ["the cat sat on the mat", "a dog ran fast", "the movie was really good", "we love music and art",
           "my friend read the book at home", "the team won the game"]


def sentences_of(k: int) -> int:
    return 1 + k % 3


def doc_text(k: int, sep: str = " ") -> str:
    """Document ``k``: its sentences joined by ``sep``."""
    tag = " ".join(DIGITS[int(c)] for c in f"{k:03d}")
    return sep.join(f"{tag} {FILLERS[(k + i) % len(FILLERS)]}." for i in range(sentences_of(k)))


def expected_counts(ids: Iterable[int], epochs: int = 1) -> Counter:
    return collections.Counter({k: sentences_of(k) * epochs for k in ids})


def count_ids(batches: Iterable[Dict[str, torch.Tensor]], tok) -> Counter:
    """Document id -> sentence occurrences over batches of ``input_ids``."""
    digit_ids = {tok.convert_tokens_to_ids(w): i for i, w in enumerate(DIGITS)}
    counts: Counter = collections.Counter()
    for batch in batches:
        ids = batch["input_ids"]
        for row in ids.view(-1, ids.shape[-1]).tolist():
            digits = [digit_ids[t] for t in row if t in digit_ids]
            assert len(digits) % 3 == 0, row
            for i in range(0, len(digits), 3):
                counts[digits[i] * 100 + digits[i + 1] * 10 + digits[i + 2]] += 1
    return counts


def write_text(path: Path, ids: List[int], separator: str = "blank_line") -> Path:
    if separator == "line":
        path.write_text("".join(doc_text(k) + "\n" for k in ids), encoding="utf-8")
    else:
        path.write_text("".join(doc_text(k, "\n") + "\n\n" for k in ids), encoding="utf-8")
    return path
