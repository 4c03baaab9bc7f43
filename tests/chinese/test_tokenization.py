"""Chinese tokenization with the shipped 21128 vocab; fast vs reference (slow) BERT tokenizer."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ZH = ROOT / "tokenizers" / "chinese-char-21128"
EN = ROOT / "tokenizers" / "bert-base-uncased"


@pytest.fixture(scope="module")
def fast():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ZH))


@pytest.fixture(scope="module")
def slow():
    # transformers 5 names the pure-Python reference implementation BertTokenizerLegacy.
    import transformers

    cls = getattr(transformers, "BertTokenizerLegacy", None)
    if cls is None:  # transformers 4.x: BertTokenizer is the Python one
        cls = transformers.BertTokenizer
    return cls(vocab_file=str(ZH / "vocab.txt"), do_lower_case=True)


def read_vocab(path: Path) -> list:
    """Tokens one per line; only newlines separate them (U+2028 etc. are tokens)."""
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n")


def test_shipped_vocab_files():
    zh = read_vocab(ZH / "vocab.txt")
    en = read_vocab(EN / "vocab.txt")
    assert len(zh) == 21128 and len(en) == 30522
    for vocab in (zh, en):
        assert vocab[0] == "[PAD]" and {"[UNK]", "[CLS]", "[SEP]", "[MASK]"} <= set(vocab)
    assert not (ROOT / "tokenizers" / "__init__.py").exists()


def test_fast_tokenizer_reads_whole_vocab(fast):
    assert len(fast) == 21128 and fast.is_fast
    assert fast.convert_tokens_to_ids("[CLS]") == 101  # Google's Chinese BERT layout


def test_chinese_split_per_character(fast):
    assert fast.tokenize("我爱北京天安门") == list("我爱北京天安门")


def test_english_wordpieces_and_numbers(fast):
    assert fast.tokenize("Hello World") == ["hello", "world"]
    pieces = fast.tokenize("transformers")
    assert len(pieces) > 1 and pieces[0] == "t" and all(p.startswith("##") for p in pieces[1:])
    assert fast.tokenize("2019年GDP增长6.1%") == ["2019", "年", "gdp", "增", "长", "6", ".", "1", "%"]


def test_full_width_forms(fast):
    # BERT does no NFKC: full-width letters are lower-cased within the full-width block and
    # stay one word (WordPieces); full-width punctuation is split off and kept as written.
    assert fast.tokenize("ＡＢＣ１２３") == ["ａ", "##ｂ", "##ｃ", "##１", "##２", "##３"]
    assert fast.tokenize("好，。！（）") == ["好", "，", "。", "！", "（", "）"]
    assert fast.tokenize("价格５９９９元") == ["价", "格", "５", "##９", "##９", "##９", "元"]
    # The ideographic space U+3000 is whitespace.
    assert fast.tokenize("\u3000中文\u3000") == ["中", "文"]


def test_traditional_characters_map_to_themselves(fast):
    assert fast.tokenize("體說") == ["體", "說"]
    assert fast.unk_token_id not in fast("體說")["input_ids"]


def test_fast_matches_reference(fast, slow):
    texts = ["iPhone 13 Pro Max，价格５９９９元。", "café naïve 中文ＡＢＣ", "他說：「今天天氣很好！」",
             "BERT模型在2018年发布，ERNIE 3.0 Tiny更小。", "e-mail: test@example.com 網址"]
    for t in texts:
        assert fast.tokenize(t) == slow.tokenize(t), t
        assert fast(t)["input_ids"] == slow(t)["input_ids"], t


def test_english_vocab_loads(fast):
    from transformers import AutoTokenizer

    en = AutoTokenizer.from_pretrained(str(EN))
    assert len(en) == 30522
    assert en.tokenize("Hello unaffable World!") == ["hello", "una", "##ffa", "##ble", "world", "!"]
