"""Every registered distillation loss through the recipe: its value on the first batch against an
independent float64 computation written here from the papers' formulas, and its fall over steps.

The reference never calls toolkit code: it runs the untruncated teacher (``BertForMaskedLM``)
and a float64 copy of the student's initial weights, takes Q/K/V from the layers' own
projections applied to ``output_hidden_states``, and applies the formulas.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

STEPS = 24


@pytest.fixture(scope="module")
def mlm_teacher_dir(tmp_path_factory):
    """A tiny 4-layer BERT *with* an MLM head (hidden 48, 6 heads)."""
    from transformers import BertConfig, BertForMaskedLM

    from conftest import make_tokenizer

    d = tmp_path_factory.mktemp("mlm_teacher")
    tok = make_tokenizer(d)
    torch.manual_seed(3)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=48, num_hidden_layers=4, num_attention_heads=6,
                     intermediate_size=96, max_position_embeddings=128, type_vocab_size=2)
    BertForMaskedLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def _config(teacher, corpus, out, **kw):
    from toolkit.config import load_config
    from toolkit.recipes.distill import DistillConfig

    base = {"teacher": str(teacher), "output_dir": str(out), "max_steps": STEPS, "log_every": 1,
            "optim": {"lr": 2e-3, "warmup_ratio": 0.0, "decay": "constant"},
            "corpus": {"sources": [str(corpus / "*.txt")], "seq_length": 32, "shuffle_buffer": 16},
            "student": {"num_layers": 2, "hidden_size": 48, "num_heads": 6, "intermediate_size": 96,
                        "hidden_dropout": 0.0, "attention_dropout": 0.0}}
    base.update(kw)
    return load_config(DistillConfig, None, base=base)


def _run(cfg):
    """Train; return (logged total loss per step, first forward's inputs, float64 student and
    losses as they were before the first step)."""
    from toolkit.recipes.distill import DistillRecipe

    rec = DistillRecipe(cfg)
    first = {}
    try:
        rec.setup()
        student0 = copy.deepcopy(rec.module.student).double().eval()
        losses0 = copy.deepcopy(rec.module.losses).double()

        def record(module, args, kwargs):
            if not first:
                first.update({k: v for k, v in kwargs.items() if k != "teachers"})
        handle = rec.module.register_forward_pre_hook(record, with_kwargs=True)
        rec.train()
        handle.remove()
    finally:
        rec.cleanup()
    rows = [json.loads(line) for line in (cfg_out(cfg) / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in rows if r.get("prefix") == "train" and "loss" in r}
    return logged, first, student0, losses0


def cfg_out(cfg):
    from pathlib import Path

    return Path(cfg.output_dir)


def _states(model, inputs, with_mlm=False):
    """float64 hidden states (embeddings first) and each layer's Q/K/V, from the model's own modules."""
    enc = model.bert if hasattr(model, "bert") else model
    with torch.no_grad():
        out = enc(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  token_type_ids=inputs["token_type_ids"], output_hidden_states=True)
    hs = out.hidden_states
    qkv = []
    for i, layer in enumerate(enc.encoder.layer):
        a = layer.attention.self
        qkv.append({"q": a.query(hs[i]), "k": a.key(hs[i]), "v": a.value(hs[i])})
    logits = model.cls(hs[-1]) if with_mlm else None
    return hs, qkv, logits


def _teacher(path):
    from transformers import BertForMaskedLM

    return BertForMaskedLM.from_pretrained(path).double().eval()


def _rel_kl(tq, tk, sq, sk, mask, heads):
    """KL(softmax(tq tk^T / sqrt d) || softmax(sq sk^T / sqrt d)) per head, mean over heads and
    real query rows; padded keys excluded."""
    def logp(q, k):
        b, l, h = q.shape
        d = h // heads
        qh = q.view(b, l, heads, d).transpose(1, 2)
        kh = k.view(b, l, heads, d).transpose(1, 2)
        s = qh @ kh.transpose(-1, -2) / d ** 0.5
        s = s.masked_fill(mask[:, None, None, :] == 0, float("-inf"))
        return torch.log_softmax(s, -1)
    lt, ls = logp(tq, tk), logp(sq, sk)
    kl = (lt.exp() * (lt - ls)).nan_to_num(0.0).sum(-1)            # [B, R, L]
    real = mask.bool()[:, None, :].expand_as(kl)
    return kl[real].sum() / (real.sum())


def _inputs64(first):
    return {k: first[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def _falls(logged):
    vals = [logged[s]["loss"] for s in sorted(logged)]
    assert len(vals) == STEPS
    return sum(vals[-4:]) / 4 < 0.8 * sum(vals[:4]) / 4, vals


def test_minilm_v1(mlm_teacher_dir, fixture_corpus, tmp_path):
    cfg = _config(mlm_teacher_dir, fixture_corpus, tmp_path / "v1", loss={"weights": {"minilm_v1": 1.0}})
    logged, first, student0, _ = _run(cfg)
    x = _inputs64(first)
    _, tqkv, _ = _states(_teacher(mlm_teacher_dir), x)
    _, sqkv, _ = _states(student0, x)
    t, s, m = tqkv[-1], sqkv[-1], x["attention_mask"]
    ref = _rel_kl(t["q"], t["k"], s["q"], s["k"], m, 6) + _rel_kl(t["v"], t["v"], s["v"], s["v"], m, 6)
    assert logged[1]["loss"] == pytest.approx(ref.item(), rel=1e-4)
    falls, vals = _falls(logged)
    assert falls, vals


def test_minilmv2_with_a_mixed_teacher(tiny_bert4_dir, mlm_teacher_dir, fixture_corpus, tmp_path):
    """0.3 x the relations of a second teacher + 0.7 x the teacher's, at layer 3 of 4."""
    cfg = _config(mlm_teacher_dir, fixture_corpus, tmp_path / "mix", mix_teacher=str(tiny_bert4_dir), mix_weight=0.3,
                  loss={"teacher_layer": 3, "options": {"minilmv2": {"num_relation_heads": 12}}})
    logged, first, student0, _ = _run(cfg)
    x = _inputs64(first)
    _, sqkv, _ = _states(student0, x)
    m = x["attention_mask"]
    total = 0.0
    for w, path in ((0.7, mlm_teacher_dir), (0.3, tiny_bert4_dir)):
        _, tqkv, _ = _states(_teacher(path), x)
        t, s = tqkv[2], sqkv[-1]
        total += w * sum(_rel_kl(t[p], t[p], s[p], s[p], m, 12) for p in "qkv")
    assert logged[1]["loss"] == pytest.approx(float(total), rel=1e-4)
    assert {"minilmv2@t0", "minilmv2@t1"} <= set(logged[1])
    falls, vals = _falls(logged)
    assert falls, vals


