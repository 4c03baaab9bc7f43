"""toolkit finetune / toolkit eval end to end on tiny models and fixture tasks."""
from __future__ import annotations

import json

import pytest

from toolkit.engine import OptimConfig
from click.testing import CliRunner


def _majority_rate(yaml_path) -> float:
    """Percent of the dev split's most frequent label, read from the TSV directly."""
    rows = (yaml_path.parent / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:]
    labels = [r.split("\t")[-1] for r in rows if r.strip()]
    return 100.0 * max(labels.count(x) for x in set(labels)) / len(labels)


def test_finetune_end_to_end(tiny_bert_dir, fixture_tasks, tmp_path):
    from transformers import AutoModel

    from toolkit.recipes.finetune import FinetuneConfig, run_finetune

    out = tmp_path / "ft"
    # Sentiment carried by two keywords per sentence: learnable by the tiny model in ~60 steps.
    res = run_finetune(FinetuneConfig(model=str(tiny_bert_dir), task=str(fixture_tasks["senti"]),
                                      output_dir=str(out), epochs=10, optim=OptimConfig(lr=2e-3, warmup_ratio=0.1), log_every=1))
    assert res["task"] == "senti"
    majority = _majority_rate(fixture_tasks["senti"])
    assert majority == 50.0
    # Must clearly beat the majority class (16 dev sentences: 14/16 or better).
    assert res["metrics"]["accuracy"] >= 87.5, res["history"]
    # The reported score is the best epoch's, and it was reached after some training.
    assert res["score"] == max(h["accuracy"] for h in res["history"])
    assert res["best_step"] > 0 and res["steps"] == 60
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
                                  "--output-dir", str(tmp_path / "p"), "max_steps=3", "save_model=false"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "p" / "results.json").read_text())
    assert set(res["metrics"]) == {"f1", "accuracy"}
    assert res["steps"] == 3


def test_eval_grid_and_table(tiny_bert_dir, fixture_tasks, tmp_path):
    from toolkit.recipes.evaluate import EvalConfig, run_eval

    out = tmp_path / "ev"
    res = run_eval(EvalConfig(model=str(tiny_bert_dir), tasks=[str(fixture_tasks["senti"]), str(fixture_tasks["topic"])],
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


def test_finetune_stopped_and_resumed_matches_uninterrupted(tiny_bert_dir, fixture_tasks, tmp_path):
    """Stop after 4 of 8 steps (a checkpoint, as a preemption would), resume: the same evaluations,
    the same best step and the same saved weights as a run that never stopped; the checkpoints,
    which only serve a resume, are gone at the end."""
    from safetensors.torch import load_file

    from toolkit.recipes.finetune import FinetuneConfig, run_finetune

    def cfg(out, **kw):
        return FinetuneConfig(model=str(tiny_bert_dir), task=str(fixture_tasks["senti"]), output_dir=str(out),
                              max_steps=8, eval_every=3, optim=OptimConfig(lr=2e-3, warmup_ratio=0.1), log_every=1,
                              **kw)

    full = run_finetune(cfg(tmp_path / "a"))
    assert run_finetune(cfg(tmp_path / "b", stop_after=4)) == {"stopped_at": 4}
    assert (tmp_path / "b" / "checkpoints" / "latest").is_file()
    res = run_finetune(cfg(tmp_path / "b"))
    assert [h["step"] for h in res["history"]] == [3, 6, 8]
    assert res["history"] == pytest.approx(full["history"])
    assert res["best_step"] == full["best_step"] and res["metrics"] == pytest.approx(full["metrics"])
    for name in ("model.safetensors", "heads.safetensors"):
        a, b = load_file(str(tmp_path / "a" / "model" / name)), load_file(str(tmp_path / "b" / "model" / name))
        assert all((a[k] - b[k]).abs().max().item() <= 1e-6 for k in a), name
    assert not (tmp_path / "b" / "checkpoints").exists()


@pytest.mark.timeout(1200)
def test_eval_grid_resumes_after_a_preemption_signal(tiny_bert_dir, fixture_tasks, tmp_path):
    """SIGTERM while the second (lr, seed) run trains: exit 75 with that run's checkpoint. The re-run
    skips the finished run, continues the stopped one from its checkpoint and writes the table."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import subprocess_env

    out = tmp_path / "ev"
    cmd = [sys.executable, "-m", "toolkit", "eval", "--model", str(tiny_bert_dir), "--tasks",
           str(fixture_tasks["senti"]), "--output-dir", str(out), "lrs=1e-3,2e-3", "seeds=1", "max_steps=60",
           "eval_each_epoch=false", "save_models=false", "write_submissions=false", "max_seq_length=32"]
    env = subprocess_env()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first, second = out / "senti" / "lr1e-3_seed1", out / "senti" / "lr2e-3_seed1"
    deadline = time.time() + 600
    while not ((second / "metrics.jsonl").is_file() and (second / "metrics.jsonl").read_text().strip()):
        if proc.poll() is not None:
            pytest.fail("eval ended before the second run could be signalled:\n" + proc.stdout.read()[-3000:])
        assert time.time() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, log[-3000:]
    assert (first / "results.json").is_file() and not (first / "checkpoints").exists()
    assert (second / "checkpoints" / "latest").is_file() and not (second / "results.json").exists()
    done_at = os.stat(first / "results.json").st_mtime_ns
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-3000:]
    assert "lr=0.001 seed=1 finished before" in log and "resumed from step" in log, log[-3000:]
    assert os.stat(first / "results.json").st_mtime_ns == done_at   # not run again
    res = json.loads((out / "results.json").read_text())
    runs = res["tasks"]["senti"]["runs"]
    assert [r["steps"] for r in runs] == [60, 60]
    assert not (second / "checkpoints").exists()
