"""MultiTaskModel forward for each task type, save/load round trip, AutoModel compatibility."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel

from toolkit.errors import DataError, ToolkitError
from toolkit.models.encoder import EncoderSpec, build_encoder, load_tokenizer
from toolkit.models.task_model import MultiTaskModel, load_task_model, save_task_model

B, L = 2, 6


def _model(arch: str = "bert", use_task_id: bool = False) -> MultiTaskModel:
    torch.manual_seed(0)
    enc = build_encoder(EncoderSpec(arch=arch, num_layers=2, hidden_size=32, num_heads=4, intermediate_size=64,
                                    vocab_size=50, max_position_embeddings=32, use_task_id=use_task_id))
    model = MultiTaskModel(enc)
    model.add_head("sst2", "classification", 2, labels=["0", "1"])
    model.add_head("stsb", "regression", 1)
    model.add_head("squad", "span", 2)
    model.add_head("ner", "token_classification", 3, labels=["O", "B", "I"])
    model.add_head("c3", "multiple_choice", 1)
    return model.eval()


def _batch(task: str):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 50, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 4:] = 0
    labels = {"sst2": torch.tensor([0, 1]), "stsb": torch.tensor([0.5, 3.0]),
              "squad": torch.tensor([[1, 2], [0, 0]]), "ner": torch.tensor([[-100, 0, 1, 2, -100, -100]] * 2),
              "c3": torch.tensor([1, 0])}[task]
    if task == "c3":
        ids = torch.randint(5, 50, (B, 3, L), generator=g)
        mask = torch.ones(B, 3, L, dtype=torch.long)
        return dict(input_ids=ids, attention_mask=mask, labels=labels,
                    choice_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]))
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), labels=labels)


SHAPES = {"sst2": (B, 2), "stsb": (B,), "squad": (B, L, 2), "ner": (B, L, 3), "c3": (B, 3)}


@pytest.mark.parametrize("arch,use_task_id", [("bert", False), ("ernie", True)])
def test_forward_every_head(arch, use_task_id):
    model = _model(arch, use_task_id)
    for task, shape in SHAPES.items():
        out = model(task=task, **_batch(task))
        assert out.logits.shape == shape
        assert out.loss is not None and out.loss.dim() == 0 and torch.isfinite(out.loss)
        out.loss.backward()
    batch = _batch("sst2")
    batch.pop("labels")
    assert model(task="sst2", **batch).loss is None
    with pytest.raises(ToolkitError, match="no head for task 'mnli'"):
        model(task="mnli", **batch)


def test_ernie_task_type_ids_reach_the_encoder():
    model = _model("ernie", use_task_id=True)
    batch = _batch("sst2")
    with torch.no_grad():
        zero = model(task="sst2", **batch).logits
        default = model(task="sst2", **{k: v for k, v in batch.items()}, task_type_ids=None).logits
        other = model(task="sst2", **batch, task_type_ids=torch.ones_like(batch["input_ids"])).logits
    torch.testing.assert_close(zero, default)
    assert not torch.allclose(zero, other)


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_ernie_dir"])
def test_save_load_round_trip(request, tmp_path, fixture):
    src = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    model = MultiTaskModel(build_encoder(src))
    model.add_head("sst2", "classification", 2, labels=["neg", "pos"])
    model.add_head("c3", "multiple_choice", 1)
    model.eval()
    tok = load_tokenizer(src)
    out = tmp_path / "saved"
    save_task_model(model, tok, out, extra={"dev": {"sst2": 91.5}})
    assert (out / "model.safetensors").is_file() and (out / "heads.safetensors").is_file()
    loaded, tok2 = load_task_model(out)
    loaded.eval()
    assert loaded.head_specs == model.head_specs
    assert loaded.extra == {"dev": {"sst2": 91.5}}
    assert len(tok2) == len(tok)
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        for task, inp in (("sst2", dict(input_ids=ids, attention_mask=mask)),
                          ("c3", dict(input_ids=ids[:, None].expand(2, 2, 5), attention_mask=mask[:, None].expand(2, 2, 5)))):
            torch.testing.assert_close(model(task=task, **inp).logits, loaded(task=task, **inp).logits,
                                       rtol=0, atol=0)
        auto = AutoModel.from_pretrained(out).eval()
        torch.testing.assert_close(auto(input_ids=ids).last_hidden_state,
                                   model.encoder(input_ids=ids).last_hidden_state)


def test_plain_encoder_dir_loads_without_heads(tiny_bert_dir):
    model, tok = load_task_model(tiny_bert_dir)
    assert model.task_names == [] and tok is not None


def test_corrupt_heads_are_reported(tmp_path, tiny_bert_dir):
    model, tok = load_task_model(tiny_bert_dir)
    model.add_head("sst2", "classification", 2, labels=["a", "b"])
    save_task_model(model, tok, tmp_path)
    meta = json.loads((tmp_path / "heads.json").read_text())
    meta["heads"]["sst2"]["num_labels"] = 3
    (tmp_path / "heads.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match="sst2"):
        load_task_model(tmp_path)
    (tmp_path / "heads.safetensors").unlink()
    with pytest.raises(DataError, match="heads.safetensors"):
        load_task_model(tmp_path)


def test_save_from_gathered_state_dict(tmp_path):
    model = _model()
    # a ZeRO-3-style gathered copy: different weights from the live (sharded) module
    state = {f"module.{k}": v + 1.0 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    save_task_model(model, None, tmp_path, state_dict=state)
    loaded, _ = load_task_model(tmp_path, load_tokenizer_files=False)
    got = loaded.state_dict()
    for k, v in state.items():
        torch.testing.assert_close(got[k[len("module."):]], v)
    with pytest.raises(ToolkitError, match="encoder"):
        save_task_model(model, None, tmp_path / "x", state_dict={"heads.sst2.classifier.weight": torch.zeros(2, 32)})
