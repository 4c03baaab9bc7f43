"""The distillation recipe: end to end, teacher truncation, exact resume, bad input."""
from __future__ import annotations

import json

import pytest
import torch


def _cfg(teacher, corpus, out, **kw):
    from toolkit.config import load_config
    from toolkit.recipes.distill import DistillConfig

    base = {"teacher": str(teacher), "output_dir": str(out), "max_steps": 6, "log_every": 1,
            "optim": {"lr": 5e-4, "warmup_ratio": 0.04},
            "corpus": {"sources": [str(corpus / "*.txt")], "seq_length": 32, "shuffle_buffer": 16},
            "student": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64},
            "loss": {"options": {"minilmv2": {"num_relation_heads": 8}}}}
    for k, v in kw.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return load_config(DistillConfig, None, base=base)


def _losses(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("prefix") == "train" and "loss" in r}


def test_distill_end_to_end(tiny_bert4_dir, fixture_corpus, tmp_path):
    from transformers import AutoModel

    from toolkit.recipes.distill import DistillRecipe

    out = tmp_path / "d"
    rec = DistillRecipe(_cfg(tiny_bert4_dir, fixture_corpus, out, loss={"teacher_layer": 3}))
    try:
        rec.setup()
        # The teacher is truncated below the layer the loss reads: layer 4 never runs, and
        # MiniLMv2 reads only layer 3's Q/K/V, so that layer is cut after its projections.
        teacher = rec.teachers[0]
        assert len(teacher.model.encoder.layer) == 2 and teacher.cut == 2
        assert not any(p.requires_grad for p in teacher.model.parameters())
        assert not any(p.requires_grad for p in teacher.cut_block.parameters())
        # Plain PyTorch modules (nothing swapped or rebound).
        kinds = {type(m) for m in rec.module.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Linear))}
        assert kinds == {torch.nn.Dropout, torch.nn.Linear}
        # AdamW groups as in BERT: matrices decayed, biases and LayerNorm weights not.
        groups = rec.engine.ds.optimizer.param_groups
        assert [g["weight_decay"] for g in groups] == [rec.cfg.optim.weight_decay, 0.0]
        assert all(p.ndim == 1 for p in groups[1]["params"]) and all(p.ndim >= 2 for p in groups[0]["params"])
        res = rec.train()
    finally:
        rec.cleanup()
    assert res["steps"] == 6 and res["teacher_layer"] == 3
    assert res["throughput"]["tokens_per_s"] > 0 and res["throughput"]["samples_per_s"] > 0
    assert "data_wait_frac" in res["throughput"] and "peak_mem_mb" in res["throughput"]
    student = AutoModel.from_pretrained(out / "student")
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 32
    assert (out / "student" / "tokenizer.json").is_file() or (out / "student" / "vocab.txt").is_file()
    losses = _losses(out)
    assert all(v == v and v >= 0 for v in losses.values())  # finite, non-negative KL
    # The job log says which relation-KL code runs, with its CPU blocking.
    log_text = "\n".join(p.read_text() for p in (out / "logs").glob("rank*.log"))
    assert "relation KL chunked (blocks of" in log_text


def check_resume_matches_uninterrupted(teacher, corpus, tmp_path, stop_after: int, rel: float, abs_: float,
                                       **kw) -> None:
    """6 steps in one go against ``stop_after`` steps, a checkpoint, and a resumed run to 6."""
    from toolkit.recipes.distill import run_distill

    full, part = tmp_path / "full", tmp_path / "part"
    run_distill(_cfg(teacher, corpus, full, **kw))
    assert run_distill(_cfg(teacher, corpus, part, stop_after=stop_after, **kw)) == {"stopped_at": stop_after}
    res = run_distill(_cfg(teacher, corpus, part, **kw))
    assert res["steps"] == 6
    a, b = _losses(full), _losses(part)
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step], rel=rel, abs=abs_), step


def test_distill_resume_matches_uninterrupted(tiny_bert4_dir, fixture_corpus, tmp_path):
    check_resume_matches_uninterrupted(tiny_bert4_dir, fixture_corpus, tmp_path, stop_after=2, rel=1e-5, abs_=1e-7)


def test_distill_init_from_teacher_layers_and_v1_tinybert(tiny_bert4_dir, fixture_corpus, tmp_path):
    from toolkit.recipes.distill import run_distill

    out = tmp_path / "v1"
    res = run_distill(_cfg(tiny_bert4_dir, fixture_corpus, out, max_steps=2,
                           student={"init": "teacher_layers", "num_layers": 2, "hidden_size": 48, "num_heads": 6,
                                    "intermediate_size": 96, "teacher_layers": [2, 4]},
                           loss={"options": {"minilmv2": {"num_relation_heads": 6}},
                                 "weights": {"minilmv2": 1.0, "minilm_v1": 0.5, "tinybert": 0.1}}))
    assert res["steps"] == 2
    assert {"minilmv2", "minilm_v1", "tinybert"} <= set(res["final_losses"])


