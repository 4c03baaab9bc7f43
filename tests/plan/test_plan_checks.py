"""Bad DeepSpeed JSONs and job configs fail in seconds, before any model loads: exit 2, one line
naming the key and the file. The same checks run in `toolkit plan` and at the start of a job."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from toolkit.cli import main

ROOT = Path(__file__).resolve().parents[2]
GOOD_DS = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 1000000}}


@pytest.fixture(autouse=True, scope="module")
def _deepspeed_imported():
    # DeepSpeed logs its accelerator choice on first import; let that happen outside the CLI's output.
    from toolkit.engine.ds_config import accepted_top_keys

    accepted_top_keys()


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load or build by a recipe fails the test."""
    import toolkit.recipes.distill as distill
    import toolkit.recipes.finetune as finetune
    import toolkit.recipes.teacher as teacher

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the config was checked")

    monkeypatch.setattr(distill, "build_encoder", boom)
    monkeypatch.setattr(teacher, "load_task_model", boom)
    monkeypatch.setattr(finetune, "load_task_model", boom)


@pytest.fixture
def other_vocab_dir(tmp_path) -> Path:
    """A student directory with only a config.json, whose vocabulary differs from the teacher's."""
    d = tmp_path / "other_vocab"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 999, "hidden_size": 32,
                                               "num_hidden_layers": 2, "num_attention_heads": 4,
                                               "intermediate_size": 64}))
    return d


def _job(tmp_path: Path, teacher: Path, corpus: Path, **changes) -> Path:
    job = {"teacher": str(teacher), "output_dir": str(tmp_path / "out"), "max_steps": 2,
           "corpus": {"sources": [str(corpus / "*.txt")], "seq_length": 32, "num_workers": 0},
           "student": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64},
           "loss": {"options": {"minilmv2": {"num_relation_heads": 8}}}}
    for key, value in changes.items():
        node = job
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    y = tmp_path / "job.yaml"
    y.write_text(json.dumps(job))   # JSON is YAML
    return y


def _ds(tmp_path: Path, mutate=None) -> Path:
    cfg = json.loads(json.dumps(GOOD_DS))
    if mutate:
        mutate(cfg)
    p = tmp_path / "ds.json"
    p.write_text(json.dumps(cfg, indent=2))
    return p


DS_CASES = {
    "top-level typo": (lambda c: c.update(gradient_acumulation_steps=2), "gradient_acumulation_steps",
                       "gradient_accumulation_steps"),
    "nested typo": (lambda c: c["zero_optimization"].update(overlap_com=True), "zero_optimization.overlap_com",
                    "overlap_comm"),
    "wrong type": (lambda c: c["zero_optimization"].update(reduce_bucket_size="big"),
                   "zero_optimization.reduce_bucket_size", "'big'"),
    "batch does not divide": (lambda c: c.update(train_batch_size=10), "train_batch_size", "world size 4"),
}


