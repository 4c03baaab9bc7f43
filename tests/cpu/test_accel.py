"""``cpu_accel: auto``: toolkit.cpu.accelerate switches what fits, says what it did and what it
skipped and why, changes no numbers beyond fp32 rounding, and the recipes save its record."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from toolkit.cpu import accelerate
from toolkit.cpu.accel import SPEEDUPS


def _bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    return BertModel(BertConfig(vocab_size=99, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                                intermediate_size=64, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0))


def _ids():
    return torch.randint(1, 99, (3, 11), generator=torch.Generator().manual_seed(0))


def test_off_changes_nothing():
    model = _bert()
    before = [type(m) for m in model.modules()]
    rec = accelerate(model, trained=True, cfg_value="off")
    assert rec["cpu_accel"] == "off" and rec["applied"] == {} and rec["skipped"] == {}
    assert [type(m) for m in model.modules()] == before


def test_auto_on_a_trained_model_switches_and_keeps_its_numbers():
    model, plain = _bert(), _bert()
    rec = accelerate(model, trained=True, cfg_value="auto")
    assert set(rec["applied"]) | set(rec["skipped"]) == {n for n in SPEEDUPS if n != "relation_kl"}
    assert rec["model"] == "BertModel" and rec["trained"] is True
    json.dumps(rec)                                          # saved with the job's metrics
    if "onednn_linears" in rec["applied"]:                   # every nn.Linear, pooler included
        assert rec["applied"]["onednn_linears"] == sum(type(m) is nn.Linear for m in plain.modules())
    # Evaluation (no dropout): the same outputs to fp32 rounding; training: a gradient flows.
    model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(_ids()).last_hidden_state, plain(_ids()).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)
    model.train()
    model(_ids()).last_hidden_state.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "pooler" not in n)
    # Each speed-up comes off again.
    for speedup in SPEEDUPS.values():
        speedup.remove(model)
    assert {type(m) for m in model.modules() if isinstance(m, (nn.Linear, nn.Dropout))} == {nn.Linear, nn.Dropout}


def test_auto_skips_a_model_that_is_not_fp32_on_the_cpu():
    rec = accelerate(_bert().double(), trained=True, cfg_value="auto")
    assert rec["applied"] == {}
    assert all("not an fp32 CPU model (cpu float64)" == why for why in rec["skipped"].values())


def test_auto_registers_the_relation_kernel_for_a_model_with_the_relation_loss():
    from toolkit.losses import MiniLMv2RelationLoss
    from toolkit.losses.relation_kl import relation_kl_names

    holder = nn.ModuleDict({"student": _bert(), "loss": MiniLMv2RelationLoss(4)})
    rec = accelerate(holder, trained=True, cfg_value="auto")
    if "relation_kl" in rec["applied"]:
        assert rec["applied"]["relation_kl"] == "cpu_fused" and "cpu_fused" in relation_kl_names()
    else:
        assert rec["skipped"]["relation_kl"] and "cpu_fused" not in relation_kl_names()


def test_a_finetune_job_with_auto_saves_the_record(tiny_bert_dir, fixture_tasks, tmp_path):
    from toolkit.recipes.finetune import FinetuneConfig, run_finetune

    out = tmp_path / "ft"
    res = run_finetune(FinetuneConfig(model=str(tiny_bert_dir), task=str(fixture_tasks["senti"]), output_dir=str(out),
                                      max_steps=3, eval_each_epoch=False, save_model=False, cpu_accel="auto"))
    saved = json.loads((out / "results.json").read_text())
    assert saved["cpu_accel"] == res["cpu_accel"] and res["cpu_accel"]["cpu_accel"] == "auto"
    assert res["cpu_accel"]["applied"] or res["cpu_accel"]["skipped"]
    assert json.loads((out / "config.json").read_text())["cpu_accel"] == "auto"


def test_a_distill_job_with_auto_runs_the_relation_kernel(tiny_bert4_dir, fixture_corpus, tmp_path, caplog):
    from toolkit.config import load_config
    from toolkit.recipes.distill import DistillConfig, run_distill

    out = tmp_path / "d"
    cfg = load_config(DistillConfig, None, base={
        "teacher": str(tiny_bert4_dir), "output_dir": str(out), "max_steps": 3, "log_every": 1, "cpu_accel": "auto",
        "corpus": {"sources": [str(fixture_corpus / "*.txt")], "seq_length": 32, "shuffle_buffer": 16},
        "student": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64},
        "loss": {"options": {"minilmv2": {"num_relation_heads": 8}}}})
    caplog.set_level("INFO", logger="toolkit.cpu")
    res = run_distill(cfg)
    rec = res["cpu_accel"]
    assert set(rec) == {"teacher", "student"} and rec["teacher"]["trained"] is False
    assert "relation_kl" not in rec["teacher"]["applied"]           # the teacher holds no relation loss
    assert "cpu_accel auto: teacher:" in caplog.text and "cpu_accel auto: student:" in caplog.text
    log = "\n".join(p.read_text() for p in (out / "logs").glob("rank*.log"))
    if rec["student"]["applied"].get("relation_kl") == "cpu_fused":
        assert "relation KL cpu_fused" in log
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line and '"train"' in line]
    assert len(losses) == 3 and all(v == v for v in losses)


@pytest.mark.parametrize("value", ["auto", "off", False, "OFF"])
def test_config_value_is_normalised_and_saved(value, tmp_path):
    from toolkit.config import load_config, save_config
    from toolkit.recipes.finetune import FinetuneConfig

    cfg = load_config(FinetuneConfig, None, [f"cpu_accel={value}"], base={"model": "m", "task": "t"})
    save_config(cfg, tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["cpu_accel"] == ("auto" if value == "auto" else "off")


def test_a_bad_value_names_the_field():
    from toolkit.config import load_config
    from toolkit.errors import ConfigError
    from toolkit.recipes.distill import DistillConfig

    with pytest.raises(ConfigError, match="cpu_accel.*auto, off.*'fast'"):
        load_config(DistillConfig, None, ["cpu_accel=fast"], base={"teacher": "t"})
