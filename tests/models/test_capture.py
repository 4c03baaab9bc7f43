"""QKVCapture hooks vs manual projections; truncate_encoder; layer-number helpers."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, BertConfig, BertForMaskedLM

from toolkit.errors import ConfigError, ToolkitError
from toolkit.models.capture import (QKVCapture, default_teacher_layer, encoder_layers, resolve_layer,
                                    truncate_encoder)


def _batch(vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 7), generator=g)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_ernie_dir", "tiny_bert4_dir"])
def test_captured_qkv_and_hidden_match_manual(fixture, request):
    model = AutoModel.from_pretrained(request.getfixturevalue(fixture)).eval()
    n = model.config.num_hidden_layers
    batch = _batch(model.config.vocab_size)
    with torch.no_grad():
        ref = model(**batch, output_hidden_states=True).hidden_states   # n + 1 entries
        with QKVCapture(model, layers=[0, -1], what=("q", "k", "v", "hidden")) as cap:
            model(**batch)
    assert cap.layers == [0, n - 1]
    layers = encoder_layers(model)
    for j in cap.layers:
        attn = layers[j].attention.self
        with torch.no_grad():
            for w, proj in (("q", attn.query), ("k", attn.key), ("v", attn.value)):
                got = cap.captured[j][w]
                assert got.shape == (2, 7, model.config.hidden_size)
                torch.testing.assert_close(got, proj(ref[j]), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(cap.captured[j]["hidden"], ref[j + 1], rtol=1e-5, atol=1e-6)
    assert cap.get(-1) is cap.captured[n - 1]
    # Hooks are gone after the with-block: a new forward stores nothing new.
    cap.clear()
    with torch.no_grad():
        model(**batch)
    assert cap.captured[0] == {}


def test_student_capture_keeps_grad_and_remove_clears():
    model = AutoModel.from_config(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64))
    cap = QKVCapture(model, layers=[1], what=("v",))
    model(**_batch())
    v = cap.get()["v"]
    assert v.requires_grad
    v.sum().backward()
    assert model.encoder.layer[1].attention.self.value.weight.grad is not None
    cap.remove()
    assert cap.captured[1] == {}
    with pytest.raises(ToolkitError, match="nothing captured"):
        cap.get(1)


def test_capture_through_wrapper_model():
    mlm = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64)).eval()
    with QKVCapture(mlm, layers=[-1], what=("q",)) as cap, torch.no_grad():
        mlm(**_batch())
    assert cap.captured[1]["q"].shape == (2, 7, 32)


@pytest.mark.parametrize("keep", [1, 3])
def test_truncated_model_equals_full_hidden_state(tiny_bert4_dir, keep):
    full = AutoModel.from_pretrained(tiny_bert4_dir).eval()
    cut = truncate_encoder(AutoModel.from_pretrained(tiny_bert4_dir).eval(), keep)
    assert len(cut.encoder.layer) == keep and cut.config.num_hidden_layers == keep
    batch = _batch(full.config.vocab_size)
    with torch.no_grad():
        want = full(**batch, output_hidden_states=True).hidden_states[keep]
        got = cut(**batch).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_truncate_and_capture_errors(tiny_bert_dir):
    model = AutoModel.from_pretrained(tiny_bert_dir)
    for bad in (0, 3, -1):
        with pytest.raises(ConfigError, match="teacher_layer"):
            truncate_encoder(model, bad)
    with pytest.raises(ConfigError, match="layers"):
        QKVCapture(model, layers=[2])
    with pytest.raises(ConfigError, match="what"):
        QKVCapture(model, layers=[0], what=("x",))
    with pytest.raises(ToolkitError, match="encoder.layer"):
        QKVCapture(torch.nn.Linear(2, 2), layers=[0])


def test_resolve_and_default_layers():
    assert resolve_layer(21, 24) == 20
    assert resolve_layer(1, 12) == 0
    assert resolve_layer(-1, 12) == 11
    for bad in (0, 13, -13):
        with pytest.raises(ConfigError, match="teacher_layer"):
            resolve_layer(bad, 12)
    assert [default_teacher_layer(n) for n in (2, 6, 12, 24, 48)] == [2, 6, 12, 21, 42]


@pytest.mark.parametrize("fixture", ["tiny_bert_dir", "tiny_ernie_dir"])
def test_frozen_teacher_cut_gives_the_full_models_qkv(fixture, request):
    """A teacher cut after the read layer's projections returns that layer's Q/K/V exactly as
    the full model computes them, runs fewer layers, and rebinds no method."""
    from toolkit.losses import Needs
    from toolkit.recipes.frozen import FrozenTeacher

    path = request.getfixturevalue(fixture)
    full = AutoModel.from_pretrained(path).eval()
    n = full.config.num_hidden_layers
    batch = _batch(full.config.vocab_size)
    batch.setdefault("token_type_ids", torch.zeros_like(batch["input_ids"]))
    cap = QKVCapture(full, layers=[-1])
    with torch.no_grad():
        full(**batch)
    want = cap.get(-1)
    teacher = FrozenTeacher(path, Needs(teacher={n - 1: {"q", "k", "v"}}), torch.device("cpu"), torch.float32)
    assert teacher.cut == n - 1 and teacher.layers_run == n - 1
    got = teacher(batch)["layers"][n - 1]
    for w in "qkv":
        torch.testing.assert_close(got[w], want[w])
    assert not any(p.requires_grad for p in teacher.model.parameters())
    for layer in encoder_layers(teacher.model):
        assert "forward" not in layer.__dict__   # plain modules: nothing rebound


def test_frozen_teacher_reads_hidden_states_without_a_cut(tiny_bert4_dir):
    """A loss reading a layer's output keeps that layer whole; layers above it never run."""
    from toolkit.losses import Needs
    from toolkit.recipes.frozen import FrozenTeacher

    full = AutoModel.from_pretrained(tiny_bert4_dir).eval()
    batch = _batch(full.config.vocab_size)
    batch.setdefault("token_type_ids", torch.zeros_like(batch["input_ids"]))
    with torch.no_grad():
        hidden = full(**batch, output_hidden_states=True).hidden_states
    teacher = FrozenTeacher(tiny_bert4_dir, Needs(teacher={1: {"hidden"}}), torch.device("cpu"), torch.float32)
    assert teacher.cut is None and teacher.layers_run == 2
    torch.testing.assert_close(teacher(batch)["layers"][1]["hidden"], hidden[2])
    with pytest.raises(ConfigError, match="has 4 layers"):
        FrozenTeacher(tiny_bert4_dir, Needs(teacher={6: {"q"}}), torch.device("cpu"), torch.float32)


def test_activation_checkpointing_same_loss_and_gradients_with_dropout(tiny_bert4_dir):
    """student.activation_checkpointing (transformers' own, non-reentrant) recomputes the layers
    with the same dropout masks: the loss and every gradient match a run without it."""
    batch = _batch(AutoModel.from_pretrained(tiny_bert4_dir).config.vocab_size)

    def run(ckpt: bool):
        model = AutoModel.from_pretrained(tiny_bert4_dir, hidden_dropout_prob=0.3).train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        cap = QKVCapture(model, layers=[-1])
        calls = []
        model.encoder.layer[0].intermediate.dense.register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(123)
        model(**batch)
        qkv = cap.get(-1)
        loss = sum((qkv[w] ** 2).mean() for w in "qkv")
        loss.backward()
        grads = {n_: p.grad.clone() for n_, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads, len(calls)

    ref_loss, ref_grads, ref_calls = run(False)
    loss, grads, calls = run(True)
    assert (ref_calls, calls) == (1, 2)      # the checkpointed layer ran again in the backward
    torch.testing.assert_close(loss, ref_loss)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)
