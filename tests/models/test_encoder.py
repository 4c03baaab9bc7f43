"""Encoder building/loading: parity with transformers, spec validation, tokenizer and vocab checks."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel, ErnieConfig, ErnieModel

from toolkit.errors import ConfigError, DataError, ToolkitError
from toolkit.models.encoder import (EncoderSpec, build_encoder, check_vocab, count_parameters, encoder_layers,
                                    load_tokenizer, spec_from_model)

TINY = dict(num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64, vocab_size=60,
            max_position_embeddings=64)


def _inputs(vocab: int = 60, b: int = 2, l: int = 7):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (b, l), generator=g)
    mask = torch.ones(b, l, dtype=torch.long)
    mask[1, 5:] = 0
    tt = torch.zeros(b, l, dtype=torch.long)
    tt[:, 4:] = 1
    return ids, mask, tt


@pytest.mark.parametrize("arch,use_task_id", [("bert", False), ("ernie", True), ("ernie", False)])
def test_parity_with_transformers(arch, use_task_id):
    spec = EncoderSpec(arch=arch, use_task_id=use_task_id, **TINY)
    torch.manual_seed(0)
    ours = build_encoder(spec).eval()
    common = dict(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    cfg = ErnieConfig(**common, use_task_id=use_task_id) if arch == "ernie" else BertConfig(**common)
    torch.manual_seed(0)
    ref = (ErnieModel if arch == "ernie" else BertModel)(cfg).eval()
    assert type(ours) is type(ref)
    assert ours.config._attn_implementation == "sdpa"
    ids, mask, tt = _inputs()
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask, token_type_ids=tt)
        b = ref(input_ids=ids, attention_mask=mask, token_type_ids=tt)
    torch.testing.assert_close(a.last_hidden_state, b.last_hidden_state)
    torch.testing.assert_close(a.pooler_output, b.pooler_output)
    assert spec_from_model(ours) == spec
    assert len(encoder_layers(ours)) == 2
    assert count_parameters(ours) == sum(p.numel() for p in ref.parameters())


def test_eager_matches_sdpa():
    spec = EncoderSpec(arch="bert", **TINY)
    torch.manual_seed(0)
    sdpa = build_encoder(spec).eval()
    eager = build_encoder(spec, attn_implementation="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    ids, mask, tt = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(sdpa(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   eager(input_ids=ids, attention_mask=mask).last_hidden_state,
                                   atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fixture,cls", [("tiny_bert_dir", BertModel), ("tiny_ernie_dir", ErnieModel)])
def test_load_from_dir(request, fixture, cls):
    d = request.getfixturevalue(fixture)
    model = build_encoder(d).eval()
    assert type(model) is cls
    ref = AutoModel.from_pretrained(d).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, ref(input_ids=ids).last_hidden_state)
    tok = load_tokenizer(d)
    assert tok.is_fast
    check_vocab(tok, model, str(d))


@pytest.mark.parametrize("field,kwargs", [
    ("hidden_size", dict(hidden_size=30)),
    ("num_layers", dict(num_layers=0)),
    ("arch", dict(arch="gpt2")),
    ("hidden_dropout", dict(hidden_dropout=1.5)),
    ("use_task_id", dict(arch="bert", use_task_id=True)),
])
def test_spec_validation_names_field(field, kwargs):
    args = dict(arch="bert", **TINY)
    args.update(kwargs)
    with pytest.raises(ConfigError) as e:
        EncoderSpec(**args)
    assert e.value.field == field


def test_build_from_mapping_and_unknown_key():
    assert isinstance(build_encoder({"arch": "bert", **TINY}), BertModel)
    with pytest.raises(ConfigError, match="num_hiddenlayers"):
        build_encoder({"arch": "bert", "num_hiddenlayers": 2, **TINY})


def test_unsupported_or_missing_dir(tmp_path):
    with pytest.raises(ToolkitError, match="not found"):
        build_encoder(tmp_path / "nope")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ToolkitError, match="gpt2"):
        build_encoder(tmp_path)


def test_load_tokenizer_from_vocab_file(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "##s"]) + "\n")
    tok = load_tokenizer(vocab)
    assert tok.tokenize("Hello worlds") == ["hello", "world", "##s"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert load_tokenizer(vocab).tokenize("Hello")[0] == "[UNK]"


def test_check_vocab_error(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(80)]))
    tok = load_tokenizer(vocab)
    model = build_encoder(EncoderSpec(arch="bert", **TINY))
    with pytest.raises(DataError) as e:
        check_vocab(tok, model, str(vocab))
    assert "85" in str(e.value) and "60" in str(e.value) and str(vocab) in str(e.value)


def test_saved_from_a_half_precision_module_reloads_fp32(tmp_path):
    # Under a bf16 engine the live student is bf16 while the state dict saved is the fp32 masters;
    # transformers then writes "dtype": "bfloat16" and a default (dtype="auto") load rounds the
    # weights. save_encoder records the dtype written, and build_encoder loads fp32 regardless.
    import json

    from safetensors.torch import load_file
    from transformers import BertModel

    from toolkit.models.encoder import EncoderSpec, build_encoder, save_encoder

    model = build_encoder(EncoderSpec(arch="bert", num_layers=1, hidden_size=32, num_heads=4, intermediate_size=64,
                                      vocab_size=100))
    masters = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.to(torch.bfloat16)
    save_encoder(model, tmp_path / "a", state_dict=dict(masters))   # (save_pretrained empties the dict)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["dtype"] == "float32"
    assert all(t.dtype == torch.float32 for t in load_file(str(tmp_path / "a" / "model.safetensors")).values())
    plain = BertModel.from_pretrained(str(tmp_path / "a"), local_files_only=True)   # a user's default load
    assert next(plain.parameters()).dtype == torch.float32
    for name, p in plain.named_parameters():
        torch.testing.assert_close(p, masters[name], rtol=0, atol=0)
    # An older checkpoint that still says bfloat16 over fp32 weights: build_encoder loads fp32.
    model.save_pretrained(str(tmp_path / "b"), state_dict=dict(masters))
    assert json.loads((tmp_path / "b" / "config.json").read_text())["dtype"] == "bfloat16"
    again = build_encoder(tmp_path / "b")
    assert {p.dtype for p in again.parameters()} == {torch.float32}
    torch.testing.assert_close(again.embeddings.word_embeddings.weight, masters["embeddings.word_embeddings.weight"],
                               rtol=0, atol=0)


def test_pair_layout_ignores_a_tokenizer_json_that_pads(tmp_path):
    """A tokenizer.json with padding on (all-MiniLM-L6-v2 pads to 128) still gives BERT's pair
    layout: the padding is not part of the template."""
    from transformers import BertTokenizerFast

    from toolkit.models.encoder import special_layout

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)})
    tok.backend_tokenizer.enable_padding(length=16, pad_id=0, pad_type_id=0, pad_token="[PAD]")
    layout = special_layout(tok)
    assert layout.pair == ((2,), (3,), (3,)) and (layout.type_a, layout.type_b) == (0, 1)
    assert layout.build([5], [6]) == ([2, 5, 3, 6, 3], 3)
