"""SentencePiece tokenizers through every job: task encoding, corpus packing, a short distillation
into an ERNIE 3.0 student with task-type embeddings, a short fine-tune and a multi-task teacher.

The teacher is a tiny random BERT over a tiny SentencePiece unigram model trained here, with
XLM-R's special tokens (``<s> A </s> </s> B </s>``, token type 0 throughout), as the converted
multilingual-e5 teacher of the Chinese track has.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

ZH = "我们今天去北京看天安门广场人很多天气很好中国首都长城故宫博物院手机质量服务满意失望张王李赵"
EN = "the movie was good great bad story actor music we love hate really very quite Paris".split()
NAMES = "张王李赵"


def _zh(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ZH) for _ in range(n))


def train_spm(path: Path, bert_names: bool = False) -> Path:
    """A tiny unigram model: XLM-R's special pieces, or BERT's as tokenizers/build_sentencepiece.py."""
    import sentencepiece as spm

    rng = random.Random(0)
    lines = [(_zh(rng, rng.randint(6, 14)) + "。") if i % 2 else " ".join(rng.choices(EN, k=6)) + "."
             for i in range(400)]
    text = path.with_suffix(".txt")
    text.write_text("\n".join(lines) + "\n", encoding="utf-8")
    names = (dict(pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[CLS]",
                  eos_piece="[SEP]", user_defined_symbols=["[MASK]"]) if bert_names else
             dict(bos_id=0, pad_id=1, eos_id=2, unk_id=3, user_defined_symbols=["<mask>"]))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(path.with_suffix("")), model_type="unigram",
                                   vocab_size=150, character_coverage=1.0, hard_vocab_limit=False,
                                   minloglevel=2, num_threads=1, **names)
    return path.with_suffix(".model")


@pytest.fixture(scope="module")
def spm_teacher(tmp_path_factory) -> Path:
    """4 layers, hidden 32, 4 heads, type_vocab_size 2 (like multilingual-e5-small's)."""
    from transformers import BertConfig, BertModel

    from toolkit.models.encoder import load_tokenizer

    d = tmp_path_factory.mktemp("spm_teacher")
    tok = load_tokenizer(train_spm(d / "spm.model"))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
              ).save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return d / "model"


