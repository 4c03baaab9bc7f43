"""Pipeline stage markers: a finished stage is reused only with the same config and inputs; a
changed one runs again and the log says which stage and why."""
from __future__ import annotations

import json
import logging

import pytest

from toolkit.recipes.pipeline import PipelineConfig, PipelineRecipe
from toolkit.utils.fsio import publish_dir


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    r = PipelineRecipe(PipelineConfig(output_dir=str(tmp_path / "pipe"), preset="tiny"))
    runs = []

    def fake_run_job(job, stage, cfg_dict):
        runs.append((stage, json.dumps(cfg_dict, sort_keys=True)))
        if job == "distill":
            with publish_dir(r.out / stage / "job" / "student") as tmp:
                (tmp / "config.json").write_text("{}")
        return {"ran": len(runs)}

    monkeypatch.setattr(r, "_run_job", fake_run_job)
    r.runs = runs
    return r


def _distill(teacher, corpus, steps=4):
    return {"teacher": str(teacher), "max_steps": steps, "corpus": {"sources": [str(corpus / "*.txt")]}}


def test_same_config_and_inputs_skip(recipe, tiny_bert_dir, fixture_corpus, caplog):
    job = _distill(tiny_bert_dir, fixture_corpus)
    first = recipe._job_stage("distill", "baseline", job, outputs=["job/student"])
    with caplog.at_level(logging.INFO):
        again = recipe._job_stage("distill", "baseline", job, outputs=["job/student"])
    assert again == first and len(recipe.runs) == 1
    assert "already complete with the same config and inputs" in caplog.text


def test_a_changed_config_reruns_and_says_why(recipe, tiny_bert_dir, fixture_corpus, caplog):
    recipe._job_stage("distill", "baseline", _distill(tiny_bert_dir, fixture_corpus), outputs=["job/student"])
    with caplog.at_level(logging.WARNING):
        recipe._job_stage("distill", "baseline", _distill(tiny_bert_dir, fixture_corpus, steps=8),
                          outputs=["job/student"])
    assert len(recipe.runs) == 2
    assert "stage baseline runs again: its config changed: max_steps (4 -> 8)" in caplog.text
    assert (recipe.out / "baseline.previous" / "STAGE_COMPLETE.json").is_file()


def test_a_changed_input_file_reruns(recipe, tiny_bert_dir, fixture_corpus, tmp_path, caplog):
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(fixture_corpus, corpus)
    recipe._job_stage("distill", "baseline", _distill(tiny_bert_dir, corpus), outputs=["job/student"])
    shard = sorted(corpus.glob("*.txt"))[1]
    shard.write_text(shard.read_text() + "\n\none more document.\n")
    with caplog.at_level(logging.WARNING):
        recipe._job_stage("distill", "baseline", _distill(tiny_bert_dir, corpus), outputs=["job/student"])
    assert len(recipe.runs) == 2
    assert f"its input 'corpus' changed ({shard}" in caplog.text


def test_a_republished_upstream_model_reruns_the_downstream_stage(recipe, tiny_bert_dir, fixture_corpus, caplog):
    teacher = recipe.out / "teacher" / "job" / "model"
    with publish_dir(teacher) as tmp:
        (tmp / "config.json").write_text("{}")
    recipe._job_stage("distill", "mitkd_plain", _distill(teacher, fixture_corpus), outputs=["job/student"])
    with publish_dir(teacher) as tmp:    # the teacher stage ran again
        (tmp / "config.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        recipe._job_stage("distill", "mitkd_plain", _distill(teacher, fixture_corpus), outputs=["job/student"])
    assert len(recipe.runs) == 2 and "its input 'teacher' changed" in caplog.text


def test_a_missing_output_or_old_marker_reruns(recipe, tiny_bert_dir, fixture_corpus, caplog):
    import shutil

    job = _distill(tiny_bert_dir, fixture_corpus)
    recipe._job_stage("distill", "baseline", job, outputs=["job/student"])
    shutil.rmtree(recipe.out / "baseline" / "job" / "student")
    with caplog.at_level(logging.WARNING):
        recipe._job_stage("distill", "baseline", job, outputs=["job/student"])
    assert "is missing or incomplete" in caplog.text and len(recipe.runs) == 2
    marker = recipe.out / "baseline" / "STAGE_COMPLETE.json"
    marker.write_text(json.dumps({"stage": "baseline", "seconds": 1, "result": {}}))   # an older toolkit's
    recipe._job_stage("distill", "baseline", job, outputs=["job/student"])
    assert "predates config and input tracking" in caplog.text and len(recipe.runs) == 3


def test_an_unfinished_stage_resumes_in_place_unless_changed(recipe, tiny_bert_dir, fixture_corpus, monkeypatch,
                                                             caplog):
    job = _distill(tiny_bert_dir, fixture_corpus)

    def crash(*a):
        (recipe.out / "baseline" / "job" / "checkpoints").mkdir(parents=True)
        raise KeyboardInterrupt

    real = recipe._run_job
    monkeypatch.setattr(recipe, "_run_job", crash)
    with pytest.raises(KeyboardInterrupt):
        recipe._job_stage("distill", "baseline", job)
    monkeypatch.setattr(recipe, "_run_job", real)
    with caplog.at_level(logging.INFO):
        recipe._job_stage("distill", "baseline", job)
    assert "stage baseline resumes" in caplog.text
    assert (recipe.out / "baseline" / "job" / "checkpoints").is_dir()   # kept for the resume
