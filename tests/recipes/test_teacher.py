"""The multi-task teacher recipe: end to end, resume, sampler, bad input."""
from __future__ import annotations

import json

import pytest


def _losses(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("prefix") == "train" and "loss" in r}


def _cfg(tiny_bert_dir, fixture_tasks, out, **kw):
    from toolkit.recipes.teacher import TeacherConfig

    base = dict(model=str(tiny_bert_dir), tasks=[str(p) for p in fixture_tasks.values()], output_dir=str(out),
                max_steps=8, lr=3e-4, log_every=1, eval_every=4, sampling="temperature", temperature=2.0,
                cpu_accel="off")
    base.update(kw)
    return TeacherConfig(**base)


def test_teacher_end_to_end(tiny_bert_dir, fixture_tasks, tmp_path):
    from transformers import AutoModel

    from toolkit.models.task_model import load_task_model
    from toolkit.recipes.teacher import run_teacher

    out = tmp_path / "t"
    res = run_teacher(_cfg(tiny_bert_dir, fixture_tasks, out))
    assert res["steps"] == 8
    assert len(res["history"]) == 2 and res["best_step"] in (4, 8)
    model_dir = out / "model"
    AutoModel.from_pretrained(model_dir)
    model, _ = load_task_model(model_dir)
    assert set(model.heads) == {"senti", "topic", "pair"}
    m = json.loads((model_dir / "metrics.json").read_text())
    assert set(m["tasks"]) == {"senti", "topic", "pair"}
    assert res["throughput"]["tokens_per_s"] > 0
    probs = json.loads((out / "tasks.json").read_text())["probabilities"]
    assert sum(probs.values()) == pytest.approx(1.0)


def test_teacher_resume_matches_uninterrupted(tiny_bert_dir, fixture_tasks, tmp_path):
    from toolkit.recipes.teacher import run_teacher

    full = tmp_path / "full"
    run_teacher(_cfg(tiny_bert_dir, fixture_tasks, full, eval_every=0))
    part = tmp_path / "part"
    assert run_teacher(_cfg(tiny_bert_dir, fixture_tasks, part, eval_every=0, stop_after=3)) == {"stopped_at": 3}
    res = run_teacher(_cfg(tiny_bert_dir, fixture_tasks, part, eval_every=0))
    assert res["steps"] == 8
    a, b = _losses(full), _losses(part)
    assert sorted(a) == list(range(1, 9))
    for step in range(1, 9):
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step


def test_sampler_proportions_match_formula():
    from toolkit.data.multitask import TaskBatchSampler, task_probabilities

    sizes = [1000, 250, 40]
    for mode, T in (("proportional", 1.0), ("temperature", 3.0), ("uniform", 1.0)):
        p = task_probabilities(sizes, mode, T)
        n = [s ** (1 / T) for s in sizes] if mode != "uniform" else [1.0] * 3
        assert p.tolist() == pytest.approx([x / sum(n) for x in n])
        s = TaskBatchSampler(sizes, 4, mode=mode, temperature=T, seed=0)
        draws = [s.next()["task"] for _ in range(6000)]
        freq = [draws.count(i) / len(draws) for i in range(3)]
        assert freq == pytest.approx(p.tolist(), abs=0.025)
    capped = task_probabilities(sizes, "proportional", cap=250)
    assert capped.tolist() == pytest.approx([250 / 540, 250 / 540, 40 / 540])


def test_sampler_ranks_disjoint():
    from toolkit.data.multitask import TaskBatchSampler

    a = TaskBatchSampler([50, 30], 4, world_size=2, rank=0, seed=5)
    b = TaskBatchSampler([50, 30], 4, world_size=2, rank=1, seed=5)
    for _ in range(5):
        x, y = a.next(), b.next()
        assert x["task"] == y["task"]
        assert not set(x["indices"]) & set(y["indices"])


def test_teacher_bad_inputs(tiny_bert_dir, fixture_tasks, tmp_path):
    from toolkit.errors import ConfigError, ToolkitError
    from toolkit.recipes.teacher import TeacherConfig, run_teacher

    with pytest.raises(ConfigError, match="sampling"):
        TeacherConfig(model="x", tasks=["a"], sampling="random")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "train.tsv").write_text("text\tlabel\n")
    (empty / "dev.tsv").write_text("text\tlabel\ngood\tpos\n")
    y = empty / "empty.yaml"
    y.write_text("name: empty\ntype: classification\nformat: tsv\ntrain: train.tsv\ndev: dev.tsv\n"
                 "text_a: text\nlabel: label\nlabels: [neg, pos]\nmetric: accuracy\n")
    with pytest.raises(ToolkitError, match="empty"):
        run_teacher(_cfg(tiny_bert_dir, fixture_tasks, tmp_path / "e", tasks=[str(y)]))
    ds = tmp_path / "bad_ds.json"
    ds.write_text(json.dumps({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4,
                              "gradient_accumulation_steps": 1}))
    with pytest.raises(ConfigError, match="train_batch_size"):
        run_teacher(_cfg(tiny_bert_dir, fixture_tasks, tmp_path / "d", ds_config=str(ds)))


def test_teacher_nonfinite_loss_stops_cleanly(tiny_bert_dir, fixture_tasks, tmp_path, monkeypatch):
    """NaN losses are skipped and counted; after too many in a row the job stops with a clear
    error and the last checkpoint is intact and loadable."""
    from toolkit.engine.checkpoint import find_checkpoint
    from toolkit.errors import TrainingError
    from toolkit.models.task_model import MultiTaskModel
    from toolkit.recipes.teacher import run_teacher

    orig = MultiTaskModel.forward
    calls = {"n": 0}

    def poisoned(self, *a, **kw):
        out = orig(self, *a, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] == 2 or calls["n"] > 4:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(MultiTaskModel, "forward", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match="non-finite"):
        run_teacher(_cfg(tiny_bert_dir, fixture_tasks, out, max_steps=20, save_every=2, eval_every=0,
                         max_nonfinite=3))
    ckpt = find_checkpoint(out / "checkpoints")
    assert ckpt is not None and ckpt.name == "step2"