@pytest.fixture(scope="module")
def zh_data(tmp_path_factory):
    """A sentiment task (TSV), a per-character name-tagging task (JSONL) and a corpus."""
    root = tmp_path_factory.mktemp("zh_data")
    rng = random.Random(1)
    for split, n in (("train", 40), ("dev", 12)):
        rows = []
        for i in range(n):
            lab = "pos" if i % 2 else "neg"
            rows.append(f"{_zh(rng, 6)}{'满意' if lab == 'pos' else '失望'}\t{lab}")
        (root / f"senti_{split}.tsv").write_text("text\tlabel\n" + "\n".join(rows) + "\n", encoding="utf-8")
        lines = []
        for _ in range(n):
            toks, tags = [], []
            for _ in range(rng.randint(3, 6)):
                if rng.random() < 0.3:
                    toks += [rng.choice(NAMES), rng.choice(ZH)]
                    tags += ["B-PER", "I-PER"]
                else:
                    toks.append(rng.choice(ZH))
                    tags.append("O")
            lines.append(json.dumps({"tokens": toks, "tags": tags}, ensure_ascii=False))
        (root / f"ner_{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "senti.yaml").write_text("name: zh_senti\ntype: classification\nlanguage: zh\nformat: tsv\n"
                                     "train: senti_train.tsv\ndev: senti_dev.tsv\ntext_a: text\nlabel: label\n"
                                     "labels: [neg, pos]\nmetric: accuracy\n", encoding="utf-8")
    (root / "ner.yaml").write_text("name: zh_names\ntype: token_classification\nlanguage: zh\nformat: jsonl\n"
                                   "header: false\ntrain: ner_train.jsonl\ndev: ner_dev.jsonl\ntext_a: tokens\n"
                                   "label: tags\nlabels: [O, B-PER, I-PER]\nmetric: [seqeval_f1, accuracy]\n",
                                   encoding="utf-8")
    corpus = root / "corpus"
    corpus.mkdir()
    for s in range(2):
        docs = ["。".join(_zh(rng, rng.randint(6, 15)) for _ in range(4)) + "。 " +
                " ".join(rng.choices(EN, k=8)) + "." for _ in range(20)]
        (corpus / f"zh{s}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return root / "senti.yaml", root / "ner.yaml", corpus


# ----- tokenizers and encoding ------------------------------------------------------------------
def test_sentencepiece_model_files_load_with_their_layout(tmp_path):
    from toolkit.models.encoder import check_vocab, load_tokenizer, special_layout

    xlmr = load_tokenizer(train_spm(tmp_path / "x.model"))
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "spm.model").write_bytes((tmp_path / "x.model").read_bytes())
    assert load_tokenizer(tmp_path / "only").get_vocab() == xlmr.get_vocab()   # a folder with just the .model
    lay = special_layout(xlmr)
    assert (xlmr.cls_token, xlmr.sep_token, xlmr.pad_token, xlmr.mask_token) == ("<s>", "</s>", "<pad>", "<mask>")
    assert lay.pair == ((0,), (2, 2), (2,)) and (lay.type_a, lay.type_b) == (0, 0)
    bert = load_tokenizer(train_spm(tmp_path / "b.model", bert_names=True))
    lay = special_layout(bert)
    assert (bert.cls_token_id, bert.sep_token_id, bert.pad_token_id, bert.mask_token_id) == (2, 3, 0, 4)
    assert lay.pair == ((2,), (3,), (3,)) and (lay.type_a, lay.type_b) == (0, 1)
    assert bert("好", "天")["token_type_ids"][-2:] == [1, 1]
    # A model without a second token type cannot take BERT-layout pairs.
    from transformers import BertConfig, BertModel

    one_type = BertModel(BertConfig(vocab_size=len(bert), hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=8, type_vocab_size=1))
    with pytest.raises(Exception, match="type_vocab_size=1"):
        check_vocab(bert, one_type, "here")
    check_vocab(xlmr, BertModel(BertConfig(vocab_size=len(xlmr), hidden_size=8, num_hidden_layers=1,
                                           num_attention_heads=2, intermediate_size=8, type_vocab_size=1)), "here")


def test_task_encoding(spm_teacher, zh_data):
    from toolkit.models.encoder import load_tokenizer
    from toolkit.tasks import get_task
    from toolkit.tasks.base import SpanExample, TextExample
    from toolkit.tasks.features import _encode_span, _Settings, encode_examples

    tok = load_tokenizer(spm_teacher)
    senti, ner, _ = zh_data
    task = get_task(str(senti))
    enc = encode_examples(task, [TextExample("1", "我们很满意", "天气很好", "pos")], tok, max_seq_length=32)
    ids = enc.items[0]["input_ids"].tolist()
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert ids.count(tok.sep_token_id) == 3 and not enc.items[0]["token_type_ids"].any()
    # Per-character tagging: one piece per character, each carrying its character's label.
    ntask = get_task(str(ner))
    examples = ntask.load("dev")
    enc = encode_examples(ntask, examples, tok, max_seq_length=64)
    for ex, item, wids in zip(examples, enc.items, enc.word_ids):
        pieces = tok.convert_ids_to_tokens(item["input_ids"].tolist())[1:-1]
        assert pieces == list(ex.tokens)            # no lone "▁" before the characters
        labels = item["labels"].tolist()[1:-1]
        assert labels == [ntask.label_to_id(t) for t in ex.labels] and wids[1:-1] == list(range(len(ex.tokens)))
    # Span offsets start at the word, not at the space a "▁word" piece covers.
    ex = SpanExample("q", "where", "we love Paris really", [{"text": "Paris", "answer_start": 8}])
    split = _encode_span(task, [ex], tok, _Settings(32, 32, 16))
    s, e = split.items[0]["labels"].tolist()
    offs = split.span_features[0].offsets
    assert ex.context[offs[s][0]:offs[e][1]] == "Paris"


