"""encode_examples / collate / decode_predictions for every task type on a tiny WordPiece vocab."""
from __future__ import annotations

import pytest
import torch

from toolkit.errors import ConfigError, DataError
from toolkit.models.encoder import load_tokenizer
from toolkit.tasks.base import ChoiceExample, SpanExample, Task, TextExample, TokenExample
from toolkit.tasks.features import collate, decode_predictions, encode_examples

WORDS = ("the a is of and what who where capital city paris france river big small movie good bad "
         "one two three four five six seven eight nine ten john lives in london cat dog sat mat on yes no "
         "北 京 中 国 首 都 是 的 。").split()


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    d = tmp_path_factory.mktemp("feat_tok")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (d / "vocab.txt").write_text("\n".join(specials + WORDS + ["##s", "##ly", "lov", "##e"]) + "\n")
    return load_tokenizer(d / "vocab.txt")


class Sst(Task):
    name, task_type, labels = "sst", "classification", ["neg", "pos"]


class Sts(Task):
    name, task_type = "sts", "regression"


class Qa(Task):
    name, task_type = "qa", "span"


class QaV2(Qa):
    name = "qa2"
    version_2_with_negative = True


class Ner(Task):
    name, task_type, labels = "ner", "token_classification", ["O", "B-PER", "B-LOC"]


class Mc(Task):
    name, task_type = "mc", "multiple_choice"


def test_text_pairs_labels_and_collate(tok):
    exs = [TextExample("1", "good movie", "the cat sat", "pos"), TextExample("2", "bad", None, "neg")]
    enc = encode_examples(Sst(), exs, tok)
    assert len(enc) == 2 and enc.has_labels
    assert tok.convert_ids_to_tokens(enc[0]["input_ids"].tolist()) == [
        "[CLS]", "good", "movie", "[SEP]", "the", "cat", "sat", "[SEP]"]
    assert enc[0]["token_type_ids"].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [int(enc[i]["labels"]) for i in range(2)] == [1, 0]
    batch = enc.collate_fn([enc[0], enc[1]])
    assert batch["input_ids"].shape == (2, 8)
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert decode_predictions(Sst(), enc, torch.tensor([[0.1, 2.0], [3.0, -1.0]])) == ["pos", "neg"]
    # per-batch logits lists work too
    assert decode_predictions(Sst(), enc, [torch.tensor([[0.1, 2.0]]), torch.tensor([[3.0, -1.0]])]) == ["pos", "neg"]


def test_text_truncation_and_bad_labels(tok):
    long = " ".join(["cat"] * 50)
    enc = encode_examples(Sst(), [TextExample("1", long, long, "pos")], tok, max_seq_length=16)
    assert enc[0]["input_ids"].numel() == 16
    with pytest.raises(DataError, match="'neutral'"):
        encode_examples(Sst(), [TextExample("1", "a", None, "neutral")], tok)
    with pytest.raises(DataError, match="no label"):
        encode_examples(Sst(), [TextExample("1", "a", None, "pos"), TextExample("2", "a")], tok)
    test = encode_examples(Sst(), [TextExample("1", "a"), TextExample("2", "a")], tok)
    assert not test.has_labels and "labels" not in test[0]


def test_regression(tok):
    enc = encode_examples(Sts(), [TextExample("1", "a", "b", "3.5"), TextExample("2", "a", "b", 1.0)], tok)
    assert enc[0]["labels"].dtype == torch.float and float(enc[0]["labels"]) == 3.5
    assert decode_predictions(Sts(), enc, torch.tensor([0.25, 4.0])) == [0.25, 4.0]
    assert decode_predictions(Sts(), enc, torch.tensor([[0.25], [4.0]])) == [0.25, 4.0]
    with pytest.raises(DataError, match="non-numeric"):
        encode_examples(Sts(), [TextExample("1", "a", "b", "high")], tok)


def _words(tok, ids):
    return tok.convert_ids_to_tokens(ids.tolist())


def test_span_windows_positions_and_decode(tok):
    ctx = "one two three four five six seven eight nine ten paris"
    ans = ctx.index("paris")
    exs = [SpanExample("q1", "what city", ctx, [{"text": "paris", "answer_start": ans}]),
           SpanExample("q2", "who", "john lives in london", [{"text": "london", "answer_start": 14}])]
    # question = 2 tokens + 3 specials -> room 7 context tokens per window; step 4
    enc = encode_examples(Qa(), exs, tok, max_seq_length=12, doc_stride=4)
    windows = [i for i, e in enumerate(enc.feature_to_example) if e == 0]
    assert len(windows) == 2  # 11 tokens: [0..6], [4..10]
    first, second = (_words(tok, enc[i]["input_ids"]) for i in windows)
    assert first[4:11] == "one two three four five six seven".split()
    assert second[4:11] == "five six seven eight nine ten paris".split()
    assert enc[windows[0]]["labels"].tolist() == [0, 0]  # answer not in the first window -> CLS
    s, e = enc[windows[1]]["labels"].tolist()
    assert second[s] == "paris" and (s, e) == (10, 10)
    assert enc.span_features[windows[1]].offsets[10] == (ans, ans + 5)
    assert enc.span_features[windows[1]].offsets[3] is None  # [SEP] is not context
    # decode logits that point at each gold position
    logits = []
    for i, item in enumerate(enc):
        row = torch.zeros(item["input_ids"].numel(), 2)
        s, e = item["labels"].tolist()
        if (s, e) != (0, 0):
            row[s, 0] = row[e, 1] = 10.0
        logits.append(row)
    # simulate dynamic padding: pad two rows in one batch
    padded = collate([{"x": r.T} for r in logits[:2]])["x"].transpose(1, 2)
    assert decode_predictions(Qa(), enc, [padded] + logits[2:]) == ["paris", "london"]


