"""Packing into BERT sequences, and CorpusConfig validation."""
from __future__ import annotations

import numpy as np
import pytest

from toolkit.config import load_config
from toolkit.data import CorpusConfig, SequencePacker, pad_rows, split_sentences
from toolkit.errors import ConfigError, ToolkitError


def test_split_sentences():
    text = "The cat sat. Pi is 3.14 here! Really?  Yes\nnew line 你好。世界！对吗？好\n\n"
    assert split_sentences(text) == ["The cat sat.", "Pi is 3.14 here!", "Really?", "Yes", "new line 你好。",
                                     "世界！", "对吗？", "好"]
    assert split_sentences("  \n ") == []


def _check_rows(rows, seq_length, cls_id, sep_id):
    for ids, n_a in rows:
        ids = ids.tolist()
        assert 3 <= len(ids) <= seq_length
        assert ids[0] == cls_id and ids[-1] == sep_id and ids[n_a - 1] == sep_id
        assert ids.count(sep_id) == (1 if n_a == len(ids) else 2)
        assert cls_id not in ids[1:]


@pytest.mark.parametrize("short_seq_prob", [0.0, 0.5])
def test_pack_invariants_and_no_token_lost(short_seq_prob):
    cls_id, sep_id, pad_id = 2, 3, 0

    class FakeTok:  # packing only needs the special ids; sentences come pre-tokenized here
        cls_token_id, sep_token_id, pad_token_id = cls_id, sep_id, pad_id

    packer = SequencePacker(FakeTok(), seq_length=16, short_seq_prob=short_seq_prob)
    rng = np.random.default_rng(0)
    for trial in range(50):
        sentences = [list(rng.integers(10, 99, size=int(rng.integers(1, 30)))) for _ in range(int(rng.integers(1, 8)))]
        result = packer.pack(sentences, np.random.default_rng(trial))
        _check_rows(result.rows, 16, cls_id, sep_id)
        body = [t for ids, n_a in result.rows for t in ids.tolist() if t not in (cls_id, sep_id)]
        assert body == [t for s in sentences for t in s]  # order kept, nothing dropped
        assert result.cut_sentences == sum((len(s) - 1) // 13 for s in sentences)
        again = packer.pack(sentences, np.random.default_rng(trial))
        assert [r[0].tolist() for r in again.rows] == [r[0].tolist() for r in result.rows]
    batch = pad_rows(result.rows, 16, pad_id)
    for i, (ids, n_a) in enumerate(result.rows):
        n = len(ids)
        assert batch["input_ids"].shape == (len(result.rows), 16)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (16 - n)
        assert batch["token_type_ids"][i].tolist() == [0] * n_a + [1] * (n - n_a) + [0] * (16 - n)
        assert batch["input_ids"][i, n:].eq(pad_id).all()


def test_pack_splits_at_sentence_boundaries_and_short_targets():
    class FakeTok:
        cls_token_id, sep_token_id, pad_token_id = 2, 3, 0

    sentences = [[10 + i] * 3 for i in range(8)]  # 8 sentences of 3 tokens
    full = SequencePacker(FakeTok(), seq_length=15, short_seq_prob=0.0).pack(sentences, np.random.default_rng(1))
    # 12 tokens fit: 4 sentences per sequence, A/B split on a sentence boundary.
    assert [len(ids) for ids, _ in full.rows] == [15, 15]
    for ids, n_a in full.rows:
        assert (n_a - 2) % 3 == 0 and 1 <= (n_a - 2) // 3 <= 3
    short = SequencePacker(FakeTok(), seq_length=15, short_seq_prob=1.0)
    # Short targets are uniform in [2, 12]: over 20 documents some must give more sequences.
    counts = [len(short.pack(sentences, np.random.default_rng(seed)).rows) for seed in range(20)]
    assert min(counts) >= 2 and sum(counts) > 2 * 20


def test_long_document_with_real_tokenizer(tok):
    packer = SequencePacker(tok, seq_length=12, short_seq_prob=0.1)
    text = "the cat sat on the mat and the dog ran fast with my friend at home today. a dog ran. 你好。"
    result = packer.pack_text(text, np.random.default_rng(0))
    _check_rows(result.rows, 12, tok.cls_token_id, tok.sep_token_id)
    assert result.cut_sentences >= 1 and len(result.rows) >= 3
    body = [t for ids, _ in result.rows for t in ids.tolist()[1:] if t != tok.sep_token_id]
    assert body == tok(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_without_specials_is_rejected():
    class NoSpecials:
        cls_token_id = sep_token_id = pad_token_id = None

    with pytest.raises(ToolkitError, match="CLS, SEP, PAD"):
        SequencePacker(NoSpecials(), 16)


@pytest.mark.parametrize("field,value", [("format", "csv"), ("doc_separator", "para"), ("seq_length", 4),
                                         ("shuffle_buffer", -1), ("epochs", -1), ("num_workers", -2),
                                         ("short_seq_prob", 1.5), ("seed", -1), ("text_field", "")])
def test_config_validation_names_field(field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        CorpusConfig(sources=["x"], **{field: value})


def test_config_loads_from_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sources: [corpus/*.txt, 'hf:data']\nseq_length: 64\nstrict: true\n", encoding="utf-8")
    cfg = load_config(CorpusConfig, path, ["shuffle_buffer=10"])
    assert cfg.sources == ["corpus/*.txt", "hf:data"] and cfg.seq_length == 64 and cfg.strict
    assert cfg.shuffle_buffer == 10 and cfg.epochs == 0
