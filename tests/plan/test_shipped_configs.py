"""Every job config shipped in configs/ passes `toolkit plan` at its real size (BERT-large and
ERNIE 3.0 teachers, from the reference config.json files of configs/models/), and the shapes
the plan counts agree with transformers' own models."""
from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

#: shipped job YAML -> (job, the model field set to the real-size reference config it is written for)
SHIPPED = {
    "teacher_glue.yaml": ("teacher", {"model": "bert-large-uncased"}),
    "teacher_clue.yaml": ("teacher", {"model": "ernie-3.0-xbase-zh"}),
    "distill_bert_large.yaml": ("distill", {"teacher": "bert-large-uncased"}),
    "distill_ernie3.yaml": ("distill", {"teacher": "ernie-3.0-xbase-zh"}),
    "eval_glue.yaml": ("eval", {"model": "minilmv2-l6-h384-uncased"}),
    "eval_clue.yaml": ("eval", {"model": "ernie-3.0-micro-zh"}),
    "pipeline_en.yaml": ("pipeline", {"teacher": "bert-base-uncased"}),
}

#: Parameters of the reference encoders (with pooler), as transformers counts them.
KNOWN_PARAMS = {"bert-large-uncased": 335_141_888, "bert-base-uncased": 109_482_240}


def _plan(name: str, ds: str = None, nodes: int = 1, gpus: int = 8):
    from toolkit.jobs import build_config
    from toolkit.plan import Hardware, make_plan

    job, models = SHIPPED[name]
    overrides = [f"{k}={v}" for k, v in models.items()]
    cfg = build_config(job, str(ROOT / "configs" / name), overrides, options={"ds_config": ds} if ds else None)
    return make_plan(job, cfg, Hardware(nodes=nodes, gpus_per_node=gpus), source=name)


def test_every_shipped_config_is_covered():
    assert {p.name for p in (ROOT / "configs").glob("*.yaml")} == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_config_passes_plan_at_real_size(name):
    from toolkit.plan import render

    plan = _plan(name)
    text = render(plan, name)
    assert "checks: passed" in text and plan.fits, text
    plans = plan.stages or [plan]
    for p in plans:
        assert p.memory.peak > 0 and p.flops > 0 and p.seconds > 0
    # The models are the real ones, not toys.
    trained = [p.facts.trained.shape for p in plans]
    frozen = [p.facts.frozen.shape for p in plans if p.facts.frozen is not None]
    assert max(s.params for s in trained + frozen) > 20_000_000


def test_distillation_plans_have_the_papers_sizes():
    bert = _plan("distill_bert_large.yaml", ds="zero2_bf16.json", nodes=2)
    t, s = bert.facts.frozen, bert.facts.trained
    assert (t.shape.layers, t.shape.hidden, t.shape.heads, t.shape.vocab) == (24, 1024, 16, 30522)
    assert t.shape.params == KNOWN_PARAMS["bert-large-uncased"] and t.layers_run == 21
    assert (s.shape.layers, s.shape.hidden, bert.facts.relation_heads) == (6, 384, 64)
    assert bert.facts.ds["train_batch_size"] == 8 * 16
    ernie = _plan("distill_ernie3.yaml", ds="zero2_bf16.json")
    t, s = ernie.facts.frozen, ernie.facts.trained
    assert (t.shape.layers, t.shape.hidden, t.shape.vocab, s.shape.vocab) == (20, 1024, 40000, 40000)
    assert ernie.facts.relation_heads == 64 and t.layers_run == 18


def test_the_old_ernie_config_fails_its_plan():
    """12 relation heads do not divide the ERNIE 3.0 xbase teacher's hidden size 1024."""
    from toolkit.errors import ConfigError
    from toolkit.jobs import build_config
    from toolkit.plan import Hardware, make_plan

    cfg = build_config("distill", str(ROOT / "configs" / "distill_ernie3.yaml"),
                       ["teacher=ernie-3.0-xbase-zh", "loss.options.minilmv2.num_relation_heads=12"])
    with pytest.raises(ConfigError, match="loss.options.minilmv2.num_relation_heads.*1024"):
        make_plan("distill", cfg, Hardware())


@pytest.mark.parametrize("name", ["bert-base-uncased", "ernie-3.0-nano-zh", "ernie-3.0-medium-zh"])
def test_shapes_match_transformers_counts(name):
    """The meta-device count equals a real (randomly initialised) transformers model's."""
    import torch
    from transformers import AutoConfig, AutoModel

    from toolkit.plan.shapes import reference_dir, shape_from_dir

    shape = shape_from_dir(reference_dir(name), "model")
    config = AutoConfig.from_pretrained(reference_dir(name))
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    assert shape.params == sum(p.numel() for p in model.parameters())
    if name in KNOWN_PARAMS:
        assert shape.params == KNOWN_PARAMS[name]
    cut = shape.params_up_to(2, last_projections_only=True)
    assert cut == shape.embedding_params + shape.layer_params + 3 * (shape.hidden * shape.hidden + shape.hidden)
