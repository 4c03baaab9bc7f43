"""The CLI: every job is listed, every option documented, bad input gives one clear line."""
from __future__ import annotations

import subprocess
import sys

from click.testing import CliRunner

from toolkit.cli import main

JOBS = ["teacher", "distill", "finetune", "eval", "pipeline", "score", "convert", "launch", "slurm", "tasks",
        "prepare-data", "plan"]


def test_help_lists_every_job():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for job in JOBS:
        assert job in r.output


def test_each_job_help_documents_every_option():
    import dataclasses

    from toolkit.jobs import JOBS as TABLE

    for job in JOBS:
        r = CliRunner().invoke(main, [job, "--help"])
        assert r.exit_code == 0, (job, r.output)
        assert "Usage:" in r.output
        if job in TABLE:
            cfg_cls, _ = TABLE[job].load()
            for f in dataclasses.fields(cfg_cls):
                assert f.name in r.output, (job, f.name)


def test_help_does_not_import_torch():
    code = "import sys; from toolkit.cli import main; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_bad_override_and_missing_config(tmp_path):
    r = CliRunner().invoke(main, ["distill", "--config", str(tmp_path / "nope.yaml")])
    assert r.exit_code == 2 and "file not found" in r.output
    r = CliRunner().invoke(main, ["distill", "teacher=x", "max_stepz=3"])
    assert r.exit_code == 2 and "max_stepz" in r.output and "unknown field" in r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: x\nmax_steps: [1,\n")
    r = CliRunner().invoke(main, ["distill", "--config", str(bad)])
    assert r.exit_code == 2 and "bad.yaml" in r.output and "invalid YAML" in r.output


def test_tasks_lists_registry():
    r = CliRunner().invoke(main, ["tasks"])
    assert r.exit_code == 0
    for name in ("sst2", "mnli", "squad_v2", "cmrc2018", "afqmc", "group glue", "group clue"):
        assert name in r.output


def test_shipped_configs_load():
    """Every YAML in configs/ is a valid job config (typed fields, no unknown keys)."""
    from pathlib import Path

    from toolkit.config import load_config
    from toolkit.jobs import JOBS as TABLE

    root = Path(__file__).resolve().parents[1] / "configs"
    kinds = {"teacher": "teacher", "distill": "distill", "eval": "eval", "pipeline": "pipeline",
             "finetune": "finetune"}
    seen = 0
    for f in sorted(root.glob("*.yaml")):
        job = kinds[f.name.split("_")[0]]
        cfg_cls, _ = TABLE[job].load()
        load_config(cfg_cls, f)
        seen += 1
    assert seen >= 5


def test_shipped_ds_configs_validate():
    import json
    from pathlib import Path

    from toolkit.engine.ds_config import load_ds_config

    root = Path(__file__).resolve().parents[1] / "ds_configs"
    files = sorted(root.glob("*.json"))
    assert {"cpu_fp32.json", "zero2_bf16.json", "zero3_offload_bf16.json"} <= {f.name for f in files}
    for f in files:
        for world in (1, 2, 8):
            cfg = load_ds_config(f, world)
            assert cfg["train_batch_size"] == (cfg["train_micro_batch_size_per_gpu"]
                                               * cfg["gradient_accumulation_steps"] * world)
        json.loads(f.read_text())


def test_requeue_exit_code_matches_engine():
    from toolkit.engine.signals import REQUEUE_EXIT_CODE
    from toolkit.launch.commands import REQUEUE_EXIT_CODE as SCRIPT_CODE

    assert SCRIPT_CODE == REQUEUE_EXIT_CODE


def test_option_values_are_taken_as_typed_not_yaml(monkeypatch, tmp_path):
    """`--teacher 0755` is the path "0755" (YAML would read the octal 493); key=value keeps the
    text for string fields too, and still converts numbers for numeric fields."""
    import toolkit.jobs as jobs

    seen = {}
    monkeypatch.setattr(jobs, "run_job", lambda job, cfg, **kw: seen.setdefault(job, cfg))
    r = CliRunner().invoke(main, ["distill", "--teacher", "0755", "--corpus", "0x10,on", "--max-steps", "12",
                                  "--output-dir", "1e3", "--ds-config", "null"])
    assert r.exit_code == 0, r.output
    cfg = seen["distill"]
    assert cfg.teacher == "0755" and cfg.corpus.sources == ["0x10", "on"] and cfg.max_steps == 12
    assert cfg.output_dir == "1e3" and cfg.ds_config == "null"
    r = CliRunner().invoke(main, ["finetune", "--model", "yes", "task=0755", "optim.lr=6e-4", "max_steps=010",
                                  "data_dir=~", "epochs=2"])
    assert r.exit_code == 0, r.output
    cfg = seen["finetune"]
    assert (cfg.model, cfg.task, cfg.optim.lr, cfg.max_steps, cfg.data_dir, cfg.epochs) == ("yes", "0755", 6e-4, 10, "~", 2.0)


def test_typed_option_wins_over_yaml_and_override_wins_over_option(monkeypatch, tmp_path):
    import toolkit.jobs as jobs

    seen = {}
    monkeypatch.setattr(jobs, "run_job", lambda job, cfg, **kw: seen.setdefault(job, cfg))
    y = tmp_path / "job.yaml"
    y.write_text("teacher: from_yaml\nmax_steps: 5\n")
    r = CliRunner().invoke(main, ["distill", "--config", str(y), "--teacher", "0755", "max_steps=7"])
    assert r.exit_code == 0, r.output
    assert seen["distill"].teacher == "0755" and seen["distill"].max_steps == 7


def test_shipped_configs_found_by_name_from_any_folder(monkeypatch, tmp_path):
    import toolkit.jobs as jobs

    seen = {}
    monkeypatch.setattr(jobs, "run_job", lambda job, cfg, **kw: seen.setdefault(job, cfg))
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(main, ["distill", "--config", "distill_bert_large.yaml"])
    assert r.exit_code == 0, r.output
    assert seen["distill"].student.hidden_size == 384 and seen["distill"].max_steps == 400000
    r = CliRunner().invoke(main, ["distill", "--config", "no_such_job.yaml"])
    assert r.exit_code == 2 and "distill_bert_large.yaml" in r.output and r.output.count("\n") == 1


def test_version_floors_and_their_message():
    from toolkit.requirements import MINIMUMS, too_old, version_tuple

    assert version_tuple("2.13.0+cpu") == (2, 13, 0) and version_tuple("2.4.0rc1") == (2, 4, 0)
    assert version_tuple("5.0.0.dev0") == (5, 0, 0) and version_tuple("0.16") == (0, 16)
    assert too_old({name: version for name, version in MINIMUMS.items()}) == []
    assert too_old({"torch": None}) == []   # not installed: the import error says so itself
    (msg,) = too_old({"transformers": "4.57.6", "torch": "2.13.0+cpu"})
    assert "transformers 4.57.6" in msg and f"transformers>={MINIMUMS['transformers']}" in msg and "pip install" in msg


def test_an_older_library_fails_at_import_naming_it(tmp_path):
    """A transformers older than the floor (its metadata found first on the path) stops
    `import toolkit` with the package, the version and what to install."""
    from pathlib import Path

    dist = tmp_path / "transformers-4.40.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 4.40.0\n")
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", "import toolkit.cli"], capture_output=True, text=True,
                       env={"PYTHONPATH": f"{tmp_path}:{root}", "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0
    assert "ImportError: transformers 4.40.0 is installed but mitkd-toolkit needs transformers>=5.0" in r.stderr


def test_a_partial_section_keeps_the_jobs_own_defaults(tmp_path):
    """`optim: {impl: ...}` in a teacher YAML changes impl only: the teacher's lr and warmup
    (its field default) stay, not OptimConfig's class defaults."""
    import pytest

    from toolkit.config import load_config
    from toolkit.errors import ConfigError
    from toolkit.recipes.teacher import TeacherConfig

    job = tmp_path / "t.yaml"
    job.write_text("model: m\ntasks: [sst2]\noptim: {impl: torch_foreach}\n")
    optim = load_config(TeacherConfig, job).optim
    default = load_config(TeacherConfig, None, ["model=m", "tasks=sst2"]).optim
    assert optim.impl == "torch_foreach"
    assert (optim.lr, optim.warmup_ratio) == (default.lr, default.warmup_ratio) == (3e-5, 0.1)
    assert load_config(TeacherConfig, job, ["optim.warmup_ratio=0"]).optim.warmup_ratio == 0.0
    job.write_text("model: m\ntasks: [sst2]\noptim: {lrr: 1}\n")
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_config(TeacherConfig, job)