def test_tinybert_full_layer_map(mlm_teacher_dir, fixture_corpus, tmp_path):
    """Uniform map (student layer 1 -> teacher 2, 2 -> 4), embedding term, attention scores and
    the prediction-layer term on masked input."""
    cfg = _config(mlm_teacher_dir, fixture_corpus, tmp_path / "tb", loss={
        "weights": {"tinybert": 1.0}, "options": {"tinybert": {"prediction": True, "temperature": 2.0}}})
    logged, first, student0, losses0 = _run(cfg)
    x = _inputs64(first)
    teacher = _teacher(mlm_teacher_dir)
    t_hs, t_qkv, t_logits = _states(teacher, x, with_mlm=True)
    s_hs, s_qkv, _ = _states(student0, x)
    term = losses0["tinybert"]
    valid = x["attention_mask"].bool()
    n_tok = valid.sum()
    pairs = [(0, 0), (1, 2), (2, 4)]        # (student, teacher) in hidden_states numbering
    hidden = 0.0
    for proj, (si, ti) in zip(term.loss.projections, pairs):
        d = proj(s_hs[si]) - t_hs[ti]
        hidden += (d ** 2)[valid].sum() / (n_tok * d.shape[-1])
    attn = 0.0
    pair_ok = valid[:, None, :, None] & valid[:, None, None, :]
    for si, ti in pairs[1:]:
        def scores(q, k):
            b, l, h = q.shape
            qh, kh = q.view(b, l, 6, h // 6).transpose(1, 2), k.view(b, l, 6, h // 6).transpose(1, 2)
            return qh @ kh.transpose(-1, -2) / (h // 6) ** 0.5
        diff = scores(s_qkv[si - 1]["q"], s_qkv[si - 1]["k"]) - scores(t_qkv[ti - 1]["q"], t_qkv[ti - 1]["k"])
        attn += (diff ** 2).masked_fill(~pair_ok, 0).sum() / (pair_ok.sum() * 6)
    s_logits = term.mlm_head(s_hs[-1])
    mask = first["mlm_mask"].bool()
    assert mask.any() and (x["input_ids"][mask] != 0).all()
    temp = 2.0
    pt = torch.softmax(t_logits[mask] / temp, -1)
    pred = (pt * (torch.log(pt) - torch.log_softmax(s_logits[mask] / temp, -1))).sum(-1).mean() * temp ** 2
    ref = hidden + attn + pred
    assert logged[1]["loss"] == pytest.approx(float(ref), rel=1e-4)
    assert logged[1]["tinybert/prediction"] == pytest.approx(float(pred), rel=1e-4)
    falls, vals = _falls(logged)
    assert falls, vals


def test_logit_kd_masks_and_trains_its_head(mlm_teacher_dir, fixture_corpus, tmp_path):
    cfg = _config(mlm_teacher_dir, fixture_corpus, tmp_path / "kd",
                  loss={"weights": {"logit_kd": 1.0}, "mask_prob": 0.3})
    logged, first, student0, losses0 = _run(cfg)
    x = _inputs64(first)
    mask = first["mlm_mask"].bool()
    # BERT's masking: only real, non-special tokens are chosen, most of them become [MASK].
    assert mask.any() and not (mask & (x["attention_mask"] == 0)).any()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(mlm_teacher_dir)
    assert (x["input_ids"][mask] == tok.mask_token_id).float().mean() > 0.5
    _, _, t_logits = _states(_teacher(mlm_teacher_dir), x, with_mlm=True)
    s_hs, _, _ = _states(student0, x)
    s_logits = losses0["logit_kd"].mlm_head(s_hs[-1])
    pt = torch.softmax(t_logits[mask], -1)
    ref = (pt * (torch.log(pt) - torch.log_softmax(s_logits[mask], -1))).sum(-1).mean()
    assert logged[1]["loss"] == pytest.approx(float(ref), rel=1e-4)
    falls, vals = _falls(logged)
    assert falls, vals


def test_a_new_loss_through_the_registry_alone(tiny_bert4_dir, fixture_corpus, tmp_path):
    """A toy loss: one class and one registration, then usable by name from the job config."""
    from dataclasses import dataclass

    from toolkit.config import arg
    from toolkit.losses import LOSSES, DistillLoss, Needs, register_loss

    @register_loss("toy_hidden_mse")
    class ToyHiddenMSE(DistillLoss):
        @dataclass
        class Options:
            scale: float = arg(1.0, "multiplies the MSE")

        def __init__(self, options, ctx):
            super().__init__(options, ctx)
            self.proj = torch.nn.Linear(ctx.student_config.hidden_size, ctx.teacher_config.hidden_size)
            self.s, self.t = ctx.student_layer, ctx.teacher_layer

        def needs(self):
            return Needs(student={self.s: {"hidden"}}, teacher={self.t: {"hidden"}})

        def forward(self, inputs):
            d = self.proj(inputs.student[self.s]["hidden"]) - inputs.teacher[self.t]["hidden"]
            return {"loss": self.options.scale * d.pow(2).mean()}

    try:
        cfg = _config(tiny_bert4_dir, fixture_corpus, tmp_path / "toy", loss={
            "weights": {"toy_hidden_mse": 1.0}, "teacher_layer": 2, "options": {"toy_hidden_mse": {"scale": 3.0}}})
        logged, first, student0, losses0 = _run(cfg)
        x = _inputs64(first)
        from transformers import BertModel

        t_hs, _, _ = _states(BertModel.from_pretrained(tiny_bert4_dir).double().eval(), x)
        s_hs, _, _ = _states(student0, x)
        ref = 3.0 * (losses0["toy_hidden_mse"].proj(s_hs[-1]) - t_hs[2]).pow(2).mean()
        assert logged[1]["loss"] == pytest.approx(float(ref), rel=1e-4)
        falls, vals = _falls(logged)
        assert falls, vals
    finally:
        LOSSES.pop("toy_hidden_mse", None)
