"""BERT pre-training packing: documents -> fixed-length ``[CLS] A [SEP] B [SEP]`` sequences.

The special tokens are the tokenizer's own (:func:`toolkit.models.encoder.special_layout`):
``[CLS] A [SEP] B [SEP]`` with B of token type 1 for BERT/ERNIE WordPiece, ``<s> A </s> </s> B
</s>`` with every token of type 0 for XLM-R-style SentencePiece, so the student is distilled on
the inputs that fine-tuning will give it.

Follows Google BERT's ``create_instances_from_document`` without next-sentence prediction:
consecutive sentences of *one* document are gathered greedily up to a target length (the full
``seq_length - 3`` tokens, or with probability ``short_seq_prob`` a random shorter one) and the
chunk is split into A and B at a random sentence boundary. Unlike BERT nothing is truncated
away: a sentence longer than a sequence is cut into pieces, and a chunk never exceeds the
length, so every token of the document lands in exactly one sequence.

A packed row is ``(ids, n_a)``: ``ids`` the unpadded int32 token ids with the special tokens,
``n_a`` where token type 1 starts (the length of ``[CLS] A [SEP]``; the whole row for layouts
that keep B at type 0). Padding happens only when
samples are emitted, which keeps shuffle buffers and resume states small.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch

from toolkit.errors import ToolkitError
from toolkit.models.encoder import special_layout

Row = Tuple[np.ndarray, int]

# Western ends need whitespace after them so "3.5" or "e.g.x" stay whole; CJK ends split always.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|(?<=[。！？])")


def split_sentences(text: str) -> List[str]:
    """Split a document into sentences: on newlines, on ``.!?`` + whitespace, after ``。！？``."""
    out: List[str] = []
    for line in text.splitlines():
        for piece in _SENTENCE_END.split(line):
            piece = piece.strip()
            if piece:
                out.append(piece)
    return out


@dataclass
class PackResult:
    """Rows of one document plus what packing had to cut."""

    rows: List[Row]
    tokens: int
    cut_sentences: int


class SequencePacker:
    """Tokenizes documents and packs them into BERT sequences of ``seq_length`` tokens.

    Args:
        tokenizer: a fast Hugging Face tokenizer with a pad token and a sentence-pair template.
        seq_length: total length including the special tokens.
        short_seq_prob: probability of targeting a random shorter length for a sequence.
    """

    def __init__(self, tokenizer: Any, seq_length: int, short_seq_prob: float = 0.1):
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.short_seq_prob = short_seq_prob
        ids = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("cls", "sep", "pad")}
        missing = [k for k, v in ids.items() if v is None]
        if missing:
            raise ToolkitError(f"tokenizer has no {', '.join(m.upper() for m in missing)} token: packing needs "
                               "a classifier, a separator and a padding token ([CLS]/[SEP]/[PAD] or <s>/</s>/<pad>)")
        self.layout = special_layout(tokenizer)
        if self.layout.type_a != 0 or self.layout.type_b not in (0, 1):
            raise ToolkitError(f"tokenizer {type(tokenizer).__name__} gives token types {self.layout.type_a}/"
                               f"{self.layout.type_b} to the two segments; packing supports 0/1 and 0/0")
        self.max_tokens = seq_length - self.layout.num_pair_specials
        if self.max_tokens < 1:
            raise ToolkitError(f"seq_length {seq_length} leaves no room for text next to the tokenizer's "
                               f"{self.layout.num_pair_specials} special tokens")
        self.pad_id = tokenizer.pad_token_id

    def tokenize(self, text: str) -> List[List[int]]:
        """Sentence token ids without special tokens; empty sentences dropped."""
        sentences = split_sentences(text)
        if not sentences:
            return []
        enc = self.tokenizer(sentences, add_special_tokens=False, return_attention_mask=False,
                             return_token_type_ids=False, verbose=False)
        return [ids for ids in enc["input_ids"] if ids]

    def _target(self, rng: np.random.Generator) -> int:
        if self.short_seq_prob > 0 and rng.random() < self.short_seq_prob:
            return int(rng.integers(2, self.max_tokens + 1)) if self.max_tokens >= 2 else self.max_tokens
        return self.max_tokens

    def _emit(self, chunk: List[List[int]], rng: np.random.Generator) -> Row:
        a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else len(chunk)
        a = [t for s in chunk[:a_end] for t in s]
        b = [t for s in chunk[a_end:] for t in s]
        ids, n_a = self.layout.build(a, b or None)
        if self.layout.type_b == self.layout.type_a:
            n_a = len(ids)
        return np.asarray(ids, dtype=np.int32), n_a

    def pack(self, sentences: Sequence[List[int]], rng: np.random.Generator) -> PackResult:
        """Pack one document's sentences.

        Args:
            sentences: token ids per sentence, no special tokens.
            rng: the document's generator (seeded from its identity, so packing is reproducible).

        Returns:
            rows of at most ``seq_length`` ids each; a single-sentence chunk is ``[CLS] A [SEP]``
            (the tokenizer's one-segment template).
        """
        pieces: List[List[int]] = []
        cuts = 0
        for s in sentences:
            if len(s) <= self.max_tokens:
                pieces.append(list(s))
                continue
            # Cut rather than truncate: BERT drops the excess, we keep every token.
            parts = [list(s[i:i + self.max_tokens]) for i in range(0, len(s), self.max_tokens)]
            cuts += len(parts) - 1
            pieces.extend(parts)
        rows: List[Row] = []
        chunk: List[List[int]] = []
        length = 0
        target = self._target(rng)
        for piece in pieces:
            if chunk and length + len(piece) > self.max_tokens:
                rows.append(self._emit(chunk, rng))
                chunk, length, target = [], 0, self._target(rng)
            chunk.append(piece)
            length += len(piece)
            if length >= target:
                rows.append(self._emit(chunk, rng))
                chunk, length, target = [], 0, self._target(rng)
        if chunk:
            rows.append(self._emit(chunk, rng))
        return PackResult(rows, sum(len(p) for p in pieces), cuts)

    def pack_text(self, text: str, rng: np.random.Generator) -> PackResult:
        """Split, tokenize and pack one document."""
        return self.pack(self.tokenize(text), rng)


def pad_rows(rows: Sequence[Row], seq_length: int, pad_id: int) -> Dict[str, torch.Tensor]:
    """Pad packed rows into a batch.

    Returns:
        ``input_ids``, ``attention_mask``, ``token_type_ids``: torch.long ``[len(rows), seq_length]``.
    """
    n = len(rows)
    input_ids = np.full((n, seq_length), pad_id, dtype=np.int64)
    attention = np.zeros((n, seq_length), dtype=np.int64)
    types = np.zeros((n, seq_length), dtype=np.int64)
    for i, (ids, n_a) in enumerate(rows):
        length = len(ids)
        input_ids[i, :length] = ids
        attention[i, :length] = 1
        types[i, n_a:length] = 1
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
            "token_type_ids": torch.from_numpy(types)}


def pad_row(row: Row, seq_length: int, pad_id: int) -> Dict[str, torch.Tensor]:
    """One padded sample: each tensor torch.long ``[seq_length]``."""
    return {k: v[0] for k, v in pad_rows([row], seq_length, pad_id).items()}
