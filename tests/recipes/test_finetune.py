"""toolkit finetune / toolkit eval end to end on tiny models and fixture tasks."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner


def test_finetune_end_to_end(tiny_bert_dir, fixture_tasks, tmp_path):
    from transformers import AutoModel

    from toolkit.recipes.finetune import FinetuneConfig, run_finetune

    out = tmp_path / "ft"
    res = run_finetune(FinetuneConfig(cpu_accel="off", model=str(tiny_bert_dir), task=str(fixture_tasks["senti"]),
                                      output_dir=str(out), epochs=2, lr=5e-4, log_every=1))
    assert res["task"] == "senti"
    assert 0.0 <= res["metrics"]["accuracy"] <= 100.0
    assert res["steps"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == res["metrics"]
    assert saved["throughput"]["train_samples_per_s"] > 0
    enc = AutoModel.from_pretrained(out / "model")
    assert enc.config.num_hidden_layers == 2
    assert (out / "model" / "heads.json").is_file()


def test_finetune_cli_and_bad_task(tiny_bert_dir, fixture_tasks, tmp_path):
    from toolkit.cli import main

    r = CliRunner().invoke(main, ["finetune", "--model", str(tiny_bert_dir), "--task", "no_such_task",
                                  "--output-dir", str(tmp_path / "x")])
    assert r.exit_code == 2
    assert "unknown task 'no_such_task'" in r.output
    r = CliRunner().invoke(main, ["finetune", "--model", str(tiny_bert_dir), "--task", str(fixture_tasks["pair"]),
                                  "--output-dir", str(tmp_path / "p"), "max_steps=3", "save_model=false",
                                  "cpu_accel=off"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert set(res["metrics"]) == {"f1", "accuracy"}
    assert res["steps"] == 3


def test_eval_grid_and_table(tiny_bert_dir, fixture_tasks, tmp_path):
    from toolkit.recipes.evaluate import EvalConfig, run_eval

    out = tmp_path / "ev"
    res = run_eval(EvalConfig(cpu_accel="off", model=str(tiny_bert_dir), tasks=[str(fixture_tasks["senti"]), str(fixture_tasks["topic"])],
                              output_dir=str(out), lrs=[1e-4, 5e-4], seeds=[1, 2], max_steps=3))
    assert set(res["tasks"]) == {"senti", "topic"}
    for t in res["tasks"].values():
        assert len(t["runs"]) == 4
        best = max(t["per_lr"].values(), key=lambda v: v["mean"])
        assert t["best"]["score"] == pytest.approx(best["mean"])
    table = (out / "results.md").read_text()
    for name, t in res["tasks"].items():
        assert f"| {name} |" in table and f"{t['best']['score']:.2f}" in table
    assert json.loads((out / "results.json").read_text())["average"] == pytest.approx(res["average"])
