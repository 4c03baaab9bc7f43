"""PaddleNLP ERNIE 3.0 -> HF conversion: a synthetic Paddle checkpoint with the real key names."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.errors import DataError, ToolkitError
from toolkit.models.convert_paddle import convert_paddle_ernie, load_pdparams, main

LAYERS, HIDDEN = 2, 32

# HF name -> Paddle name, written out independently of the converter's rules.
def paddle_name(hf: str) -> str:
    fixed = {
        "embeddings.LayerNorm.weight": "embeddings.layer_norm.weight",
        "embeddings.LayerNorm.bias": "embeddings.layer_norm.bias",
    }
    if hf in fixed:
        return "ernie." + fixed[hf]
    if hf.startswith("embeddings.") or hf.startswith("pooler."):
        return "ernie." + hf
    parts = hf.split(".")  # encoder.layer.{i}.<rest>
    i, rest = parts[2], ".".join(parts[3:])
    table = {
        "attention.self.query": "self_attn.q_proj", "attention.self.key": "self_attn.k_proj",
        "attention.self.value": "self_attn.v_proj", "attention.output.dense": "self_attn.out_proj",
        "attention.output.LayerNorm": "norm1", "intermediate.dense": "linear1", "output.dense": "linear2",
        "output.LayerNorm": "norm2",
    }
    module, leaf = rest.rsplit(".", 1)
    return f"ernie.encoder.layers.{i}.{table[module]}.{leaf}"


def is_linear_weight(hf: str) -> bool:
    return hf.endswith(".weight") and "embeddings" not in hf and "LayerNorm" not in hf


@pytest.fixture(scope="module")
def reference():
    from transformers import ErnieConfig, ErnieModel

    torch.manual_seed(0)
    cfg = ErnieConfig(vocab_size=300, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, type_vocab_size=4, use_task_id=True,
                      task_type_vocab_size=3, layer_norm_eps=1e-5)
    model = ErnieModel(cfg).eval()
    # Non-trivial LayerNorm parameters so a swapped norm1/norm2 would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def paddle_state(model) -> dict:
    state = {}
    for k, v in model.state_dict().items():
        arr = v.numpy().copy()
        if is_linear_weight(k):
            arr = arr.T.copy()  # Paddle Linear weights are [in, out]
        name = paddle_name(k)
        # Newer paddle.save stores (name, ndarray) tuples; older plain arrays: use both.
        state[name] = (f"param_{len(state)}", arr) if len(state) % 2 else arr
    state["StructuredToParameterName@@"] = {k: f"param_{i}" for i, k in enumerate(state)}
    return state


def write_checkpoint(d: Path, model, extra: dict | None = None, drop: str | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    state = paddle_state(model)
    if drop:
        del state[drop]
    state.update(extra or {})
    with open(d / "model_state.pdparams", "wb") as f:
        pickle.dump(state, f, protocol=4)
    c = model.config
    init = {"vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "num_attention_heads": c.num_attention_heads, "intermediate_size": c.intermediate_size,
            "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
            "max_position_embeddings": c.max_position_embeddings, "type_vocab_size": c.type_vocab_size,
            "task_type_vocab_size": 3, "use_task_id": True, "pad_token_id": 0, "initializer_range": 0.02}
    (d / "model_config.json").write_text(json.dumps({"init_args": [init], "init_class": "ErnieModel"}))
    words = "the cat sat on mat paris is capital".split()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words + [f"##{c}" for c in "abcdefghij"]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "tokenizer_class": "ErnieTokenizer"}))
    return d


def test_round_trip_matches_original(tmp_path, reference):
    from transformers import AutoTokenizer, ErnieModel

    head = {"classifier.weight": np.ones((HIDDEN, 3), np.float32), "classifier.bias": np.zeros(3, np.float32)}
    src = write_checkpoint(tmp_path / "paddle", reference, extra=head)
    report = convert_paddle_ernie(src, tmp_path / "hf")
    assert report.heads == ["classifier.bias", "classifier.weight"] and not report.heads_kept
    assert report.skipped == ["StructuredToParameterName@@"]
    assert report.mapped == len(reference.state_dict())
    assert not (tmp_path / "hf" / "paddle_heads.safetensors").exists()

    loaded = ErnieModel.from_pretrained(tmp_path / "hf").eval()
    assert loaded.config.use_task_id and loaded.config.layer_norm_eps == 1e-5
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    enc = tok(["the cat sat on the mat", "paris is the capital"], padding=True, return_tensors="pt")
    assert len(tok) == 23 and tok.unk_token_id not in enc["input_ids"]
    kwargs = dict(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                  token_type_ids=enc["token_type_ids"], task_type_ids=torch.ones_like(enc["input_ids"]))
    with torch.no_grad():
        want, got = reference(**kwargs), loaded(**kwargs)
    torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooler_output, want.pooler_output, atol=1e-5, rtol=1e-5)


def test_keep_heads_transposes_linear(tmp_path, reference):
    from safetensors.numpy import load_file

    w = np.arange(HIDDEN * 3, dtype=np.float32).reshape(HIDDEN, 3)
    src = write_checkpoint(tmp_path / "paddle", reference, extra={"classifier.weight": w,
                                                                  "classifier.bias": np.zeros(3, np.float32)})
    assert main([str(src), str(tmp_path / "hf"), "--keep-heads"]) == 0
    heads = load_file(str(tmp_path / "hf" / "paddle_heads.safetensors"))
    np.testing.assert_array_equal(heads["classifier.weight"], w.T)


def test_unknown_key_is_named(tmp_path, reference):
    src = write_checkpoint(tmp_path / "p", reference, extra={"ernie.encoder.layers.0.adapter.weight": np.zeros(2)})
    with pytest.raises(ToolkitError, match=r"ernie\.encoder\.layers\.0\.adapter\.weight"):
        convert_paddle_ernie(src, tmp_path / "hf")


def test_missing_key_and_bad_shape(tmp_path, reference):
    src = write_checkpoint(tmp_path / "p", reference, drop="ernie.encoder.layers.1.norm2.bias")
    with pytest.raises(ToolkitError, match=r"encoder\.layer\.1\.output\.LayerNorm\.bias"):
        convert_paddle_ernie(src, tmp_path / "hf")
    src = write_checkpoint(tmp_path / "q", reference,
                           extra={"ernie.encoder.layers.0.linear1.weight": np.zeros((HIDDEN, 65), np.float32)})
    with pytest.raises(ToolkitError, match=r"linear1\.weight' has shape \[32, 65\] but the config implies \[32, 64\]"):
        convert_paddle_ernie(src, tmp_path / "hf")


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "model_state.pdparams"
    with open(path, "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(DataError, match="refusing to unpickle"):
        load_pdparams(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_files(tmp_path, reference):
    with pytest.raises(DataError, match="source folder not found"):
        convert_paddle_ernie(tmp_path / "nope", tmp_path / "hf")
    src = write_checkpoint(tmp_path / "p", reference)
    (src / "vocab.txt").unlink()
    with pytest.raises(DataError, match="vocab.txt not found"):
        convert_paddle_ernie(src, tmp_path / "hf")
    (src / "model_config.json").write_text(json.dumps({"init_args": [{"hidden_size": 32}]}))
    with pytest.raises(DataError, match="missing model field"):
        convert_paddle_ernie(src, tmp_path / "hf")
