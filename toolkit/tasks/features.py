"""Examples -> model inputs, dynamic-padding collate, and model outputs -> task predictions.

:func:`encode_examples` tokenizes a split once into an :class:`EncodedSplit`: a torch
``Dataset`` of dicts of unpadded tensors (``input_ids``, ``attention_mask``,
``token_type_ids``, ``labels`` when the split is labelled, ``choice_mask`` for multiple
choice) plus the metadata :func:`decode_predictions` needs to map logits back to examples.
Encoders and decoders are registries keyed by task type.

Span (QA) windows follow the original BERT/ERNIE convention: ``doc_stride`` is the step, in
context tokens, between the starts of consecutive windows (capped at the room a window has,
so ``doc_stride >= room`` gives non-overlapping windows).

Tokenizers of both families work: WordPiece (BERT, ERNIE) and SentencePiece (XLM-R layout,
``▁`` word-start marks). For pre-split tokens (token classification) a SentencePiece tokenizer
marks a word as space-separated only where running text would have a space, so the characters
of a Chinese sentence stay one piece each instead of a lone ``▁`` before every character.
"""
from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from toolkit.errors import ConfigError, DataError, ToolkitError
from toolkit.models.span import SpanFeature, postprocess_span_predictions
from toolkit.tasks.base import (CLASSIFICATION, MULTIPLE_CHOICE, REGRESSION, SPAN, TOKEN_CLASSIFICATION,
                                ChoiceExample, Example, SpanExample, Task, TextExample, TokenExample)

IGNORE_INDEX = -100
# Pad value per key in collate; everything else pads with 0 (input_ids: the tokenizer's pad id).
PAD_VALUES: Dict[str, int] = {"labels": IGNORE_INDEX}


@dataclass
class EncodedSplit(Dataset):
    """A tokenized split: ``items[i]`` is the model input dict of feature ``i``.

    Attributes:
        task_type: the task type the split was encoded for.
        items: per feature, 1-D tensors of length L (``[C, L]`` and ``choice_mask [C]`` for
            multiple choice); ``labels`` only when ``has_labels``.
        examples: the source examples.
        feature_to_example: example index of every feature (several per example for span).
        has_labels: whether ``items`` carry ``labels``.
        span_features: per feature, example index and context offsets (span only).
        word_ids: per feature, the word index of every token (token classification only).
        num_choices: choices per example after padding (multiple choice only).
        pad_token_id: what :meth:`collate` pads ``input_ids`` with.
    """

    task_type: str
    items: List[Dict[str, torch.Tensor]]
    examples: List[Example]
    feature_to_example: List[int]
    has_labels: bool
    span_features: List[SpanFeature] = field(default_factory=list)
    word_ids: List[List[Optional[int]]] = field(default_factory=list)
    num_choices: int = 0
    pad_token_id: int = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Dict[str, torch.Tensor]:
        return self.items[i]

    @property
    def collate_fn(self) -> Callable[[List[Dict[str, torch.Tensor]]], Dict[str, torch.Tensor]]:
        """:func:`collate` bound to this split's pad id (pass to ``DataLoader``)."""
        return functools.partial(collate, pad_token_id=self.pad_token_id)


