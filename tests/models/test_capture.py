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
def test_projections_only_keeps_qkv_values_and_gradients(fixture, request):
    """Cutting the last layer after its projections changes neither the captured Q/K/V nor
    the gradients a Q/K/V loss sends to any parameter; removing the cut restores the layer."""
    from toolkit.models.capture import ProjectionsOnly

    path = request.getfixturevalue(fixture)
    batch = _batch(AutoModel.from_pretrained(path).config.vocab_size)

    def run(cut: bool):
        torch.manual_seed(0)
        model = AutoModel.from_pretrained(path).eval()   # eval: no dropout, identical forwards
        cap = QKVCapture(model, layers=[-1])
        handle = ProjectionsOnly(model, -1) if cut else None
        out = model(**batch)
        qkv = cap.get(-1)
        loss = sum((qkv[w] ** 2).mean() for w in "qkv")
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return model, handle, out, {w: qkv[w].detach() for w in "qkv"}, grads

    _, _, full_out, full_qkv, full_grads = run(cut=False)
    model, handle, cut_out, cut_qkv, cut_grads = run(cut=True)
    for w in "qkv":
        torch.testing.assert_close(cut_qkv[w], full_qkv[w])
    assert set(cut_grads) == set(full_grads)
    for name in full_grads:
        torch.testing.assert_close(cut_grads[name], full_grads[name], msg=name)
    # The cut layer passes its input through: the output is the previous layer's.
    n = model.config.num_hidden_layers
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    torch.testing.assert_close(cut_out.last_hidden_state.detach(), hidden[n - 1])
    assert handle.active
    keys = set(model.state_dict())
    assert keys == set(AutoModel.from_pretrained(path).state_dict())   # the cut layer's weights stay in place
    assert "forward" not in model.encoder.layer[n - 1].__dict__       # a module of its own, no method rebound
    handle.remove()
    assert not handle.active and set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).last_hidden_state, full_out.last_hidden_state.detach())


def test_projections_only_rejects_inner_layers(tiny_bert_dir):
    from toolkit.models.capture import ProjectionsOnly

    model = AutoModel.from_pretrained(tiny_bert_dir)
    with pytest.raises(ToolkitError, match="last encoder layer only"):
        ProjectionsOnly(model, 0)
    with pytest.raises(ConfigError, match="out of range"):
        ProjectionsOnly(model, 5)


@pytest.mark.parametrize("cut_last", [True, False])
def test_checkpoint_layers_same_loss_and_gradients_with_dropout(tiny_bert4_dir, cut_last):
    """Checkpointed layers recompute with the same dropout masks: loss and every gradient match."""
    from toolkit.models.capture import CheckpointLayers, ProjectionsOnly

    batch = _batch(AutoModel.from_pretrained(tiny_bert4_dir).config.vocab_size)

    def run(ckpt: bool):
        model = AutoModel.from_pretrained(tiny_bert4_dir, hidden_dropout_prob=0.3).train()
        cap = QKVCapture(model, layers=[-1])
        n = model.config.num_hidden_layers
        if cut_last:
            ProjectionsOnly(model, -1)
        handle = CheckpointLayers(model, range(n - 1 if cut_last else n)) if ckpt else None
        calls = []
        model.encoder.layer[0].intermediate.dense.register_forward_hook(lambda *_: calls.append(1))
        torch.manual_seed(123)
        model(**batch)
        qkv = cap.get(-1)
        loss = sum((qkv[w] ** 2).mean() for w in "qkv")
        loss.backward()
        grads = {n_: p.grad.clone() for n_, p in model.named_parameters() if p.grad is not None}
        return handle, loss.detach(), grads, len(calls)

    _, ref_loss, ref_grads, ref_calls = run(False)
    handle, loss, grads, calls = run(True)
    assert handle.layers == list(range(3 if cut_last else 4))
    assert (ref_calls, calls) == (1, 2)      # the checkpointed layer ran again in the backward
    torch.testing.assert_close(loss, ref_loss)
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_checkpoint_layers_refuses_a_cut_layer(tiny_bert_dir):
    from toolkit.models.capture import CheckpointLayers, ProjectionsOnly

    model = AutoModel.from_pretrained(tiny_bert_dir)
    ProjectionsOnly(model, -1)
    with pytest.raises(ToolkitError, match="cut to its projections"):
        CheckpointLayers(model, [-1])
    with pytest.raises(ToolkitError, match="already cut"):
        ProjectionsOnly(model, -1)