def _one_error_line(output: str) -> str:
    lines = [l for l in output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
    return lines[0]


@pytest.mark.parametrize("case", sorted(DS_CASES))
def test_bad_deepspeed_json_exits_2_naming_key_and_file(case, tiny_bert_dir, fixture_corpus, tmp_path,
                                                        monkeypatch, no_model_loads):
    mutate, key, detail = DS_CASES[case]
    job, ds = _job(tmp_path, tiny_bert_dir, fixture_corpus), _ds(tmp_path, mutate)
    for argv in (["plan", "distill", "--config", str(job), "--ds-config", str(ds), "--gpus-per-node", "4"],
                 ["distill", "--config", str(job), "--ds-config", str(ds)]):
        if argv[0] == "distill":
            monkeypatch.setenv("WORLD_SIZE", "4")   # as the launcher sets it for 4 ranks
        r = CliRunner().invoke(main, argv)
        assert r.exit_code == 2, (argv[0], r.output)
        line = _one_error_line(r.output)
        assert f"'{key}'" in line and str(ds) in line and detail in line, (argv[0], line)


JOB_CASES = {
    "relation heads do not divide": ({"loss.options.minilmv2.num_relation_heads": 5}, "loss.options.minilmv2.num_relation_heads", "divide"),
    "teacher layer out of range": ({"loss.teacher_layer": 9}, "loss.teacher_layer", "out of range"),
    "student layer out of range": ({"loss.student_layer": 3}, "loss.student_layer", "out of range"),
    "wrong type": ({"max_steps": "ten"}, "max_steps", "expected int"),
    "seq longer than the positions": ({"corpus.seq_length": 4096}, "corpus.seq_length", "position embeddings"),
}


@pytest.mark.parametrize("case", sorted(JOB_CASES))
def test_bad_job_config_exits_2_naming_field_and_file(case, tiny_bert_dir, fixture_corpus, tmp_path,
                                                      no_model_loads):
    changes, field, detail = JOB_CASES[case]
    job, ds = _job(tmp_path, tiny_bert_dir, fixture_corpus, **changes), _ds(tmp_path)
    for cmd in ("plan", "distill"):
        r = CliRunner().invoke(main, [cmd] + (["distill"] if cmd == "plan" else [])
                               + ["--config", str(job), "--ds-config", str(ds)])
        assert r.exit_code == 2, (cmd, r.output)
        line = _one_error_line(r.output)
        assert f"'{field}'" in line and str(job) in line and detail in line, (cmd, line)


def test_vocabulary_mismatch_names_the_field(tiny_bert_dir, fixture_corpus, tmp_path, other_vocab_dir,
                                             no_model_loads):
    job = _job(tmp_path, tiny_bert_dir, fixture_corpus, **{"student.init": "path",
                                                           "student.path": str(other_vocab_dir)})
    r = CliRunner().invoke(main, ["distill", "--config", str(job), "--ds-config", str(_ds(tmp_path))])
    line = _one_error_line(r.output)
    assert r.exit_code == 2 and "'student.path'" in line and str(job) in line and "999" in line


def test_tokenizer_longer_than_the_embedding(tmp_path, tiny_bert_dir, fixture_corpus, no_model_loads):
    """A teacher whose config.json has fewer embedding rows than its tokenizer has ids."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_bert_dir, teacher)
    cfg = json.loads((teacher / "config.json").read_text())
    cfg["vocab_size"] = 50
    (teacher / "config.json").write_text(json.dumps(cfg))
    job = _job(tmp_path, teacher, fixture_corpus)
    r = CliRunner().invoke(main, ["plan", "distill", "--config", str(job), "--ds-config", str(_ds(tmp_path))])
    line = _one_error_line(r.output)
    assert r.exit_code == 2 and "'teacher'" in line and "50 rows" in line


def test_teacher_and_finetune_jobs_check_before_loading(tiny_bert_dir, fixture_tasks, tmp_path, no_model_loads):
    ds = _ds(tmp_path, lambda c: c["zero_optimization"].update(overlap_com=True))
    r = CliRunner().invoke(main, ["teacher", "--model", str(tiny_bert_dir), "--tasks", str(fixture_tasks["senti"]),
                                  "--ds-config", str(ds), "--output-dir", str(tmp_path / "t")])
    assert r.exit_code == 2 and "'zero_optimization.overlap_com'" in _one_error_line(r.output)
    r = CliRunner().invoke(main, ["finetune", "--model", str(tiny_bert_dir), "--task", str(fixture_tasks["senti"]),
                                  "--ds-config", str(_ds(tmp_path)), "max_seq_length=1024",
                                  "--output-dir", str(tmp_path / "f")])
    assert r.exit_code == 2 and "'max_seq_length'" in _one_error_line(r.output)


def test_plan_of_a_good_job_and_the_real_cli(tiny_bert_dir, fixture_corpus, tmp_path):
    """The whole CLI in a fresh process: a good plan prints its parts, a bad job exits 2 with one
    line on stderr, no traceback."""
    from toolkit.launch.commands import child_env

    job, ds = _job(tmp_path, tiny_bert_dir, fixture_corpus), _ds(tmp_path)
    r = subprocess.run([sys.executable, "-m", "toolkit", "plan", "distill", "--config", str(job), "--ds-config",
                        str(ds), "--gpus-per-node", "2", "--gpu-memory", "16GB"], capture_output=True, text=True,
                       env=child_env(), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for part in ("checks: passed", "teacher (frozen)", "global batch 8", "tokens per step: 256", "peak",
                 "fits in 16.00 GiB", "ms per step", "steps: 2 -> 512 tokens"):
        assert part in r.stdout, (part, r.stdout)
    bad = _job(tmp_path, tiny_bert_dir, fixture_corpus, **{"loss.teacher_layer": 7})
    r = subprocess.run([sys.executable, "-m", "toolkit", "distill", "--config", str(bad), "--ds-config", str(ds)],
                       capture_output=True, text=True, env=child_env(), cwd=tmp_path)
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "'loss.teacher_layer'" in errors[0] and str(bad) in errors[0]
