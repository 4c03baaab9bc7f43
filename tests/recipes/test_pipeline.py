"""The whole MITKD pipeline on fixture data with tiny models: artefacts exist and agree."""
from __future__ import annotations

import json
import re


def _cfg(tiny_bert4_dir, fixture_tasks, fixture_corpus, out, **kw):
    from toolkit.config import load_config
    from toolkit.recipes.pipeline import PipelineConfig

    base = {
        "preset": "tiny", "output_dir": str(out), "teacher": str(tiny_bert4_dir),
        "in_domain": [str(fixture_tasks["senti"]), str(fixture_tasks["topic"])],
        "out_of_domain": [str(fixture_tasks["pair"])], "corpus": [str(fixture_corpus / "*.txt")],
        "seeds": [1, 2], "low_resource": 12,
        "teacher_job": {"max_steps": 6, "log_every": 1, "optim": {"lr": 3e-4}},
        "distill_job": {"max_steps": 4, "corpus": {"seq_length": 32, "shuffle_buffer": 8},
                        "student": {"init": "spec", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64},
                        "loss": {"options": {"minilmv2": {"num_relation_heads": 8}}}},
        "eval_job": {"max_steps": 3, "max_seq_length": 32, "lrs": [5e-4]},
        "probe_job": {"max_seq_length": 32}, "evaluate_teacher": True, "probe_in_domain": True,
    }
    base.update(kw)
    return load_config(PipelineConfig, None, base=base)