def test_span_long_question_and_no_answer(tok):
    q = " ".join(["what"] * 30)
    exs = [SpanExample("q1", q, "john lives in london", [], is_impossible=True),
           SpanExample("q2", "who", "john lives in london", [{"text": "john", "answer_start": 0}])]
    enc = encode_examples(QaV2(), exs, tok, max_seq_length=16, max_query_length=4)
    words = _words(tok, enc[0]["input_ids"])
    assert words[:6] == ["[CLS]", "what", "what", "what", "what", "[SEP]"]
    assert enc[0]["labels"].tolist() == [0, 0]
    rows = [torch.zeros(enc[i]["input_ids"].numel(), 2) for i in range(len(enc))]
    rows[0][0] = 5.0  # CLS wins for q1
    rows[1][3, :] = 4.0  # "john" for q2
    answers, odds = decode_predictions(QaV2(), enc, rows)
    assert answers == ["", "john"] and odds["q1"] > 0 > odds["q2"]
    with pytest.raises(ConfigError, match="max_seq_length"):
        encode_examples(Qa(), exs, tok, max_seq_length=8, max_query_length=6)


def test_span_chinese(tok):
    ctx = "北京是中国的首都。"
    enc = encode_examples(Qa(), [SpanExample("c1", "首都", ctx, [{"text": "北京", "answer_start": 0}])], tok)
    s, e = enc[0]["labels"].tolist()
    assert _words(tok, enc[0]["input_ids"])[s:e + 1] == ["北", "京"]
    row = torch.zeros(enc[0]["input_ids"].numel(), 2)
    row[s, 0] = row[e, 1] = 3.0
    assert decode_predictions(Qa(), enc, row[None]) == ["北京"]


def test_token_classification_alignment(tok):
    exs = [TokenExample("1", ["john", "loves", "london"], ["B-PER", "O", "B-LOC"])]
    enc = encode_examples(Ner(), exs, tok)
    words = _words(tok, enc[0]["input_ids"])
    assert words == ["[CLS]", "john", "lov", "##e", "##s", "london", "[SEP]"]
    assert enc[0]["labels"].tolist() == [-100, 1, 0, -100, -100, 2, -100]
    logits = torch.zeros(1, 7, 3)
    logits[0, 1, 2] = logits[0, 2, 1] = logits[0, 5, 1] = 1.0  # predict B-LOC, B-PER, B-PER
    logits[0, 3, 2] = 9.0  # a non-first sub-token: ignored
    assert decode_predictions(Ner(), enc, logits) == [["B-LOC", "B-PER", "B-PER"]]
    short = encode_examples(Ner(), exs, tok, max_seq_length=4)
    assert decode_predictions(Ner(), short, torch.zeros(1, 4, 3)) == [["O", "O", "O"]]
    with pytest.raises(DataError, match="3 tokens but 2 labels"):
        encode_examples(Ner(), [TokenExample("1", ["a", "b", "c"], ["O", "O"])], tok)


def test_multiple_choice_padding(tok):
    exs = [ChoiceExample("1", "the cat sat on the mat", "who sat", ["cat", "dog", "john", "paris"], 0),
           ChoiceExample("2", "john lives in london", "where", ["london", "paris"], 1)]
    enc = encode_examples(Mc(), exs, tok)
    assert enc.num_choices == 4
    assert enc[0]["input_ids"].shape[0] == 4 and enc[1]["input_ids"].shape[0] == 4
    assert enc[1]["choice_mask"].tolist() == [1, 1, 0, 0]
    assert _words(tok, enc[1]["input_ids"][0])[:7] == ["[CLS]", "john", "lives", "in", "london", "[SEP]", "where"]
    assert enc[1]["attention_mask"][2].sum() >= 1  # padded choice is not all-masked
    batch = collate([enc[0], enc[1]])
    assert batch["input_ids"].shape[:2] == (2, 4) and batch["choice_mask"].shape == (2, 4)
    assert batch["labels"].tolist() == [0, 1]
    logits = torch.tensor([[0.0, 2.0, 1.0, 0.5], [0.0, 1.0, 5.0, 5.0]])
    assert decode_predictions(Mc(), enc, logits) == [1, 1]  # masked choices never win
    with pytest.raises(DataError, match="only 2 choices"):
        encode_examples(Mc(), [ChoiceExample("3", "a", "b", ["x", "y"], 2)], tok)


def test_model_runs_on_collated_batches(tok):
    from toolkit.models.encoder import EncoderSpec, build_encoder
    from toolkit.models.task_model import MultiTaskModel

    torch.manual_seed(0)
    model = MultiTaskModel(build_encoder(EncoderSpec(arch="ernie", num_layers=1, hidden_size=16, num_heads=2,
                                                     intermediate_size=32, vocab_size=len(tok), use_task_id=True)))
    model.add_head("mc", "multiple_choice", 1)
    model.add_head("qa", "span", 2)
    mc = encode_examples(Mc(), [ChoiceExample("1", "the cat", "who", ["cat", "dog", "john"], 0),
                                ChoiceExample("2", "john", "who", ["john", "dog"], 0)], tok)
    out = model(task="mc", **mc.collate_fn([mc[0], mc[1]]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)
    qa = encode_examples(Qa(), [SpanExample("q", "who", "john lives in london", [{"text": "john", "answer_start": 0}])], tok)
    out = model(task="qa", **qa.collate_fn([qa[0]]))
    assert out.logits.shape[-1] == 2 and torch.isfinite(out.loss)
    assert decode_predictions(Qa(), qa, out.logits.detach())[0] in "john lives in london"
