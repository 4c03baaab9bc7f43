"""Malformed inputs, one per case, through the real command line: every job refuses with exit
status 2 and one short ``error:`` line naming the file, field or line, prints no traceback, and
leaves no half-made output folder.

Most cases go through Click's CliRunner on ``toolkit.cli.main`` (the same ``_fail`` -> exit 2
path as a shell; an uncaught exception would show as exit 1 there). ``test_real_process`` runs
a few of them as ``python -m toolkit ...`` in a subprocess. The cases fail before any model
loads, except the resume-state ones (they need a checkpoint) and the strict corpus line (read
while streaming).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
from click.testing import CliRunner

from conftest import subprocess_env
from toolkit.cli import main

ROOT = Path(__file__).resolve().parents[1]
ASSETS = Path(__file__).resolve().parent / "assets"
MAX_MESSAGE = 600


@dataclass
class Ctx:
    model: Path
    tasks: Dict[str, Path]
    corpus: Path
    tmp: Path          # this case's folder
    out: Path          # the output folder the job is given (must not be left behind)
    cleanups: Optional[List[Callable[[], None]]] = None   # run after the case (restore shared files)

    def write(self, name: str, text: str) -> Path:
        p = self.tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
        return p

    def task_yaml(self, name: str = "t", yaml_extra: str = "", train: str = "text\tlabel\na good movie\tpos\n"
                  "a bad movie\tneg\n", fmt: str = "tsv") -> Path:
        self.write(f"{name}/train.{fmt}", train)
        self.write(f"{name}/dev.{fmt}", "text\tlabel\ngood\tpos\nbad\tneg\n" if fmt == "tsv" else train)
        body = (f"name: {name}\ntype: classification\nformat: {fmt}\nheader: true\ntrain: train.{fmt}\n"
                f"dev: dev.{fmt}\ntext_a: text\nlabel: label\nlabels: [neg, pos]\n") + yaml_extra
        return self.write(f"{name}/{name}.yaml", body)

    def ds(self, obj) -> Path:
        return self.write("ds.json", obj if isinstance(obj, str) else json.dumps(obj))

    def finetune(self, *extra: str, task: Optional[Path] = None) -> List[str]:
        return ["finetune", "--model", str(self.model), "--task", str(task or self.tasks["senti"]),
                "--output-dir", str(self.out), "max_steps=1", *extra]

    def distill(self, *extra: str, corpus: Optional[str] = None) -> List[str]:
        return ["distill", "--teacher", str(self.model), "--corpus", corpus or str(self.corpus / "*.txt"),
                "--output-dir", str(self.out), "--max-steps", "2", "corpus.num_workers=0", "corpus.seq_length=32",
                "corpus.shuffle_buffer=4", "student.num_layers=1", "student.hidden_size=32", "student.num_heads=4",
                "student.intermediate_size=64", "loss.options.minilmv2.num_relation_heads=4", *extra]


# A case: (category, builder(ctx) -> (argv, substrings the error line must contain)).
Case = Tuple[str, Callable[[Ctx], Tuple[List[str], Sequence[str]]]]
CASES: Dict[str, Case] = {}


def case(name: str, category: str):
    def deco(fn):
        assert name not in CASES
        CASES[name] = (category, fn)
        return fn
    return deco


# ---- corpus -----------------------------------------------------------------------------
@case("corpus_matches_nothing", "corpus")
def _(c):
    return c.distill(corpus=str(c.tmp / "nope" / "*.txt")), ["nope/*.txt", "matched no files"]


@case("corpus_unknown_extension", "corpus")
def _(c):
    c.write("c/a.csv", "some text\n")
    return c.distill(corpus=str(c.tmp / "c" / "a.csv")), ["a.csv", "corpus format", "corpus.format"]


@case("corpus_all_empty", "corpus")
def _(c):
    c.write("c/a.txt", "")
    return c.distill(corpus=str(c.tmp / "c" / "a.txt")), ["a.txt", "empty"]


@case("corpus_strict_empty_file", "corpus")
def _(c):
    c.write("c/a.txt", "")
    c.write("c/b.txt", "some words here.\n")
    return c.distill("corpus.strict=true", corpus=str(c.tmp / "c" / "*.txt")), ["a.txt", "empty", "strict"]


@case("corpus_bad_format_field", "corpus")
def _(c):
    return c.distill("corpus.format=xml"), ["corpus.format", "xml"]


@case("corpus_seq_length_too_small", "corpus")
def _(c):
    return c.distill("corpus.seq_length=3"), ["corpus.seq_length", "at least 5"]


@case("corpus_strict_bad_json_line", "corpus")
def _(c):
    good = "\n".join(json.dumps({"text": "the movie was good and the plot was fun."}) for _ in range(40))
    c.write("c/a.jsonl", good.replace("\n", "\n{\"text\": broken\n", 1) + "\n")
    return c.distill("corpus.strict=true", corpus=str(c.tmp / "c" / "a.jsonl")), ["a.jsonl:2"]


# ---- task YAML --------------------------------------------------------------------------
@case("task_yaml_syntax", "task YAML")
def _(c):
    return c.finetune(task=c.write("t.yaml", "name: t\ntype: [classification\n")), ["t.yaml:3", "invalid YAML"]


@case("task_yaml_unknown_key", "task YAML")
def _(c):
    return c.finetune(task=c.task_yaml(yaml_extra="colour: red\n")), ["t.yaml", "colour"]


@case("task_yaml_duplicate_labels", "task YAML")
def _(c):
    y = c.task_yaml()
    y.write_text(y.read_text().replace("labels: [neg, pos]", "labels: [pos, pos]"))
    return c.finetune(task=y), ["t.yaml", "labels", "duplicates"]


@case("task_yaml_missing_train_file", "task YAML")
def _(c):
    y = c.task_yaml()
    (y.parent / "train.tsv").unlink()
    return c.finetune(task=y), ["train.tsv"]


@case("task_yaml_unknown_type", "task YAML")
def _(c):
    y = c.task_yaml()
    y.write_text(y.read_text().replace("type: classification", "type: ranking"))
    return c.finetune(task=y), ["t.yaml", "ranking"]


@case("task_yaml_not_a_mapping", "task YAML")
def _(c):
    return c.finetune(task=c.write("t.yaml", "- a\n- b\n")), ["t.yaml"]


@case("task_unknown_name", "task YAML")
def _(c):
    return c.finetune(task=Path("no_such_task")), ["no_such_task"]


# ---- data files -------------------------------------------------------------------------
@case("data_tsv_missing_column", "data files")
def _(c):
    return c.finetune(task=c.task_yaml(train="text\tlabel\na good movie\tpos\njust text\n")), ["train.tsv:3"]


@case("data_label_not_in_labels", "data files")
def _(c):
    return c.finetune(task=c.task_yaml(train="text\tlabel\na good movie\tpos\nmeh\tmaybe\n")), ["train.tsv:3", "maybe"]


@case("data_empty_train", "data files")
def _(c):
    return c.finetune(task=c.task_yaml(train="text\tlabel\n")), ["train.tsv", "empty"]


@case("data_jsonl_broken_line", "data files")
def _(c):
    y = c.task_yaml(fmt="jsonl", train='{"text": "good", "label": "pos"}\n{"text": "bad", "label": \n')
    return c.finetune(task=y), ["train.jsonl:2"]


@case("data_regression_label_not_a_number", "data files")
def _(c):
    c.write("r/train.csv", "a cat,a dog,4.5\na car,a bus,high\n")
    c.write("r/dev.csv", "a cat,a dog,4.5\n")
    y = c.write("r/r.yaml", "name: r\ntype: regression\nformat: csv\nheader: false\ntrain: train.csv\n"
                "dev: dev.csv\ntext_a: 0\ntext_b: 1\nlabel: 2\n")
    return c.finetune(task=y), ["train.csv:2", "high"]


@case("data_column_not_in_header", "data files")
def _(c):
    y = c.task_yaml()
    y.write_text(y.read_text().replace("text_a: text", "text_a: sentence"))
    return c.finetune(task=y), ["sentence"]


@case("data_invalid_utf8", "data files")
def _(c):
    y = c.task_yaml()
    (y.parent / "train.tsv").write_bytes(b"text\tlabel\na good movie\tpos\nbad \xff\xfe\tneg\n")
    return c.finetune(task=y), ["train.tsv"]


# ---- predictions (toolkit score) --------------------------------------------------------
def _score(c, preds: Path, task: str = "sst2", data: Path = ASSETS / "glue", *extra: str) -> List[str]:
    return ["score", "--task", task, "--data-dir", str(data), "--predictions", str(preds), *extra]


def _sst2_dev_size() -> int:
    return len((ASSETS / "glue" / "SST-2" / "dev.tsv").read_text(encoding="utf-8").strip().splitlines()) - 1


@case("pred_file_missing", "predictions")
def _(c):
    return _score(c, c.tmp / "none.tsv"), ["none.tsv"]


@case("pred_too_few_rows", "predictions")
def _(c):
    return _score(c, c.write("p.tsv", "index\tprediction\n0\t1\n")), ["p.tsv"]


@case("pred_unknown_label", "predictions")
def _(c):
    rows = "".join(f"{i}\t{'7' if i == 1 else '1'}\n" for i in range(_sst2_dev_size()))
    return _score(c, c.write("p.tsv", "index\tprediction\n" + rows)), ["p.tsv", "7"]


@case("pred_not_finite", "predictions")
def _(c):
    n = len((ASSETS / "glue" / "STS-B" / "dev.tsv").read_text(encoding="utf-8").strip().splitlines()) - 1
    rows = "".join(f"{i}\t{'nan' if i == 0 else '2.5'}\n" for i in range(n))
    return _score(c, c.write("p.tsv", "index\tprediction\n" + rows), "stsb"), ["p.tsv", "nan"]


@case("pred_squad_not_json", "predictions")
def _(c):
    return _score(c, c.write("p.json", "{not json"), "squad_v1", ASSETS / "squad" / "SQuAD"), ["p.json"]


@case("pred_duplicate_index", "predictions")
def _(c):
    rows = "".join(f"{i}\t1\n" for i in range(_sst2_dev_size()))
    return _score(c, c.write("p.tsv", "index\tprediction\n0\t1\n" + rows)), ["p.tsv", "duplicate"]


@case("pred_na_prob_not_json", "predictions")
def _(c):
    dev = json.loads((ASSETS / "squad" / "SQuAD" / "dev-v2.0.json").read_text(encoding="utf-8"))
    ids = [q["id"] for a in dev["data"] for p in a["paragraphs"] for q in p["qas"]]
    preds = c.write("p.json", json.dumps({i: "" for i in ids}))
    return (_score(c, preds, "squad_v2", ASSETS / "squad" / "SQuAD", "--na-prob-file", str(c.write("na.json", "[1,"))),
            ["na.json"])


# ---- job YAML ---------------------------------------------------------------------------
@case("job_yaml_syntax", "job YAML")
def _(c):
    return ["distill", "--config", str(c.write("job.yaml", "teacher: x\nmax_steps: [1,\n"))], ["job.yaml:3", "invalid YAML"]


@case("job_yaml_unknown_field", "job YAML")
def _(c):
    y = c.write("job.yaml", f"model: {c.model}\ntask: sst2\nmax_stepz: 3\n")
    return ["finetune", "--config", str(y), "--output-dir", str(c.out)], ["job.yaml", "max_stepz", "unknown field"]


@case("job_yaml_wrong_type", "job YAML")
def _(c):
    y = c.write("job.yaml", f"teacher: {c.model}\nmax_steps: many\n")
    return ["distill", "--config", str(y), "--output-dir", str(c.out)], ["job.yaml", "max_steps", "many"]


@case("job_yaml_not_a_mapping", "job YAML")
def _(c):
    return ["eval", "--config", str(c.write("job.yaml", "- model\n- tasks\n"))], ["job.yaml", "mapping"]


@case("job_yaml_contradiction", "job YAML")
def _(c):
    return c.finetune("epochs=0", "max_steps=0"), ["epochs"]


@case("job_yaml_moved_field", "job YAML")
def _(c):
    y = c.write("job.yaml", f"teacher: {c.model}\nlr: 0.001\n")
    return ["distill", "--config", str(y)], ["job.yaml", "'lr'", "optim.lr"]


@case("job_yaml_unknown_loss", "job YAML")
def _(c):
    return c.distill("loss.weights.minilm_v3=1"), ["loss.weights.minilm_v3", "unknown loss"]


@case("job_yaml_heads_do_not_divide", "job YAML")
def _(c):
    return c.distill("student.num_heads=5"), ["student.num_heads", "divisible"]


@case("job_yaml_missing_file", "job YAML")
def _(c):
    return ["teacher", "--config", str(c.tmp / "nope.yaml")], ["nope.yaml", "not found"]


@case("job_yaml_unknown_variant", "job YAML")
def _(c):
    return ["pipeline", "--output-dir", str(c.out), "variant=bigger"], ["variant", "bigger"]


@case("job_yaml_bad_preset", "job YAML")
def _(c):
    return ["pipeline", "--output-dir", str(c.out), "--preset", "huge"], ["preset", "huge"]


@case("job_yaml_pipeline_bad_task", "job YAML")
def _(c):
    return (["pipeline", "--output-dir", str(c.out), f"teacher={c.model}", f"corpus={c.corpus / '*.txt'}",
             f"in_domain={c.tmp / 'missing.yaml'}"], ["missing.yaml"])


# ---- DeepSpeed JSON ---------------------------------------------------------------------
@case("ds_trailing_comma", "DeepSpeed JSON")
def _(c):
    return c.finetune("--ds-config", str(c.ds('{\n  "train_micro_batch_size_per_gpu": 2,\n}\n'))), ["ds.json:3"]


@case("ds_optimizer_block", "DeepSpeed JSON")
def _(c):
    ds = c.ds({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam"}})
    return c.finetune("--ds-config", str(ds)), ["ds.json", "optimizer", "optim"]


@case("ds_bf16_and_fp16", "DeepSpeed JSON")
def _(c):
    ds = c.ds({"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "fp16": {"enabled": True}})
    return c.distill("--ds-config", str(ds)), ["ds.json", "fp16"]


@case("ds_zero_stage", "DeepSpeed JSON")
def _(c):
    ds = c.ds({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 5}})
    return c.finetune("--ds-config", str(ds)), ["ds.json", "zero_optimization.stage"]


@case("ds_batch_mismatch", "DeepSpeed JSON")
def _(c):
    ds = c.ds({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 5})
    return c.finetune("--ds-config", str(ds)), ["ds.json", "train_batch_size"]


@case("ds_top_level_array", "DeepSpeed JSON")
def _(c):
    return c.finetune("--ds-config", str(c.ds("[1, 2]"))), ["ds.json", "JSON object"]


@case("ds_missing_file", "DeepSpeed JSON")
def _(c):
    return c.finetune("--ds-config", str(c.tmp / "nope.json")), ["ds_config", "nope.json"]


@case("ds_micro_batch_zero", "DeepSpeed JSON")
def _(c):
    return c.finetune("--ds-config", str(c.ds({"train_micro_batch_size_per_gpu": 0}))), ["train_micro_batch_size_per_gpu"]


# ---- teacher and student folders --------------------------------------------------------
@case("model_dir_missing", "model folders")
def _(c):
    return ["distill", "--teacher", str(c.tmp / "nope"), "--corpus", str(c.corpus / "*.txt"), "--output-dir",
            str(c.out)], ["'teacher'", "nope"]


@case("model_dir_without_config", "model folders")
def _(c):
    d = c.tmp / "m"
    d.mkdir()
    return c.finetune("model=" + str(d)), ["'model'", "config.json"]


@case("model_config_not_json", "model folders")
def _(c):
    d = c.tmp / "m"
    shutil.copytree(c.model, d)
    (d / "config.json").write_text("{oops")
    return ["teacher", "--model", str(d), "--tasks", str(c.tasks["senti"]), "--output-dir", str(c.out)], ["config.json"]


@case("model_type_unsupported", "model folders")
def _(c):
    d = c.tmp / "m"
    shutil.copytree(c.model, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    return ["eval", "--model", str(d), "--tasks", str(c.tasks["senti"]), "--output-dir", str(c.out)], ["gpt2"]


@case("model_weights_missing", "model folders")
def _(c):
    d = c.tmp / "m"
    shutil.copytree(c.model, d)
    for w in d.glob("*.safetensors"):
        w.unlink()
    return c.finetune("model=" + str(d)), [str(d)]


@case("model_heads_without_weights", "model folders")
def _(c):
    d = c.tmp / "m"
    shutil.copytree(c.model, d)
    (d / "heads.json").write_text(json.dumps({"format": 1, "heads": {"senti": {"task_type": "classification",
                                                                              "num_labels": 2}}, "extra": {}}))
    return c.finetune("model=" + str(d)), ["heads"]


@case("student_init_path_missing", "model folders")
def _(c):
    return c.distill("student.init=path", f"student.path={c.tmp / 'nope'}"), ["student.path", "nope"]


@case("mix_teacher_missing", "model folders")
def _(c):
    return c.distill(f"mix_teacher={c.tmp / 'nope'}", "mix_weight=0.5"), ["mix_teacher", "nope"]


@case("probe_model_missing", "model folders")
def _(c):
    return ["probe", "--tasks", str(c.tasks["senti"]), "--output-dir", str(c.out), f"models.ref={c.tmp / 'nope'}"], \
        ["models.ref", "nope"]


# ---- overrides --------------------------------------------------------------------------
@case("override_without_equals", "overrides")
def _(c):
    return c.finetune("max_steps"), ["max_steps", "key=value"]


@case("override_empty_key", "overrides")
def _(c):
    return c.finetune("=3"), ["empty key"]


@case("override_unknown_nested", "overrides")
def _(c):
    return c.finetune("optim.lrr=0.1"), ["optim.lrr", "unknown field"]


@case("override_wrong_list_type", "overrides")
def _(c):
    return ["eval", "--model", str(c.model), "--tasks", "sst2", "--output-dir", str(c.out), "seeds=a,b"], ["seeds[0]"]


@case("override_conflict", "overrides")
def _(c):
    return c.finetune("optim=1", "optim.lr=2"), ["optim"]


@case("override_bad_bool", "overrides")
def _(c):
    return c.finetune("save_model=maybe"), ["save_model", "maybe"]


# ---- resume state (a checkpoint from a short run, altered) -------------------------------
def _resume(c, alter: Callable[[Path], None], *extra: str) -> List[str]:
    shutil.copytree(_CHECKPOINTED, c.out)
    alter(c.out / "checkpoints")
    return c.distill("--max-steps", "4", *extra, corpus=str(_CHECKPOINT_CORPUS / "*.txt"))


def _latest(ckpt: Path) -> Path:
    return ckpt / (ckpt / "latest").read_text().strip()


@case("resume_client_state_garbage", "resume state")
def _(c):
    return _resume(c, lambda d: (_latest(d) / "client_state_rank0.pt").write_bytes(b"not a torch file")), \
        ["client_state_rank0.pt", "checkpoint state"]


@case("resume_client_state_pickled_object", "resume state")
def _(c):
    # A pickled class instance: weights_only refuses it instead of running its code.
    return _resume(c, lambda d: torch.save({"loader": Ctx}, _latest(d) / "client_state_rank0.pt")), \
        ["client_state_rank0.pt"]


@case("resume_marker_not_json", "resume state")
def _(c):
    return _resume(c, lambda d: (_latest(d) / "COMPLETE").write_text("{half")), ["COMPLETE", "marker"]


@case("resume_state_without_loader", "resume state")
def _(c):
    return _resume(c, lambda d: torch.save({"state": {"step": 2}}, _latest(d) / "client_state_rank0.pt")), \
        ["checkpoints", "'loader'"]


@case("resume_corpus_shard_changed", "resume state")
def _(c):
    shard = sorted(_CHECKPOINT_CORPUS.glob("*.txt"))[0]
    original = shard.read_bytes()
    c.cleanups.append(lambda: shard.write_bytes(original))
    return _resume(c, lambda _: shard.write_bytes(original + b"\n\nmore text was added here.\n")), \
        [shard.name, "changed since the checkpoint", "new output_dir"]


@case("resume_seq_length_changed", "resume state")
def _(c):
    return _resume(c, lambda d: None, "corpus.seq_length=48"), ["corpus.seq_length", "checkpoint"]


# ---- locks ------------------------------------------------------------------------------
@case("output_dir_locked_by_live_job", "output lock")
def _(c):
    import socket

    from toolkit.utils.lock import _proc_start

    c.out.mkdir()
    (c.out / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 1, "start": _proc_start(1),
                                             "job": "distill", "since": 0, "heartbeat": 0}))
    return c.finetune(), [str(c.out), "in use", "distill"]


# ---- the shared checkpoint of the resume cases -------------------------------------------
_CHECKPOINTED: Path = Path("/nonexistent")
_CHECKPOINT_CORPUS: Path = Path("/nonexistent")


@pytest.fixture(scope="module")
def checkpointed(tiny_bert_dir, fixture_corpus, tmp_path_factory):
    """A distill output folder with a complete checkpoint at step 2 (one short real run)."""
    global _CHECKPOINTED, _CHECKPOINT_CORPUS
    root = tmp_path_factory.mktemp("checkpointed")
    out = root / "run"
    corpus = root / "corpus"   # its own copy: one case alters (and restores) a shard
    shutil.copytree(fixture_corpus, corpus)
    ctx = Ctx(tiny_bert_dir, {}, corpus, root, out)
    r = CliRunner().invoke(main, ctx.distill())
    assert r.exit_code == 0, r.output
    assert (out / "checkpoints" / "latest").is_file()
    _CHECKPOINTED, _CHECKPOINT_CORPUS = out, corpus
    return out


def _snapshot(folder: Path) -> Optional[Dict[str, int]]:
    if not folder.exists():
        return None
    return {str(p.relative_to(folder)): (p.stat().st_size if p.is_file() else -1) for p in folder.rglob("*")}


def _check(result_output: str, exit_code: int, must: Sequence[str]) -> str:
    text = result_output
    assert exit_code == 2, f"exit {exit_code}, expected 2:\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-3000:]
    line = errors[0]
    assert len(line) <= MAX_MESSAGE, f"message too long ({len(line)} chars): {line}"
    for m in must:
        assert m in line, f"{m!r} not in: {line}"
    return line


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input(name, request, tiny_bert_dir, fixture_tasks, fixture_corpus, tmp_path):
    category, build = CASES[name]
    if category == "resume state":
        request.getfixturevalue("checkpointed")
    c = Ctx(tiny_bert_dir, fixture_tasks, fixture_corpus, tmp_path / "in", tmp_path / "out", cleanups=[])
    c.tmp.mkdir()
    try:
        argv, must = build(c)
        before = _snapshot(c.out)
        r = CliRunner().invoke(main, argv)
    finally:
        for fn in c.cleanups:
            fn()
    if r.exit_code == 1 and r.exc_info is not None:   # an uncaught exception: show where
        import traceback

        raise AssertionError("".join(traceback.format_exception(*r.exc_info))[-4000:])
    _check(r.output, r.exit_code, must)
    after = _snapshot(c.out)
    # No half-made output folder: none created, and an existing one (resume, lock) unchanged.
    assert after == before, f"the output folder changed: {sorted(set(after or {}) ^ set(before or {}))}"


def test_at_least_forty_cases_across_every_kind_of_input():
    cats: Dict[str, int] = {}
    for category, _ in CASES.values():
        cats[category] = cats.get(category, 0) + 1
    assert len(CASES) >= 40, len(CASES)
    assert {"corpus", "task YAML", "data files", "predictions", "job YAML", "DeepSpeed JSON", "model folders",
            "overrides", "resume state"} <= set(cats), cats


@pytest.mark.parametrize("name", ["job_yaml_unknown_field", "ds_trailing_comma", "pred_unknown_label",
                                  "model_dir_missing", "task_yaml_syntax"])
def test_real_process(name, tiny_bert_dir, fixture_tasks, fixture_corpus, tmp_path):
    """The same refusals as a user sees them: ``python -m toolkit ...`` in its own process."""
    c = Ctx(tiny_bert_dir, fixture_tasks, fixture_corpus, tmp_path / "in", tmp_path / "out", cleanups=[])
    c.tmp.mkdir()
    argv, must = CASES[name][1](c)
    p = subprocess.run([sys.executable, "-m", "toolkit", *argv], capture_output=True, text=True, timeout=300,
                       cwd=ROOT, env=subprocess_env(PYTHONPATH=str(ROOT)))
    line = _check(p.stdout + p.stderr, p.returncode, must)
    assert line in p.stderr and not p.stdout.strip()
    assert not c.out.exists()