def collate(batch: List[Dict[str, torch.Tensor]], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """Stack feature dicts, right-padding the last dimension to the longest in the batch.

    Returns:
        dict of ``[B, L]`` (or ``[B, C, L]``) tensors; ``labels`` pad with -100.
    """
    if not batch:
        raise ToolkitError("collate got an empty batch")
    keys = list(batch[0])
    out: Dict[str, torch.Tensor] = {}
    for key in keys:
        if any(key not in b for b in batch):
            raise ToolkitError(f"collate: feature key '{key}' missing from some items (mixed labelled "
                               f"and unlabelled features?)")
        tensors = [b[key] for b in batch]
        if tensors[0].dim() == 0:
            out[key] = torch.stack(tensors)
            continue
        longest = max(t.size(-1) for t in tensors)
        value = pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
        padded = [t if t.size(-1) == longest else
                  torch.nn.functional.pad(t, (0, longest - t.size(-1)), value=value) for t in tensors]
        out[key] = torch.stack(padded)
    return out


# ----------------------------------------------------------------------------------------
# encoding


@dataclass
class _Settings:
    max_seq_length: int
    doc_stride: int
    max_query_length: int


def _where(task: Task) -> Any:
    return getattr(task, "data_dir", None)


def _labelled(task: Task, examples: Sequence[Example], has: Callable[[Any], bool]) -> bool:
    """True if every example has a label, False if none; DataError on a mix."""
    flags = [has(e) for e in examples]
    if all(flags):
        return bool(flags)
    if any(flags):
        bad = examples[flags.index(False)]
        raise DataError(_where(task), f"task '{task.name}': example {bad.guid!r} has no label while others "
                        f"do; a split must be fully labelled (train/dev) or unlabelled (test)")
    return False


def _pair_tensors(enc: Dict[str, List[int]]) -> Dict[str, torch.Tensor]:
    out = {"input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
           "attention_mask": torch.tensor(enc["attention_mask"], dtype=torch.long)}
    tt = enc.get("token_type_ids")
    out["token_type_ids"] = (torch.tensor(tt, dtype=torch.long) if tt is not None
                             else torch.zeros_like(out["input_ids"]))
    return out


def _encode_text(task: Task, examples: Sequence[TextExample], tokenizer: Any, s: _Settings) -> EncodedSplit:
    labelled = _labelled(task, examples, lambda e: e.label is not None)
    items = []
    for i, ex in enumerate(examples):
        enc = tokenizer(ex.text_a, ex.text_b, truncation=True, max_length=s.max_seq_length)
        item = _pair_tensors(enc)
        if labelled:
            if task.task_type == REGRESSION:
                try:
                    value = float(ex.label)  # type: ignore[arg-type]
                except (TypeError, ValueError):
                    raise DataError(_where(task), f"task '{task.name}': example {ex.guid!r} has a "
                                    f"non-numeric regression label {ex.label!r}") from None
                item["labels"] = torch.tensor(value, dtype=torch.float)
            else:
                item["labels"] = torch.tensor(task.label_to_id(ex.label), dtype=torch.long)
        items.append(item)
    return EncodedSplit(task.task_type, items, list(examples), list(range(len(examples))), labelled)


def _truncate_questions(questions: List[str], tokenizer: Any, max_query_length: int) -> List[Tuple[str, int]]:
    """Cut each question at its ``max_query_length``-th token (by character offsets).

    Returns:
        (question text, its token count) per question.
    """
    # leading spaces make some tokenizers emit empty tokens
    qs = [q.lstrip() for q in questions]
    enc = tokenizer(qs, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for q, offsets in zip(qs, enc["offset_mapping"]):
        if len(offsets) > max_query_length:
            q = q[:offsets[max_query_length - 1][1]]
        out.append((q, min(len(offsets), max_query_length)))
    return out


def _answer_span(ex: SpanExample) -> Optional[Tuple[int, int]]:
    """Character span ``[start, end)`` of the first answer, None if unanswerable."""
    if ex.is_impossible or not ex.answers:
        return None
    ans = ex.answers[0]
    start = int(ans.get("answer_start", -1))
    text = str(ans.get("text", ""))
    if start < 0 or not text:
        return None
    return start, start + len(text)


def _encode_span(task: Task, examples: Sequence[SpanExample], tokenizer: Any, s: _Settings) -> EncodedSplit:
    labelled = any(ex.answers or ex.is_impossible for ex in examples)
    n_special = tokenizer.num_special_tokens_to_add(pair=True)
    items, f2e, span_feats = [], [], []
    questions = _truncate_questions([ex.question for ex in examples], tokenizer, s.max_query_length)
    for ei, (ex, (question, q_len)) in enumerate(zip(examples, questions)):
        room = s.max_seq_length - q_len - n_special
        if room < 1:
            raise ConfigError("max_seq_length", f"{s.max_seq_length} leaves no room for context after a "
                              f"{q_len}-token question; raise it or lower max_query_length")
        # The tokenizer's ``stride`` is the overlap between windows; ours is the step.
        overlap = room - min(s.doc_stride, room)
        enc = tokenizer(question, ex.context, truncation="only_second", max_length=s.max_seq_length,
                        stride=overlap, return_overflowing_tokens=True, return_offsets_mapping=True)
        answer = _answer_span(ex) if labelled else None
        for wi in range(len(enc["input_ids"])):
            seq_ids = enc.sequence_ids(wi)
            offsets = [_skip_space(ex.context, o) if sid == 1 else None
                       for o, sid in zip(enc["offset_mapping"][wi], seq_ids)]
            item = _pair_tensors({k: enc[k][wi] for k in ("input_ids", "attention_mask", "token_type_ids")
                                  if k in enc})
            if labelled:
                item["labels"] = torch.tensor(_window_positions(offsets, answer), dtype=torch.long)
            items.append(item)
            f2e.append(ei)
            span_feats.append(SpanFeature(ei, offsets))
    return EncodedSplit(task.task_type, items, list(examples), f2e, labelled, span_features=span_feats)


def _skip_space(text: str, offset: Sequence[int]) -> Tuple[int, int]:
    """A token's character span without the space before it (SentencePiece's ``▁word`` pieces
    cover it), so answers sliced from the context start at the word."""
    start, end = int(offset[0]), int(offset[1])
    while start < end - 1 and text[start].isspace():
        start += 1
    return start, end


def _window_positions(offsets: List[Optional[Tuple[int, int]]], answer: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """Token (start, end) of the answer in this window; (0, 0) (CLS) if absent or not inside."""
    if answer is None:
        return 0, 0
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    if not ctx:
        return 0, 0
    a_start, a_end = answer
    first, last = ctx[0], ctx[-1]
    if offsets[first][0] > a_start or offsets[last][1] < a_end:
        return 0, 0
    start = first
    while start + 1 <= last and offsets[start + 1][0] <= a_start:
        start += 1
    end = last
    while end - 1 >= start and offsets[end - 1][1] >= a_end:
        end -= 1
    return start, end


# Scripts written without spaces between words (CJK ideographs and punctuation, kana, full-width forms).
_NO_SPACE = re.compile("[\u2e80-\u2fdf\u3000-\u303f\u3040-\u30ff\u3100-\u312f\u31a0-\u31ff\u3400-\u4dbf"
                       "\u4e00-\u9fff\uf900-\ufaff\ufe30-\ufe4f\uff00-\uffef\U00020000-\U0003ffff]")


def _metaspace_nodes(node: Any) -> List[Dict[str, Any]]:
    """The Metaspace pre-tokenizers inside a tokenizer.json ``pre_tokenizer`` entry."""
    if isinstance(node, dict):
        found = [node] if node.get("type") == "Metaspace" else []
        for v in node.values():
            found += _metaspace_nodes(v)
        return found
    if isinstance(node, list):
        return [m for v in node for m in _metaspace_nodes(v)]
    return []


def word_encoder(tokenizer: Any) -> Tuple[Any, Callable[[Sequence[str]], List[str]]]:
    """How to encode pre-split words: ``(tokenizer, prepare)``, then
    ``tokenizer(prepare(words), is_split_into_words=True)``.

    For WordPiece tokenizers this is the tokenizer itself and the words unchanged. A
    SentencePiece (metaspace) tokenizer would put ``▁`` before every word; instead a copy that
    never adds it is returned, and ``prepare`` writes the ``▁`` itself before the words that
    running text separates by a space: not next to a character of a script written without
    spaces (Chinese, Japanese).
    """
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    data = json.loads(backend.to_str()) if backend is not None else {}
    nodes = _metaspace_nodes(data.get("pre_tokenizer"))
    if not nodes:
        return tokenizer, list
    marker = str(nodes[0].get("replacement", "\u2581"))
    for node in nodes:
        node["prepend_scheme"] = "never"
        node.pop("add_prefix_space", None)   # the pre-0.19 spelling of the same switch
    bare = copy.copy(tokenizer)
    bare._tokenizer = Tokenizer.from_str(json.dumps(data))

    def prepare(words: Sequence[str]) -> List[str]:
        out = []
        for i, w in enumerate(words):
            joined = _NO_SPACE.match(w[:1]) or (i > 0 and _NO_SPACE.match(words[i - 1][-1:]))
            out.append(w if (joined or not w) else marker + w)
        return out

    return bare, prepare


def _encode_tokens(task: Task, examples: Sequence[TokenExample], tokenizer: Any, s: _Settings) -> EncodedSplit:
    labelled = _labelled(task, examples, lambda e: e.labels is not None)
    tokenizer, prepare = word_encoder(tokenizer)
    items, word_ids = [], []
    for ex in examples:
        if labelled and len(ex.labels) != len(ex.tokens):  # type: ignore[arg-type]
            raise DataError(_where(task), f"task '{task.name}': example {ex.guid!r} has {len(ex.tokens)} "
                            f"tokens but {len(ex.labels)} labels")  # type: ignore[arg-type]
        enc = tokenizer(prepare(list(ex.tokens)), is_split_into_words=True, truncation=True,
                        max_length=s.max_seq_length)
        wids = enc.word_ids()
        item = _pair_tensors(enc)
        if labelled:
            ids = [task.label_to_id(lab) for lab in ex.labels]  # type: ignore[union-attr]
            tags, prev = [], None
            for w in wids:
                # Only the first sub-token of a word carries its label.
                tags.append(ids[w] if w is not None and w != prev else IGNORE_INDEX)
                prev = w
            item["labels"] = torch.tensor(tags, dtype=torch.long)
        items.append(item)
        word_ids.append(wids)
    return EncodedSplit(task.task_type, items, list(examples), list(range(len(examples))), labelled,
                        word_ids=word_ids)


def _encode_choices(task: Task, examples: Sequence[ChoiceExample], tokenizer: Any, s: _Settings) -> EncodedSplit:
    labelled = _labelled(task, examples, lambda e: e.label is not None)
    counts = [len(ex.choices) for ex in examples]
    num_choices = task.num_choices or max(counts, default=0)
    for ex, c in zip(examples, counts):
        if c < 1 or c > num_choices:
            raise DataError(_where(task), f"task '{task.name}': example {ex.guid!r} has {c} choices; "
                            f"expected 1..{num_choices}")
        if labelled and not 0 <= int(ex.label) < c:  # type: ignore[arg-type]
            raise DataError(_where(task), f"task '{task.name}': example {ex.guid!r} has label {ex.label} "
                            f"but only {c} choices (labels are 0-based choice indices)")
    filler = _pair_tensors(tokenizer("", truncation=True, max_length=s.max_seq_length))
    items = []
    for ex in examples:
        seconds = [f"{ex.question} {c}".strip() if ex.question else c for c in ex.choices]
        enc = tokenizer([ex.context] * len(seconds), seconds, truncation="longest_first",
                        max_length=s.max_seq_length)
        rows = [_pair_tensors({k: enc[k][j] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc})
                for j in range(len(seconds))]
        # Padded choices are a bare [CLS] [SEP] so attention never sees an all-masked row.
        rows += [filler] * (num_choices - len(rows))
        item = collate(rows, pad_token_id=tokenizer.pad_token_id or 0)  # [C, L_example]
        mask = torch.zeros(num_choices, dtype=torch.long)
        mask[:len(seconds)] = 1
        item["choice_mask"] = mask
        if labelled:
            item["labels"] = torch.tensor(int(ex.label), dtype=torch.long)  # type: ignore[arg-type]
        items.append(item)
    return EncodedSplit(task.task_type, items, list(examples), list(range(len(examples))), labelled,
                        num_choices=num_choices)


ENCODERS: Dict[str, Callable[[Task, Sequence[Any], Any, _Settings], EncodedSplit]] = {
    CLASSIFICATION: _encode_text,
    REGRESSION: _encode_text,
    SPAN: _encode_span,
    TOKEN_CLASSIFICATION: _encode_tokens,
    MULTIPLE_CHOICE: _encode_choices,
}

_EXAMPLE_TYPES = {CLASSIFICATION: TextExample, REGRESSION: TextExample, SPAN: SpanExample,
                  TOKEN_CLASSIFICATION: TokenExample, MULTIPLE_CHOICE: ChoiceExample}


def encode_examples(task: Task, examples: Sequence[Example], tokenizer: Any, max_seq_length: int = 128,
                    doc_stride: int = 128, max_query_length: int = 64) -> EncodedSplit:
    """Tokenize ``examples`` of ``task`` into model inputs.

    Args:
        task: gives ``task_type``, ``labels`` / ``label_to_id`` and ``num_choices``.
        examples: examples of the dataclass matching the task type.
        tokenizer: a fast tokenizer (offset mappings and word ids are needed).
        max_seq_length: tokens per sequence (per choice for multiple choice), specials included.
        doc_stride: span only: step in context tokens between window starts.
        max_query_length: span only: questions are cut to this many tokens.
    """
    if task.task_type not in ENCODERS:
        raise ConfigError("task_type", f"task '{task.name}' has unknown type {task.task_type!r}; "
                          f"known: {sorted(ENCODERS)}")
    for name, value in (("max_seq_length", max_seq_length), ("doc_stride", doc_stride),
                        ("max_query_length", max_query_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(name, f"must be a positive integer, got {value!r}")
    if not getattr(tokenizer, "is_fast", False):
        raise ToolkitError(f"task '{task.name}': encoding needs a fast tokenizer (got {type(tokenizer).__name__})")
    expected = _EXAMPLE_TYPES[task.task_type]
    for ex in examples:
        if not isinstance(ex, expected):
            raise ToolkitError(f"task '{task.name}' ({task.task_type}) expects {expected.__name__} "
                               f"examples, got {type(ex).__name__}")
    split = ENCODERS[task.task_type](task, list(examples), tokenizer,
                                     _Settings(max_seq_length, doc_stride, max_query_length))
    split.pad_token_id = tokenizer.pad_token_id or 0
    return split


# ----------------------------------------------------------------------------------------
# decoding


def _rows(logits: Any, row_ndim: int) -> List[np.ndarray]:
    """Per-feature numpy rows from a tensor/array ``[F, ...]`` or a list of batches or rows.

    Lists may mix batches of different padded lengths (dynamic padding), hence rows.
    """
    def to_np(x: Any) -> np.ndarray:
        if isinstance(x, torch.Tensor):
            return x.detach().float().cpu().numpy()
        return np.asarray(x, dtype=np.float64)

    parts = [logits] if isinstance(logits, (torch.Tensor, np.ndarray)) else list(logits)
    rows: List[np.ndarray] = []
    for part in parts:
        arr = to_np(part)
        if arr.ndim == row_ndim + 1:
            rows.extend(arr)
        elif arr.ndim == row_ndim:
            rows.append(arr)
        else:
            raise ToolkitError(f"logits have {arr.ndim} dims; expected rows of {row_ndim} dims or "
                               f"batches of {row_ndim + 1}")
    return rows


def _check_count(encoded: EncodedSplit, rows: List[np.ndarray]) -> None:
    if len(rows) != len(encoded):
        raise ToolkitError(f"got logits for {len(rows)} features but the encoded split has {len(encoded)}; "
                           f"decode with the split the model ran on (no shuffling, no dropped last batch)")


def _label_set(task: Task, width: int) -> List[str]:
    """The task's labels, checked against the logits' width."""
    labels = list(task.labels or [])
    if width and len(labels) != width:
        raise ConfigError("labels", f"task '{task.name}' has {len(labels)} labels but the logits have "
                          f"{width} columns; the head was trained for a different label set")
    return labels


def _decode_classification(task: Task, encoded: EncodedSplit, logits: Any, **kw: Any) -> List[str]:
    rows = _rows(logits, 1)
    _check_count(encoded, rows)
    labels = _label_set(task, rows[0].shape[-1] if rows else 0)
    return [labels[int(np.argmax(r))] for r in rows]


def _decode_regression(task: Task, encoded: EncodedSplit, logits: Any, **kw: Any) -> List[float]:
    rows = _rows(logits, 0) if not _is_column(logits) else [r.reshape(()) for r in _rows(logits, 1)]
    _check_count(encoded, rows)
    return [float(r) for r in rows]


def _is_column(logits: Any) -> bool:
    """A regression output shaped ``[N, 1]`` (or batches of it)."""
    first = logits if isinstance(logits, (torch.Tensor, np.ndarray)) else (list(logits) or [None])[0]
    shape = getattr(first, "shape", None)
    return shape is not None and len(shape) == 2 and shape[-1] == 1


def _decode_span(task: Task, encoded: EncodedSplit, logits: Any, **kw: Any) -> Any:
    rows = _rows(logits, 2)  # each [L, 2]
    _check_count(encoded, rows)
    v2 = bool(getattr(task, "version_2_with_negative", False))
    preds, odds = postprocess_span_predictions(
        encoded.examples, encoded.span_features, [r[:, 0] for r in rows], [r[:, 1] for r in rows],
        version_2_with_negative=v2, **kw)
    answers = [preds[ex.guid] for ex in encoded.examples]  # type: ignore[union-attr]
    return (answers, odds) if v2 else answers


def _decode_tokens(task: Task, encoded: EncodedSplit, logits: Any, **kw: Any) -> List[List[str]]:
    rows = _rows(logits, 2)  # each [L, num_labels]
    _check_count(encoded, rows)
    labels = _label_set(task, rows[0].shape[-1] if rows else 0)
    # Words with no sub-token (truncated away, or dropped by the tokenizer) get the outside tag.
    fallback = "O" if "O" in labels else labels[0]
    out = []
    for ex, wids, r in zip(encoded.examples, encoded.word_ids, rows):
        tags = [fallback] * len(ex.tokens)  # type: ignore[union-attr]
        seen = set()
        for pos, w in enumerate(wids[:len(r)]):
            if w is None or w in seen:
                continue
            seen.add(w)
            tags[w] = labels[int(np.argmax(r[pos]))]
        out.append(tags)
    return out


def _decode_choices(task: Task, encoded: EncodedSplit, logits: Any, **kw: Any) -> List[int]:
    rows = _rows(logits, 1)
    _check_count(encoded, rows)
    out = []
    for item, r in zip(encoded.items, rows):
        mask = item["choice_mask"].numpy().astype(bool)[:len(r)]
        out.append(int(np.argmax(np.where(mask, r[:len(mask)], -np.inf))))
    return out


DECODERS: Dict[str, Callable[..., Any]] = {
    CLASSIFICATION: _decode_classification,
    REGRESSION: _decode_regression,
    SPAN: _decode_span,
    TOKEN_CLASSIFICATION: _decode_tokens,
    MULTIPLE_CHOICE: _decode_choices,
}


def decode_predictions(task: Task, encoded: EncodedSplit, logits: Any, **span_options: Any) -> Any:
    """Model logits of every feature of ``encoded`` -> predictions aligned with its examples.

    Args:
        task: the task the split was encoded for.
        encoded: the :class:`EncodedSplit` the model ran on, in order.
        logits: ``[F, ...]`` tensor/array, or a list of per-batch tensors (any padded length).
        span_options: span only: ``n_best_size``, ``max_answer_length``, ``null_score_diff_threshold``.

    Returns:
        label strings (classification), floats (regression), answer strings (span; for tasks
        with ``version_2_with_negative = True`` a tuple ``(answers, null_odds {qid: float})``),
        tag lists per word (token classification), choice indices (multiple choice).
    """
    if task.task_type != encoded.task_type:
        raise ToolkitError(f"task '{task.name}' is {task.task_type} but the split was encoded as {encoded.task_type}")
    return DECODERS[task.task_type](task, encoded, logits, **span_options)
