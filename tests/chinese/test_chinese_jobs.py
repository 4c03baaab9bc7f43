"""The Chinese ERNIE track through every job: eval on CLUE fixtures with submission files, span
(CMRC2018) and multiple choice (C3) fine-tuning, and a tiny Chinese MITKD pipeline.

The teacher is a tiny random ``ErnieModel`` (use_task_id on) over the real 21128-character
vocabulary shipped in ``tokenizers/chinese-char-21128``.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VOCAB = ROOT / "tokenizers" / "chinese-char-21128" / "vocab.txt"
CLUE = ROOT / "tests" / "assets" / "clue"


@pytest.fixture(scope="module")
def tiny_zh_ernie(tmp_path_factory) -> Path:
    import torch
    from transformers import BertTokenizerFast, ErnieConfig, ErnieModel

    d = tmp_path_factory.mktemp("zh_ernie")
    tok = BertTokenizerFast(vocab=str(VOCAB), do_lower_case=True)
    torch.manual_seed(0)
    cfg = ErnieConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=256, use_task_id=True, task_type_vocab_size=3)
    ErnieModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_eval_on_clue_writes_leaderboard_files(tiny_zh_ernie, tmp_path):
    from toolkit.recipes.evaluate import EvalConfig, run_eval

    out = tmp_path / "ev"
    res = run_eval(EvalConfig(model=str(tiny_zh_ernie), tasks=["afqmc", "tnews", "c3", "cmrc2018"],
                              data_dir=str(CLUE), output_dir=str(out), max_steps=2, max_seq_length=64))
    assert set(res["tasks"]) == {"afqmc", "tnews", "c3", "cmrc2018"}
    assert {"em", "f1"} <= set(res["tasks"]["cmrc2018"]["best"]["metrics"])
    subs = {p.name for p in (out / "submissions" / "clue").iterdir()}
    assert {"afqmc_predict.json", "tnews11_predict.json", "c311_predict.json", "cmrc2018_predict.json"} <= subs
    first = (out / "submissions" / "clue" / "afqmc_predict.json").read_text(encoding="utf-8").splitlines()[0]
    assert set(json.loads(first)) == {"id", "label"}


def _zh_tasks(root: Path):
    """A Chinese sentiment task (TSV) and a per-character tagging task (JSONL)."""
    rng = random.Random(0)
    pos, neg, fill = list("好棒喜欢满意"), list("差烂讨厌失望"), list("这个东西我们今天手机质量服务")
    root.mkdir(parents=True, exist_ok=True)
    rows = {"train": [], "dev": []}
    for split, n in (("train", 40), ("dev", 12)):
        for i in range(n):
            lab = "pos" if i % 2 else "neg"
            chars = [rng.choice(fill) for _ in range(6)] + [rng.choice(pos if lab == "pos" else neg)] * 2
            rng.shuffle(chars)
            rows[split].append(f"{''.join(chars)}\t{lab}")
        (root / f"senti_{split}.tsv").write_text("text\tlabel\n" + "\n".join(rows[split]) + "\n", encoding="utf-8")
    (root / "senti.yaml").write_text("name: zh_senti\ntype: classification\nlanguage: zh\nformat: tsv\n"
                                     "train: senti_train.tsv\ndev: senti_dev.tsv\ntext_a: text\nlabel: label\n"
                                     "labels: [neg, pos]\nmetric: accuracy\n", encoding="utf-8")
    names = list("张王李赵")
    for split, n in (("train", 30), ("dev", 10)):
        lines = []
        for _ in range(n):
            toks, tags = [], []
            for _ in range(rng.randint(3, 6)):
                if rng.random() < 0.3:
                    toks += [rng.choice(names), rng.choice(fill)]
                    tags += ["B-PER", "I-PER"]
                else:
                    toks.append(rng.choice(fill))
                    tags.append("O")
            lines.append(json.dumps({"tokens": toks, "tags": tags}, ensure_ascii=False))
        (root / f"ner_{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "ner.yaml").write_text("name: zh_ner\ntype: token_classification\nlanguage: zh\nformat: jsonl\n"
                                   "header: false\ntrain: ner_train.jsonl\ndev: ner_dev.jsonl\ntext_a: tokens\n"
                                   "label: tags\nlabels: [O, B-PER, I-PER]\nmetric: [seqeval_f1, accuracy]\n",
                                   encoding="utf-8")
    corpus = root / "corpus"
    corpus.mkdir()
    for s in range(2):
        docs = ["。".join("".join(rng.choice(fill + pos + neg + names) for _ in range(rng.randint(6, 15)))
                         for _ in range(4)) + "。" for _ in range(20)]
        (corpus / f"zh{s}.txt").write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return root / "senti.yaml", root / "ner.yaml", corpus


def test_tiny_chinese_pipeline(tiny_zh_ernie, tmp_path):
    from transformers import AutoModel

    from toolkit.config import load_config
    from toolkit.recipes.pipeline import PipelineConfig, run_pipeline

    senti, ner, corpus = _zh_tasks(tmp_path / "data")
    out = tmp_path / "pipe"
    cfg = load_config(PipelineConfig, None, base={
        "language": "zh", "preset": "tiny", "output_dir": str(out), "teacher": str(tiny_zh_ernie),
        "in_domain": [str(senti)], "out_of_domain": [str(ner)], "corpus": [str(corpus / "*.txt")],
        "seeds": [1], "low_resource": 10, "evaluate_teacher": False,
        "teacher_job": {"max_steps": 4},
        "distill_job": {"max_steps": 3, "corpus": {"seq_length": 32, "shuffle_buffer": 4},
                        "student": {"init": "spec", "num_layers": 1, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64},
                        "loss": {"options": {"minilmv2": {"num_relation_heads": 4}}}},
        "eval_job": {"max_steps": 2, "max_seq_length": 32}})
    res = run_pipeline(cfg)
    assert (out / "report.md").is_file() and (out / "comparison.png").is_file()
    assert set(res["results"]) == {"mitkd", "baseline"}
    assert res["results"]["mitkd"]["full"]["tasks"]["zh_ner"]["metric"] == "seqeval_f1"
    # The floor of each task, tagging included: the most frequent train tag for every token.
    assert res["majority_rates"]["zh_ner"] == 0.0 and 0 < res["majority_rates"]["zh_senti"] < 100
    (student_dir,) = out.glob("mitkd_*/job/student")   # the preset's one variant
    student = AutoModel.from_pretrained(student_dir)
    assert student.config.model_type == "ernie" and student.config.use_task_id
    # The Chinese track's task heads learn at 100x the encoder's rate, in the teacher and the evals.
    assert res["teacher_job"]["optim"] == {"head_lr_scale": 100.0}
    assert res["eval_job"]["optim"] == {"head_lr_scale": 100.0}
