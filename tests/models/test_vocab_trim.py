"""Vocabulary trimming: the trimmed teacher computes what the untrimmed one does on covered text.

A tiny SentencePiece unigram model (trained here) over a tiny random BERT with a tied MLM
head, and the tiny WordPiece BERT of conftest; plus the CLI and the tokenizers/ script.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.errors import ToolkitError

ROOT = Path(__file__).resolve().parents[2]
ZH = "我们今天去北京看天安门广场人很多天气很好中国首都长城故宫博物院手机质量服务满意失望"
EN = "the movie was good great bad story actor music we love hate really very quite".split()


def _lines(n: int, seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:
            out.append("".join(rng.choice(ZH) for _ in range(rng.randint(6, 14))) + "。")
        else:
            out.append(" ".join(rng.choice(EN) for _ in range(rng.randint(4, 9))) + ".")
    return out


def train_spm(path: Path, lines: list, vocab_size: int = 160) -> Path:
    """A tiny unigram model with the XLM-R special pieces (<s> <pad> </s> <unk>, user <mask>)."""
    import sentencepiece as spm

    text = path.with_suffix(".txt")
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path.with_suffix("")), model_type="unigram",
                                   vocab_size=vocab_size, character_coverage=1.0, hard_vocab_limit=False,
                                   bos_id=0, pad_id=1, eos_id=2, unk_id=3, user_defined_symbols=["<mask>"],
                                   minloglevel=2, num_threads=1)
    return path.with_suffix(".model")


@pytest.fixture(scope="module")
def spm_mlm(tmp_path_factory):
    """A tiny BertForMaskedLM (tied decoder) over a tiny SentencePiece tokenizer, saved as a folder."""
    from transformers import BertConfig, BertForMaskedLM

    from toolkit.models.encoder import load_tokenizer

    d = tmp_path_factory.mktemp("spm_mlm")
    tok = load_tokenizer(train_spm(d / "spm.model", _lines(400, 0)))
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tok) + 3, hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                       pad_token_id=tok.pad_token_id))
    with torch.no_grad():   # a non-zero decoder bias, so that slicing it is checked
        model.cls.predictions.bias.normal_()
    out = d / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _corpus_and_task(root: Path, lines: list) -> tuple:
    root.mkdir(parents=True, exist_ok=True)
    (root / "corpus.txt").write_text("\n\n".join(lines[:-8]) + "\n", encoding="utf-8")
    rows = ["text\tlabel"] + [f"{t}\t{'a' if i % 2 else 'b'}" for i, t in enumerate(lines[-8:])]
    (root / "train.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (root / "dev.tsv").write_text("\n".join(rows[:3]) + "\n", encoding="utf-8")
    (root / "t.yaml").write_text("name: t\ntype: classification\nlanguage: zh\nformat: tsv\ntrain: train.tsv\n"
                                 "dev: dev.tsv\ntext_a: text\nlabel: label\nlabels: [a, b]\n", encoding="utf-8")
    return str(root / "corpus.txt"), str(root / "t.yaml")


def test_trimmed_mlm_equals_untrimmed_on_covered_text(spm_mlm, tmp_path):
    from transformers import BertForMaskedLM

    from toolkit.models.encoder import load_tokenizer
    from toolkit.models.vocab_trim import read_report, trim_vocabulary

    # The trim sees only some texts: a few of the original pieces go unused.
    used = _lines(30, 1)
    corpus, task = _corpus_and_task(tmp_path / "data", used)
    report = trim_vocabulary(spm_mlm, tmp_path / "trim", corpus=[corpus], tasks=[task])
    assert report.kept < report.original_size and report.verified_texts > 0
    assert read_report(tmp_path / "trim").kept_ids == report.kept_ids
    old_tok, new_tok = load_tokenizer(spm_mlm), load_tokenizer(tmp_path / "trim")
    new_id = {o: n for n, o in enumerate(report.kept_ids)}
    assert len(new_tok) == report.kept
    for name in ("cls", "sep", "pad", "unk", "mask"):
        assert new_id[getattr(old_tok, f"{name}_token_id")] == getattr(new_tok, f"{name}_token_id")
    old = BertForMaskedLM.from_pretrained(spm_mlm).eval()
    new = BertForMaskedLM.from_pretrained(tmp_path / "trim").eval()
    assert new.config.vocab_size == report.kept and new.config.pad_token_id == new_tok.pad_token_id
    # The decoder is still tied to the (sliced) embedding, and its bias sliced alike.
    assert new.cls.predictions.decoder.weight.data_ptr() == new.bert.embeddings.word_embeddings.weight.data_ptr()
    idx = torch.tensor(report.kept_ids)
    torch.testing.assert_close(new.cls.predictions.bias, old.cls.predictions.bias[idx])
    for text in used[:6] + [used[0] + " " + used[1]]:
        a, b = old_tok(text, return_tensors="pt"), new_tok(text, return_tensors="pt")
        assert [new_id[i] for i in a["input_ids"][0].tolist()] == b["input_ids"][0].tolist(), text
        with torch.no_grad():
            oa, ob = old(**a, output_hidden_states=True), new(**b, output_hidden_states=True)
        for ha, hb in zip(oa.hidden_states, ob.hidden_states):
            torch.testing.assert_close(ha, hb, rtol=0, atol=1e-6)
        torch.testing.assert_close(oa.logits[..., idx], ob.logits, rtol=0, atol=1e-5)
    # A character no kept piece covers is <unk>; the old vocabulary had it.
    unseen = next(c for c in ZH if c not in "".join(used))
    assert old_tok.unk_token_id not in old_tok(unseen)["input_ids"]
    assert new_tok.unk_token_id in new_tok(unseen)["input_ids"]


def test_trim_wordpiece_bert(tiny_bert_dir, fixture_corpus, tmp_path):
    from transformers import AutoModel

    from toolkit.models.encoder import load_tokenizer
    from toolkit.models.vocab_trim import trim_vocabulary

    shard = sorted(fixture_corpus.glob("*.txt"))[0]
    report = trim_vocabulary(tiny_bert_dir, tmp_path / "t", corpus=[str(shard)])
    assert report.kept < report.original_size
    vocab = (tmp_path / "t" / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    old_tok, new_tok = load_tokenizer(tiny_bert_dir), load_tokenizer(tmp_path / "t")
    assert vocab == new_tok.convert_ids_to_tokens(list(range(len(new_tok))))
    new_id = {o: n for n, o in enumerate(report.kept_ids)}
    old, new = AutoModel.from_pretrained(tiny_bert_dir).eval(), AutoModel.from_pretrained(tmp_path / "t").eval()
    text = shard.read_text(encoding="utf-8").split("\n\n")[0]
    a, b = old_tok(text, return_tensors="pt"), new_tok(text, return_tensors="pt")
    assert [new_id[i] for i in a["input_ids"][0].tolist()] == b["input_ids"][0].tolist()
    with torch.no_grad():
        torch.testing.assert_close(old(**a).last_hidden_state, new(**b).last_hidden_state, rtol=0, atol=1e-6)
    assert new_tok("zebra")["input_ids"][1:-1] == [new_tok.unk_token_id]


def test_trim_refuses_bad_requests(spm_mlm, tmp_path):
    from toolkit.models.vocab_trim import trim_vocabulary

    with pytest.raises(ToolkitError, match="give a corpus"):
        trim_vocabulary(spm_mlm, tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "mine.txt").write_text("keep me")
    corpus, _ = _corpus_and_task(tmp_path / "data", _lines(20, 2))
    with pytest.raises(ToolkitError, match="not a trimmed model folder"):
        trim_vocabulary(spm_mlm, tmp_path / "busy", corpus=[corpus])
    assert (tmp_path / "busy" / "mine.txt").read_text() == "keep me"


def test_cli_and_script(spm_mlm, tmp_path):
    from click.testing import CliRunner

    from toolkit.cli import main

    corpus, task = _corpus_and_task(tmp_path / "data", _lines(20, 3))
    r = CliRunner().invoke(main, ["trim-vocab", "--model", str(spm_mlm), "--corpus", corpus, "--tasks", task,
                                  "--out", str(tmp_path / "cli")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["kept"] == json.loads((tmp_path / "cli" / "vocab_trim.json").read_text())["kept"]
    r = CliRunner().invoke(main, ["trim-vocab", "--model", str(spm_mlm), "--out", str(tmp_path / "none")])
    assert r.exit_code == 2 and r.output.startswith("error: give a corpus")
    p = subprocess.run([sys.executable, str(ROOT / "tokenizers" / "trim_vocab.py"), "--model", str(spm_mlm),
                        "--corpus", corpus, "--out", str(tmp_path / "script")], capture_output=True, text=True,
                       timeout=300, cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "script" / "tokenizer.json").is_file()