def test_corpus_packing_follows_the_tokenizer(spm_teacher, zh_data):
    from toolkit.data.corpus import CorpusConfig, StreamingCorpus
    from toolkit.models.encoder import load_tokenizer

    tok = load_tokenizer(spm_teacher)
    corpus = StreamingCorpus(CorpusConfig(sources=[str(zh_data[2] / "*.txt")], seq_length=24, shuffle_buffer=0,
                                          epochs=1, num_workers=0), tok)
    samples = list(corpus)
    assert samples and corpus.pad_id == tok.pad_token_id
    pairs = 0
    for s in samples:
        ids = s["input_ids"][s["attention_mask"].bool()].tolist()
        assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) <= 24
        assert tok.cls_token_id not in ids[1:] and not s["token_type_ids"].any()
        assert s["input_ids"][~s["attention_mask"].bool()].eq(tok.pad_token_id).all()
        n_sep = ids.count(tok.sep_token_id)
        assert n_sep in (1, 3)
        if n_sep == 3:   # <s> A </s> </s> B </s>
            pairs += 1
            first = ids.index(tok.sep_token_id)
            assert ids[first + 1] == tok.sep_token_id
    assert pairs > 0


# ----- jobs -----------------------------------------------------------------------------------
def test_distill_into_ernie_student_with_task_ids(spm_teacher, zh_data, tmp_path):
    from transformers import AutoModel

    from toolkit.config import load_config
    from toolkit.jobs import run_job
    from toolkit.recipes.distill import DistillConfig, DistillRecipe

    out = tmp_path / "d"
    cfg = load_config(DistillConfig, None, base={
        "teacher": str(spm_teacher), "output_dir": str(out), "max_steps": 3, "log_every": 1,
        "corpus": {"sources": [str(zh_data[2] / "*.txt")], "seq_length": 24, "shuffle_buffer": 8, "num_workers": 0},
        "student": {"init": "teacher_layers", "arch": "ernie", "use_task_id": True, "num_layers": 2,
                    "hidden_size": 32, "num_heads": 4, "intermediate_size": 64},
        "loss": {"options": {"minilmv2": {"num_relation_heads": 4}}}})
    rec = DistillRecipe(cfg)
    # The ERNIE student starts as the BERT teacher's layers 2 and 4, with a zero task-type table.
    rec._read_teacher_config()
    student = rec._build_student()
    teacher = AutoModel.from_pretrained(spm_teacher)
    assert student.config.model_type == "ernie" and student.config.use_task_id
    assert not student.embeddings.task_type_embeddings.weight.any()
    for s_i, t_i in ((0, 1), (1, 3)):
        for k, v in teacher.encoder.layer[t_i].state_dict().items():
            torch.testing.assert_close(student.encoder.layer[s_i].state_dict()[k], v)
    torch.testing.assert_close(student.embeddings.word_embeddings.weight, teacher.embeddings.word_embeddings.weight)
    ids = torch.tensor([[0, 10, 11, 12, 2]])
    with torch.no_grad():
        full = AutoModel.from_pretrained(spm_teacher).eval()
        full.encoder.layer = torch.nn.ModuleList([full.encoder.layer[1], full.encoder.layer[3]])
        torch.testing.assert_close(student.eval()(input_ids=ids).last_hidden_state, full(input_ids=ids).last_hidden_state)
    res = run_job("distill", cfg)
    assert res["steps"] == 3
    saved = AutoModel.from_pretrained(out / "student")
    assert saved.config.model_type == "ernie" and saved.config.use_task_id
    assert (out / "student" / "tokenizer.json").is_file()


def test_teacher_and_finetune_jobs(spm_teacher, zh_data, tmp_path):
    from toolkit.jobs import build_config, run_job
    from toolkit.recipes.finetune import FinetuneConfig, run_finetune

    senti, ner, _ = zh_data
    cfg = build_config("teacher", None, [f"model={spm_teacher}", f"tasks={senti},{ner}", f"output_dir={tmp_path / 't'}",
                                         "max_steps=4", "max_seq_length=32", "log_every=2"])
    res = run_job("teacher", cfg)
    assert res["tasks"] == ["zh_senti", "zh_names"] and res["steps"] == 4
    assert (tmp_path / "t" / "model" / "tokenizer.json").is_file()
    for task in (ner, senti):
        out = tmp_path / f"ft_{Path(task).stem}"
        res = run_finetune(FinetuneConfig(model=str(tmp_path / "t" / "model"), task=str(task), output_dir=str(out),
                                          max_steps=3, max_seq_length=32, log_every=1))
        assert res["steps"] == 3 and res["metrics"]
