"""tokenizers/build_wordpiece.py and build_sentencepiece.py run as scripts on a tiny corpus."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORPUS = ["我爱北京天安门。", "今天天气很好，我们去公园散步。", "Hello world, transformers are great.",
          "ERNIE 3.0 Tiny 是一个小模型。", "北京是中国的首都，天安门在北京。"] * 20


def read_vocab(path: Path) -> list:
    """Tokens one per line; only newlines separate them (U+2028 etc. are tokens)."""
    return path.read_text(encoding="utf-8").rstrip("\n").split("\n")


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tokenizers" / script), *args], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120)


def test_help():
    for script in ("build_wordpiece.py", "build_sentencepiece.py"):
        r = run(script, "--help")
        assert r.returncode == 0 and "--input" in r.stdout


def test_build_wordpiece(tmp_path):
    from transformers import AutoTokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    out = tmp_path / "wp"
    r = run("build_wordpiece.py", "--input", str(corpus), "--out-dir", str(out), "--vocab-size", "200",
            "--min-frequency", "1", "--unused", "2")
    assert r.returncode == 0, r.stderr
    vocab = read_vocab(out / "vocab.txt")
    assert vocab[:5] == ["[PAD]", "[unused1]", "[unused2]", "[UNK]", "[CLS]"]
    # Chinese characters are whole tokens, never ## continuations.
    assert "北" in vocab and "##北" not in vocab and "北京" not in vocab
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.tokenize("北京天气") == ["北", "京", "天", "气"]
    assert tok.unk_token_id not in tok("Hello world")["input_ids"]


def test_build_sentencepiece(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS) + "\n", encoding="utf-8")
    for kind in ("unigram", "bpe"):
        out = tmp_path / kind
        r = run("build_sentencepiece.py", "--input", str(corpus), "--out-dir", str(out), "--model-type", kind,
                "--vocab-size", "80", "--character-coverage", "1.0", "--no-hard-vocab-limit")
        assert r.returncode == 0, r.stderr
        sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
        assert [sp.id_to_piece(i) for i in range(4)] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
        assert sp.piece_to_id("[MASK]") == 4
        assert sp.decode(sp.encode("我爱北京")) == "我爱北京"


def test_missing_input_is_one_line_error(tmp_path):
    r = run("build_wordpiece.py", "--input", str(tmp_path / "nope.txt"), "--out-dir", str(tmp_path / "o"))
    assert r.returncode == 2 and "input file not found" in r.stderr and "Traceback" not in r.stderr
