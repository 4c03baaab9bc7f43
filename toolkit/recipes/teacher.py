"""``toolkit teacher`` / ``deepspeed launchers/train_teacher.py``: the MITKD multi-task teacher.

Step 1 of MITKD: fine-tune the (large) teacher on many downstream tasks at once. A shared
encoder carries one head per task; every micro batch holds one task, drawn by
:class:`~toolkit.data.multitask.TaskBatchSampler` (proportional, temperature or uniform).
Every task is scored on its dev split(s) periodically; the checkpoint with the best average
of the tasks' main metrics is what the job outputs (``output_dir/model``).

Resume: checkpoints hold the engine (weights, optimizer, scheduler) and, in ``client_state``,
the step, the sampler state, the best score and the history. Dropout is seeded from
(seed, micro step, rank), so a resumed run reproduces the loss curve of an unstopped one.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from toolkit.config import arg, cpu_accel_arg, normalize_cpu_accel, save_config
from toolkit.data.multitask import SAMPLING_MODES, TaskBatchSampler, task_probabilities
from toolkit.engine import Engine, OptimConfig, dist
from toolkit.engine.engine import OPTIMIZER_HELP, check_optimizer_impl
from toolkit.engine.ds_config import load_ds_config
from toolkit.engine.signals import REQUEUE_EXIT_CODE, PreemptionHandler
from toolkit.errors import ConfigError, DataError
from toolkit.models.encoder import check_vocab
from toolkit.models.task_model import load_task_model, save_task_model
from toolkit.recipes.common import (accelerate_cpu, batch_size_of, check_task_tokenizer, count_tokens, forward_kwargs,
                                    mean_across_ranks, resolve_ds_config, to_device, write_json)
from toolkit.recipes.predict import predict, score_split
from toolkit.tasks import resolve_tasks
from toolkit.tasks.features import collate, encode_examples
from toolkit.utils.logging import RunLogger, close_log_file, configure_logging, get_logger
from toolkit.utils.meter import Throughput, memory_kind
from toolkit.utils.progress import ProgressBar

log = get_logger(__name__)


@dataclass
class TeacherConfig:
    model: str = arg(help="pretrained teacher encoder directory (HF save_pretrained; BERT or ERNIE)")
    tasks: List[str] = arg(help="tasks trained jointly: names, groups (glue, clue) or custom task YAML paths",
                           factory=list)
    data_dir: Optional[str] = arg(None, "data root holding the official task folders")
    output_dir: str = arg("runs/teacher", "output: model/ (the teacher), checkpoints/, logs, metrics.jsonl")
    ds_config: str = arg("auto", "DeepSpeed JSON: micro batch, accumulation, precision, ZeRO stage; "
                         "auto = zero2_bf16.json on GPUs, cpu_fp32.json on CPUs")
    sampling: str = arg("temperature", "task sampling: proportional | temperature | uniform")
    temperature: float = arg(2.0, "T in p ∝ n^(1/T) for temperature sampling")
    task_cap: int = arg(0, "cap on examples per task (for sampling weights and per-epoch use); 0 = none")
    train_limit: int = arg(0, "use only the first N train examples of each task (quick runs); 0 = all")
    epochs: float = arg(2.0, "passes over the (capped) union of train sets; ignored when max_steps > 0")
    max_steps: int = arg(0, "optimizer steps; 0 = derive from epochs")
    lr: float = arg(3e-5, "peak learning rate")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    warmup_ratio: float = arg(0.1, "fraction of steps with linear warmup")
    decay: str = arg("linear", "decay after warmup: linear | cosine | constant")
    optimizer: str = arg("auto", "AdamW implementation: " + OPTIMIZER_HELP)
    max_seq_length: int = arg(128, "tokens per sequence")
    eval_every: int = arg(0, "score every task on dev every N steps (0 = at the end only)")
    save_every: int = arg(0, "checkpoint every N steps (0 = only when stopping)")
    keep_last: int = arg(2, "checkpoints kept on disk")
    log_every: int = arg(10, "log loss and throughput every N steps")
    eval_batch_size: int = arg(64, "prediction batch size")
    dropout: float = arg(0.1, "dropout of the task heads")
    seed: int = arg(42, "random seed")
    resume: bool = arg(True, "resume from the latest complete checkpoint in output_dir/checkpoints if there is one")
    max_nonfinite: int = arg(20, "stop with an error after this many consecutive non-finite losses")
    stop_after: int = arg(0, "testing aid: stop (with a checkpoint) after N steps, as a preemption would")
    cpu_accel: str = cpu_accel_arg()

    def __post_init__(self) -> None:
        self.cpu_accel = normalize_cpu_accel(self.cpu_accel)
        check_optimizer_impl(self.optimizer, "optimizer")
        if not self.tasks:
            raise ConfigError("tasks", "give at least one task")
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError("sampling", f"must be one of {list(SAMPLING_MODES)}, got {self.sampling!r}")
        if self.temperature <= 0:
            raise ConfigError("temperature", "must be > 0")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("epochs", "set epochs > 0 or max_steps > 0")
        if self.lr <= 0:
            raise ConfigError("lr", "must be > 0")


class TeacherRecipe:
    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.logger: Optional[RunLogger] = None

    # ------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.tasks = resolve_tasks(cfg.tasks, cfg.data_dir)
        model, tokenizer = load_task_model(cfg.model)
        check_vocab(tokenizer, model.encoder, cfg.model)
        self.tokenizer = tokenizer
        self.train_enc, self.dev = [], []
        for task in self.tasks:
            ex = task.load("train")
            if not ex:
                raise DataError(task.split_path("train"), f"task '{task.name}' has an empty train split")
            if cfg.train_limit:
                ex = ex[: cfg.train_limit]
            check_task_tokenizer(task, ex, tokenizer, cfg.model)
            self.train_enc.append(encode_examples(task, ex, tokenizer, max_seq_length=cfg.max_seq_length))
            devs = []
            for split, suffix in zip(task.eval_splits, task.eval_suffixes):
                if task.has_split(split):
                    dex = task.load(split)
                    devs.append((suffix, dex, encode_examples(task, dex, tokenizer, max_seq_length=cfg.max_seq_length)))
            self.dev.append(devs)
            if task.name not in model.heads:
                model.add_head(task.name, task.task_type, task.num_labels, labels=task.labels, dropout=cfg.dropout)

        world = int(os.environ.get("WORLD_SIZE", "1"))
        ds = load_ds_config(resolve_ds_config(cfg.ds_config), world)
        sizes = [len(e) for e in self.train_enc]
        used = sum(min(s, cfg.task_cap) if cfg.task_cap else s for s in sizes)
        self.total_steps = cfg.max_steps or max(1, math.ceil(used * cfg.epochs / ds["train_batch_size"]))
        optim = OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, decay=cfg.decay,
                            impl=cfg.optimizer)
        self.engine = Engine(model, ds, optim, total_steps=self.total_steps, max_nonfinite=cfg.max_nonfinite)
        eng = self.engine
        self.model = eng.module
        self.cpu_accel = accelerate_cpu(self.model, trained=True, cpu_accel=cfg.cpu_accel, what="teacher model")
        self.sampler = TaskBatchSampler(sizes, eng.micro_batch_size, eng.world_size, eng.rank, cfg.sampling,
                                        cfg.temperature, cfg.task_cap or None, cfg.seed)
        self.state: Dict[str, Any] = {"step": 0, "micro_step": 0, "best_score": -math.inf, "best_step": None,
                                      "history": [], "nonfinite_total": 0}
        if cfg.resume:
            client = eng.load_checkpoint(self.ckpt_dir)
            if client is not None:
                self.sampler.load_state_dict(client["sampler"])
                self.state.update(client["state"])
                log.info("resumed from step %d", self.state["step"])
        self.logger = RunLogger(self.out, is_main=eng.is_main)
        # Every rank keeps its own log file (output_dir/logs/rank{r}.log); the console and the
        # metrics files are rank 0's.
        self.rank_log = configure_logging(self.out, eng.rank)
        if eng.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.json")
            probs = dict(zip([t.name for t in self.tasks], task_probabilities(sizes, cfg.sampling, cfg.temperature,
                                                                               cfg.task_cap or None).tolist()))
            write_json(self.out / "tasks.json", {"sizes": dict(zip([t.name for t in self.tasks], sizes)),
                                                 "probabilities": probs})
        log.info("teacher: %d tasks %s, %d steps, global batch %d, ZeRO %s, %s", len(self.tasks),
                 [t.name for t in self.tasks], self.total_steps, eng.train_batch_size, eng.zero_stage,
                 eng.compute_dtype)

    # ------------------------------------------------------------------------------------
    def evaluate(self) -> Dict[str, Any]:
        per_task: Dict[str, Dict[str, float]] = {}
        mains = []
        for task, devs in zip(self.tasks, self.dev):
            metrics: Dict[str, float] = {}
            for suffix, examples, enc in devs:
                preds, extra = predict(self.engine, self.model, task, enc, self.cfg.eval_batch_size,
                                       self.engine.device)
                metrics.update(score_split(task, examples, preds, extra, suffix))
            per_task[task.name] = metrics
            keys = [f"{task.main_metric}{s}" for s in task.eval_suffixes if f"{task.main_metric}{s}" in metrics]
            if keys:
                mains.append(sum(metrics[k] for k in keys) / len(keys))
        avg = sum(mains) / len(mains) if mains else float("nan")
        return {"average": avg, "tasks": per_task}

    def save_checkpoint(self) -> None:
        st = self.state
        self.engine.save_checkpoint(self.ckpt_dir, f"step{st['step']}",
                                    {"sampler": self.sampler.state_dict(), "state": dict(st)},
                                    keep_last=self.cfg.keep_last)

    def _save_model(self, metrics: Dict[str, Any]) -> None:
        state = self.engine.consolidated_state_dict()
        if self.engine.is_main:
            save_task_model(self.model, self.tokenizer, self.out / "model", state_dict=state,
                            extra={"mitkd_teacher": {"tasks": [t.name for t in self.tasks],
                                                     "step": self.state["step"], **metrics}})
            write_json(self.out / "model" / "metrics.json", metrics)
        dist.barrier()

    def train(self) -> Dict[str, Any]:
        cfg, eng, st = self.cfg, self.engine, self.state
        meter = Throughput(eng.device, world_size=eng.world_size)
        running, n_loss = 0.0, 0
        t0 = time.time()
        bar = ProgressBar(self.total_steps, eng.is_main, initial=st["step"], desc="teacher")
        with PreemptionHandler() as pre, bar:
            while st["step"] < self.total_steps:
                with meter.data_wait():
                    draw = self.sampler.next()
                    task = self.tasks[draw["task"]]
                    batch = collate([self.train_enc[draw["task"]][i] for i in draw["indices"]])
                    # Counted on the host copy (the device mask would cost a sync per micro step).
                    n_samples, n_tokens = batch_size_of(batch), count_tokens(batch)
                    batch = to_device(batch, eng.device)
                # Dropout depends only on (seed, micro step, rank): exact resume without RNG state.
                torch.manual_seed(cfg.seed * 1_000_003 + st["micro_step"] * 1009 + eng.rank)
                out = eng(task=task.name, **forward_kwargs(self.model.forward, batch))
                if eng.backward(out.loss):
                    running += out.loss.detach().double()   # on the device; read at log steps
                    n_loss += 1
                else:
                    st["nonfinite_total"] += 1
                st["micro_step"] += 1
                meter.step(n_samples, n_tokens)   # this rank's; sync_ranks sums all ranks' at log steps
                if not eng.step():
                    continue
                st["step"] = eng.global_step
                bar.update(1, loss=out.loss.detach(), tokens_per_s=meter.summary().get("tokens_per_s"))
                if st["step"] % cfg.log_every == 0:
                    meter.sync_ranks(dist.all_reduce_sum)
                    loss = mean_across_ranks({"loss": running}, n_loss)
                    self.logger.log(st["step"], {**loss, "lr": eng.lr, **meter.summary()})
                    running, n_loss = 0.0, 0
                if cfg.eval_every and st["step"] % cfg.eval_every == 0:
                    self._eval_and_keep()
                if cfg.save_every and st["step"] % cfg.save_every == 0:
                    self.save_checkpoint()
                # All ranks must agree: one that alone saw the signal would checkpoint (collectives)
                # while the others run the next step's.
                preempted = dist.any_rank(pre.requested)
                if preempted or (cfg.stop_after and st["step"] >= cfg.stop_after):
                    self.save_checkpoint()
                    self.logger.close()
                    log.warning("stopping at step %d with a checkpoint (%s)", st["step"],
                                "preemption signal" if preempted else "stop_after")
                    if preempted:
                        raise SystemExit(REQUEUE_EXIT_CODE)
                    return {"stopped_at": st["step"]}
        if not st["history"] or st["history"][-1]["step"] != st["step"]:
            self._eval_and_keep()
        meter.sync_ranks(dist.all_reduce_sum)
        summary = meter.summary()
        result = {"tasks": [t.name for t in self.tasks], "steps": st["step"], "best_step": st["best_step"],
                  "best_average": st["best_score"], "history": st["history"],
                  "nonfinite_losses": st["nonfinite_total"], "train_time_s": time.time() - t0,
                  "throughput": {**summary, "memory_kind": memory_kind(eng.device)},
                  "cpu_accel": self.cpu_accel}
        if eng.is_main:
            write_json(self.out / "metrics.json", result)
        self.save_checkpoint()
        return result

    def _eval_and_keep(self) -> None:
        st = self.state
        res = self.evaluate()
        entry = {"step": st["step"], "average": res["average"], "tasks": res["tasks"]}
        st["history"].append(entry)
        flat = {"average": res["average"]}
        for tname, m in res["tasks"].items():
            flat.update({f"{tname}/{k}": v for k, v in m.items()})
        self.logger.log(st["step"], flat, prefix="eval")
        if res["average"] > st["best_score"] or st["best_step"] is None:
            st["best_score"], st["best_step"] = res["average"], st["step"]
            self._save_model(entry)

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if getattr(self, "rank_log", None) is not None:
            close_log_file(self.rank_log)

    def run(self) -> Dict[str, Any]:
        try:
            self.setup()
            return self.train()
        finally:
            self.cleanup()


def run_teacher(cfg: TeacherConfig) -> Dict[str, Any]:
    return TeacherRecipe(cfg).run()