def test_pipeline_end_to_end(tiny_bert4_dir, fixture_tasks, fixture_corpus, tmp_path):
    from transformers import AutoModel

    from toolkit.recipes.pipeline import run_pipeline

    out = tmp_path / "pipe"
    res = run_pipeline(_cfg(tiny_bert4_dir, fixture_tasks, fixture_corpus, out))
    for f in ("report.md", "results.json", "comparison.png", "curves.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    saved = json.loads((out / "results.json").read_text())
    assert saved["results"] == json.loads(json.dumps(res["results"]))
    assert set(saved["results"]) == {"teacher", "mitkd", "baseline"}
    assert set(saved["results"]["mitkd"]) == {"full", "low_resource"}
    assert saved["in_domain_tasks"] == ["senti", "topic"] and saved["out_of_domain_tasks"] == ["pair"]
    # Every number in the report's tables is the one in results.json.
    report = (out / "report.md").read_text()
    for model in ("teacher", "mitkd", "baseline"):
        for setting in ("full", "low_resource"):
            r = saved["results"][model][setting]
            for t in r["tasks"].values():
                assert f"{t['score']:.2f} ± {t['std']:.2f}" in report
                assert len(t["scores"]) == 2
            assert f"{r['average']:.2f}" in report
    assert re.search(r"MITKD .* vs baseline", report)
    for name in ("mitkd", "baseline"):
        student = AutoModel.from_pretrained(saved["models"][name]["path"])
        assert student.config.num_hidden_layers == 2
        assert saved["models"][name]["params"] > 0
        assert saved["models"][name]["inference"]["samples_per_s"] > 0
    # A re-run skips every finished stage and gives the same results.
    again = run_pipeline(_cfg(tiny_bert4_dir, fixture_tasks, fixture_corpus, out))
    assert again["results"] == res["results"]
    assert all((out / s / "STAGE_COMPLETE.json").is_file()
               for s in ("data", "teacher", "probe_pretrained", "probe_teacher", "mitkd_mix75", "baseline"))
    # The teacher generality check: both teachers probed on every probe-able task.
    gen = saved["teacher_generality"]
    assert set(gen["tasks"]) == {"senti", "topic", "pair"}
    for r in gen["tasks"].values():
        assert r["forgetting"] == r["pretrained"] - r["multitask"]
    assert "## Teacher generality" in report and "Where MITKD loses" in report
    # The multi-task teacher's own dev scores against each in-domain task's majority class,
    # taken from the teacher stage's history at its kept step.
    teacher_run = json.loads((out / "teacher" / "STAGE_COMPLETE.json").read_text())["result"]
    kept = next(h for h in teacher_run["history"] if h["step"] == teacher_run["best_step"])
    dev = saved["teacher_dev"]
    assert set(dev) == {"senti", "topic"}
    for t, r in dev.items():
        assert r["score"] == kept["tasks"][t][r["metric"]]
        assert r["majority"] == saved["majority_rates"][t] and r["margin"] == r["score"] - r["majority"]
        assert f"| {t} | {r['metric']} | {r['score']:.2f} | {r['majority']:.2f} | {r['margin']:+.2f} |" in report
    assert "## Multi-task teacher on its tasks (dev)" in report
    # Domain averages carry the spread over seeds of the per-seed averages.
    r = saved["results"]["mitkd"]["full"]
    per_seed = [sum(t["scores"][i] for t in r["tasks"].values() if t["domain"] == "in") / 2 for i in range(2)]
    assert r["in_domain_avg"] == sum(per_seed) / 2


def test_pipeline_ablation_shares_the_baseline(tiny_bert4_dir, fixture_tasks, fixture_corpus, tmp_path):
    """Three variants: one shares the plain multi-task teacher, one trains its own (L2-SP), one
    mixes the targets; one baseline student for all; ablation.md and its recommendation."""
    from toolkit.recipes.pipeline import run_pipeline

    out = tmp_path / "abl"
    res = run_pipeline(_cfg(tiny_bert4_dir, fixture_tasks, fixture_corpus, out, ablate=["plain", "l2sp", "mix"],
                            low_resource=0, seeds=[1], evaluate_teacher=False,
                            variants={"l2sp": {"teacher_job": {"anchor": {"l2sp": 0.5}}}}))
    stages = {p.name for p in out.iterdir() if (p / "STAGE_COMPLETE.json").is_file()}
    assert {"teacher", "teacher_l2sp", "mitkd_plain", "mitkd_l2sp", "mitkd_mix", "baseline"} <= stages
    assert not {"teacher_plain", "teacher_mix", "baseline_plain"} & stages
    abl = json.loads((out / "ablation.json").read_text())
    assert set(abl["variants"]) == {"plain", "l2sp", "mix"}
    for row in abl["variants"].values():
        c = row["settings"]["full"]["in_domain"]
        assert c["delta"] == c["mitkd"] - c["baseline"]
    md = (out / "ablation.md").read_text()
    assert "| plain |" in md and "| l2sp |" in md and (out / "ablation.png").stat().st_size > 0
    # The L2-SP teacher logged its anchor term.
    rows = [json.loads(l) for l in (out / "teacher_l2sp" / "job" / "metrics.jsonl").read_text().splitlines()]
    assert any("anchor/l2sp" in r for r in rows), rows[-1]
    assert res["ablation"]["recommended"] in (None, "plain", "l2sp", "mix")


def test_teacher_dev_margins_and_flag():
    """The teacher's dev scores at its kept step against the majority class; a margin under
    CLEAR_MARGIN is named in the report; a task without a floor (regression) has no margin."""
    from toolkit.recipes.pipeline import teacher_dev
    from toolkit.recipes.report import CLEAR_MARGIN, teacher_dev_lines

    run = {"best_step": 10, "history": [
        {"step": 10, "tasks": {"ner": {"f1": 2.0}, "senti": {"accuracy": 80.0}, "reg": {"pearson": 70.0}}},
        {"step": 20, "tasks": {"ner": {"f1": 50.0}, "senti": {"accuracy": 10.0}, "reg": {"pearson": 1.0}}}]}
    dev = teacher_dev(run, {"ner": 0.0, "senti": 50.0, "reg": None},
                      {"ner": "f1", "senti": "accuracy", "reg": "pearson", "missing": "accuracy"})
    assert dev == {"ner": {"metric": "f1", "score": 2.0, "majority": 0.0, "margin": 2.0},
                   "senti": {"metric": "accuracy", "score": 80.0, "majority": 50.0, "margin": 30.0},
                   "reg": {"metric": "pearson", "score": 70.0, "majority": None, "margin": None}}
    text = "\n".join(teacher_dev_lines(dev))
    assert 2.0 < CLEAR_MARGIN < 30.0
    assert "| ner | f1 | 2.00 | 0.00 | +2.00 |" in text and "| reg | pearson | 70.00 | – | – |" in text
    assert f"(margin under {CLEAR_MARGIN:.0f} points): ner." in text and "Smallest margin: +2.00 points (ner)." in text
    assert teacher_dev(None, {}, {"ner": "f1"}) == {} and teacher_dev_lines({}) == []
