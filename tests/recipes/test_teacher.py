"""The multi-task teacher recipe: end to end, resume, sampler, bad input."""
from __future__ import annotations

import json

import pytest

from toolkit.engine import OptimConfig


def _losses(out):
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("prefix") == "train" and "loss" in r}


def _cfg(tiny_bert_dir, fixture_tasks, out, **kw):
    from toolkit.recipes.teacher import TeacherConfig

    base = dict(model=str(tiny_bert_dir), tasks=[str(p) for p in fixture_tasks.values()], output_dir=str(out),
                max_steps=8, optim=OptimConfig(lr=3e-4, warmup_ratio=0.1), log_every=1, eval_every=4, sampling="temperature", temperature=2.0)
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


def _rows(out):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(l).get("prefix") == "train"]


def test_l2sp_anchor_pulls_toward_the_pretrained_weights(tiny_bert_dir, fixture_tasks, tmp_path):
    """L2-SP: the logged penalty is l2sp/2 x the squared distance, and a strong pull keeps the
    weights closer to the start than no pull does."""
    from transformers import AutoModel

    from toolkit.recipes.teacher import AnchorConfig, run_teacher

    start = {k: v.clone() for k, v in AutoModel.from_pretrained(tiny_bert_dir).state_dict().items()}

    def drift(out):
        end = AutoModel.from_pretrained(out / "model").state_dict()
        return sum(((end[k].float() - start[k].float()) ** 2).sum().item() for k in start if k in end)

    free, pulled = tmp_path / "free", tmp_path / "pulled"
    run_teacher(_cfg(tiny_bert_dir, fixture_tasks, free, eval_every=0))
    run_teacher(_cfg(tiny_bert_dir, fixture_tasks, pulled, eval_every=0, anchor=AnchorConfig(l2sp=50.0)))
    rows = _rows(pulled)
    assert rows[0]["anchor/l2sp"] < rows[-1]["anchor/l2sp"]   # zero distance at the start, then it grows
    assert drift(pulled) < 0.5 * drift(free)


def test_relation_anchor_keeps_the_relations(tiny_bert_dir, fixture_tasks, fixture_corpus, tmp_path):
    from toolkit.config import load_config
    from toolkit.recipes.teacher import TeacherConfig, run_teacher

    out = tmp_path / "rel"
    cfg = load_config(TeacherConfig, None, base={
        "model": str(tiny_bert_dir), "tasks": [str(p) for p in fixture_tasks.values()], "output_dir": str(out),
        "max_steps": 6, "log_every": 1, "optim": {"lr": 3e-4},
        "anchor": {"relation": 2.0, "corpus": {"sources": [str(fixture_corpus / "*.txt")], "seq_length": 32,
                                               "shuffle_buffer": 8, "num_workers": 0}}})
    res = run_teacher(cfg)
    assert res["steps"] == 6
    vals = [r["anchor/relation"] for r in _rows(out)]
    assert len(vals) == 6 and all(v == v and v >= 0 for v in vals)
    # Resume carries the anchor stream's position.
    part = tmp_path / "part"
    cfg_part = load_config(TeacherConfig, None, base={**{k: v for k, v in json.loads(
        (out / "config.json").read_text()).items() if k in ("model", "tasks", "max_steps", "log_every")},
        "output_dir": str(part), "optim": {"lr": 3e-4}, "stop_after": 3,
        "anchor": {"relation": 2.0, "corpus": {"sources": [str(fixture_corpus / "*.txt")], "seq_length": 32,
                                               "shuffle_buffer": 8, "num_workers": 0}}})
    assert run_teacher(cfg_part) == {"stopped_at": 3}
    cfg_part.stop_after = 0
    run_teacher(cfg_part)
    a = [r["anchor/relation"] for r in _rows(out)]
    b = {r["step"]: r["anchor/relation"] for r in _rows(part)}
    for step in range(1, 7):
        assert b[step] == pytest.approx(a[step - 1], rel=1e-4, abs=1e-7), step


def test_anchor_config_errors_name_the_field(tiny_bert_dir, fixture_tasks, tmp_path):
    from toolkit.config import load_config
    from toolkit.errors import ConfigError
    from toolkit.recipes.teacher import TeacherConfig

    base = {"model": str(tiny_bert_dir), "tasks": ["x"], "output_dir": str(tmp_path)}
    with pytest.raises(ConfigError, match="anchor.l2sp"):
        load_config(TeacherConfig, None, base={**base, "anchor": {"l2sp": -1}})
    with pytest.raises(ConfigError, match="anchor.corpus.sources"):
        load_config(TeacherConfig, None, base={**base, "anchor": {"relation": 1.0}})
    with pytest.raises(ConfigError, match="'optim.lr'"):
        load_config(TeacherConfig, None, base={**base, "lr": 1e-4})
