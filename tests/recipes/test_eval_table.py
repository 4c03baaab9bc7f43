"""`toolkit eval`'s closing table: tasks x (main metric, each secondary metric), mean ± std over
seeds at the best learning rate; printed and saved as results.md."""
from __future__ import annotations

import json
import statistics


def _cell(values):
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def _row(table, task):
    (line,) = [ln for ln in table.splitlines() if ln.startswith(f"| {task} |")]
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_cells_are_mean_and_std_over_seeds(tiny_bert_dir, fixture_tasks, tmp_path, capsys):
    from toolkit.recipes.evaluate import EvalConfig, run_eval

    out = tmp_path / "ev"
    run_eval(EvalConfig(model=str(tiny_bert_dir), tasks=[str(fixture_tasks["senti"]), str(fixture_tasks["pair"])],
                        output_dir=str(out), lrs=[1e-4, 2e-3], seeds=[1, 2], max_steps=4))
    printed = capsys.readouterr().out
    table = (out / "results.md").read_text(encoding="utf-8")
    assert table in printed  # printed at the end, and saved
    assert "mean ± std over 2 seeds" in table
    header = [c.strip() for c in table.splitlines()[4].strip("|").split("|")]
    assert header == ["task", "main metric", "score", "accuracy", "best lr"]

    res = json.loads((out / "results.json").read_text())
    for task, main, secondary in (("senti", "accuracy", None), ("pair", "f1", "accuracy")):
        runs = res["tasks"][task]["runs"]
        by_lr = {lr: [r for r in runs if r["lr"] == lr] for lr in (1e-4, 2e-3)}
        best_lr = max(by_lr, key=lambda lr: statistics.mean(r["metrics"][main] for r in by_lr[lr]))
        at_best = by_lr[best_lr]
        assert len(at_best) == 2
        cells = _row(table, task)
        assert cells[1] == main
        assert cells[2] == _cell([r["metrics"][main] for r in at_best])
        assert cells[3] == ("" if secondary is None else _cell([r["metrics"][secondary] for r in at_best]))
        assert float(cells[4]) == best_lr
    average = statistics.mean(res["tasks"][t]["best"]["score"] for t in ("senti", "pair"))
    assert f"**{average:.2f}**" in _row(table, "**average**")[2]


def test_table_columns_union_and_suffixed_metrics():
    from toolkit.recipes.evaluate import render_table

    def task(main, columns, means, stds, score, std):
        return {"main_metric": main, "columns": columns,
                "best": {"score": score, "std": std, "lr": 2e-5, "metrics_mean": means, "metrics_std": stds}}

    summary = {"model": "m", "seeds": [1, 2], "average": 50.0, "tasks": {
        "mnli": task("accuracy", ["accuracy_m", "accuracy_mm"], {"accuracy_m": 80.0, "accuracy_mm": 81.0},
                     {"accuracy_m": 0.5, "accuracy_mm": 0.25}, 80.5, 0.1),
        "stsb": task("pearson", ["spearman"], {"spearman": 88.125}, {"spearman": 1.0}, 89.0, 0.0),
    }}
    lines = render_table(summary).splitlines()
    assert lines[4] == "| task | main metric | score | accuracy_m | accuracy_mm | spearman | best lr |"
    assert lines[6] == "| mnli | accuracy | 80.50 ± 0.10 | 80.00 ± 0.50 | 81.00 ± 0.25 |  | 2e-05 |"
    assert lines[7] == "| stsb | pearson | 89.00 ± 0.00 |  |  | 88.12 ± 1.00 | 2e-05 |"
    assert lines[8] == "| **average** | | **50.00** | | | | |"