def test_distill_bad_config(tiny_bert4_dir, fixture_corpus, tmp_path):
    from toolkit.errors import ConfigError
    from toolkit.recipes.distill import run_distill

    with pytest.raises(ConfigError, match="teacher_layer"):
        run_distill(_cfg(tiny_bert4_dir, fixture_corpus, tmp_path / "a", loss={"teacher_layer": 9}))
    with pytest.raises(ConfigError, match="loss.options.minilmv2.num_relation_heads"):
        run_distill(_cfg(tiny_bert4_dir, fixture_corpus, tmp_path / "b",
                         loss={"options": {"minilmv2": {"num_relation_heads": 5}}}))
    # Fields of the flat layout say where they went.
    with pytest.raises(ConfigError, match="'optim.lr'"):
        _cfg(tiny_bert4_dir, fixture_corpus, tmp_path / "d", lr=1e-3)
    with pytest.raises(ConfigError, match="'loss.options.minilmv2.num_relation_heads'"):
        _cfg(tiny_bert4_dir, fixture_corpus, tmp_path / "e", loss={"num_relation_heads": 8})
    with pytest.raises(ConfigError, match="loss.options.tinybert"):
        _cfg(tiny_bert4_dir, fixture_corpus, tmp_path / "f", loss={"options": {"tinybert": {}}})
    with pytest.raises(ConfigError, match="loss.options.minilmv2.relatoins"):
        _cfg(tiny_bert4_dir, fixture_corpus, tmp_path / "g", loss={"options": {"minilmv2": {"relatoins": ["qq"]}}})
    with pytest.raises(ConfigError, match="loss.weights.bogus"):
        _cfg(tiny_bert4_dir, fixture_corpus, tmp_path / "c", loss={"weights": {"bogus": 1.0}})


def test_distill_full_last_layer_when_a_loss_reads_hidden_states(tiny_bert4_dir, fixture_corpus, tmp_path):
    """TinyBERT reads the distilled layer's output, so that layer must run in full."""
    from toolkit.recipes.distill import DistillRecipe

    rec = DistillRecipe(_cfg(tiny_bert4_dir, fixture_corpus, tmp_path / "tb", max_steps=1,
                             student={"num_layers": 2, "hidden_size": 48, "num_heads": 6, "intermediate_size": 96},
                             loss={"options": {"minilmv2": {"num_relation_heads": 6},
                                               "tinybert": {"layer_map": "pair"}},
                                   "weights": {"minilmv2": 1.0, "tinybert": 0.1}}))
    try:
        rec.setup()
        assert rec.teachers[0].cut is None and len(rec.teachers[0].model.encoder.layer) == 4
    finally:
        rec.cleanup()


def test_distill_activation_checkpointing_matches_plain(tiny_bert4_dir, fixture_corpus, tmp_path):
    """Recomputing the student's layers changes memory, not the training trajectory."""
    from toolkit.recipes.distill import run_distill

    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    run_distill(_cfg(tiny_bert4_dir, fixture_corpus, plain, max_steps=3))
    run_distill(_cfg(tiny_bert4_dir, fixture_corpus, ckpt, max_steps=3, student={"activation_checkpointing": True}))
    a, b = _losses(plain), _losses(ckpt)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-7), step


def test_distill_bf16_config_on_a_native_bf16_cpu(tiny_bert4_dir, fixture_corpus, tmp_path, monkeypatch):
    # What a Sapphire Rapids / Zen 4 host does with ds_configs/zero2_bf16.json: student and frozen
    # teacher in bf16, fp32 relation statistics, finite losses. Patched so any CPU takes this path.
    from toolkit.engine import precision
    from toolkit.recipes.distill import DistillRecipe

    monkeypatch.setattr(precision, "native_bf16_supported", lambda device: True)
    out = tmp_path / "bf16"
    rec = DistillRecipe(_cfg(tiny_bert4_dir, fixture_corpus, out, ds_config="ds_configs/zero2_bf16.json"))
    try:
        rec.setup()
        assert rec.engine.compute_dtype == torch.bfloat16
        assert next(rec.teachers[0].model.parameters()).dtype == torch.bfloat16
        assert {p.dtype for p in rec.module.parameters()} == {torch.bfloat16}
        res = rec.train()
    finally:
        rec.cleanup()
    assert res["steps"] == 6 and res["nonfinite_losses"] == 0
    losses = _losses(out)
    assert len(losses) == 6 and all(0 <= v < 1 for v in losses.values())


def test_parameters_no_loss_reaches_are_frozen_not_decayed(tiny_bert4_dir, fixture_corpus, tmp_path):
    """The relation loss reads Q/K/V of the student's last layer: what comes after them there gets
    no gradient. It is frozen at setup (DeepSpeed would hand it zero gradients and AdamW would decay
    it) and ends the run with its initial values; everything the loss reaches trains."""
    from toolkit.recipes.distill import DistillRecipe

    r = DistillRecipe(_cfg(tiny_bert4_dir, fixture_corpus, tmp_path, max_steps=3))
    try:
        r.setup()
        student = r.module.student
        frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not p.requires_grad}
        trained = {n: p.detach().clone() for n, p in student.named_parameters() if p.requires_grad}
        last = student.config.num_hidden_layers - 1
        assert f"encoder.layer.{last}.intermediate.dense.weight" in frozen
        assert f"encoder.layer.{last}.attention.output.dense.weight" in frozen
        assert f"encoder.layer.{last}.attention.self.query.weight" in trained
        assert not any(n.startswith(f"encoder.layer.{last - 1}.") for n in frozen)
        r.train()
        after = dict(student.named_parameters())
        for n, v in frozen.items():
            assert torch.equal(after[n].detach(), v), n
        assert all(not torch.equal(after[n].detach(), v) for n, v in trained.items() if n.endswith("query.weight"))
    finally:
        r.cleanup()
