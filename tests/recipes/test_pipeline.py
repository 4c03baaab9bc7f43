"""The whole MITKD pipeline on fixture data with tiny models: artefacts exist and agree."""
from __future__ import annotations

import json
import re


def _cfg(tiny_bert4_dir, fixture_tasks, fixture_corpus, out, **kw):
    from toolkit.config import load_config
    from toolkit.recipes.pipeline import PipelineConfig

    base = {
        "preset": "tiny", "output_dir": str(out), "teacher": str(tiny_bert4_dir), "cpu_accel": "off",
        "in_domain": [str(fixture_tasks["senti"]), str(fixture_tasks["topic"])],
        "out_of_domain": [str(fixture_tasks["pair"])], "corpus": [str(fixture_corpus / "*.txt")],
        "seeds": [1, 2], "low_resource": 12,
        "teacher_job": {"max_steps": 6, "lr": 3e-4},
        "distill_job": {"max_steps": 4, "corpus": {"seq_length": 32, "shuffle_buffer": 8},
                        "student": {"init": "spec", "num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64},
                        "loss": {"num_relation_heads": 8}},
        "eval_job": {"max_steps": 3, "max_seq_length": 32, "lrs": [5e-4]},
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
        student = AutoModel.from_pretrained(out / name / "job" / "student")
        assert student.config.num_hidden_layers == 2
        assert saved["models"][name]["params"] > 0
        assert saved["models"][name]["inference"]["samples_per_s"] > 0
    # A re-run skips every finished stage and gives the same results.
    again = run_pipeline(_cfg(tiny_bert4_dir, fixture_tasks, fixture_corpus, out))
    assert again["results"] == res["results"]
    assert all((out / s / "STAGE_COMPLETE.json").is_file() for s in ("data", "teacher", "mitkd", "baseline"))
