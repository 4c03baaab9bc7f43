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

from toolkit.config import arg, save_config
from toolkit.data.corpus import CorpusConfig
from toolkit.data.loader import build_loader
from toolkit.data.multitask import SAMPLING_MODES, TaskBatchSampler, task_probabilities
from toolkit.engine import Engine, OptimConfig, dist
from toolkit.engine.ds_config import load_ds_config
from toolkit.engine.signals import REQUEUE_EXIT_CODE, PreemptionHandler
from toolkit.errors import ConfigError, DataError, ToolkitError
from toolkit.losses import MiniLMv2RelationLoss, Needs
from toolkit.models.capture import LayerCapture, resolve_layer
from toolkit.models.encoder import check_vocab
from toolkit.models.task_model import load_task_model, save_task_model
from toolkit.plan import preflight
from toolkit.recipes.common import (batch_size_of, check_corpus, check_ds_config, check_model_dir,
                                    check_task_tokenizer, count_tokens, forward_kwargs,
                                    mean_across_ranks, resolve_ds_config, to_device, write_json)
from toolkit.recipes.frozen import FrozenTeacher
from toolkit.recipes.predict import predict, score_split
from toolkit.tasks import resolve_tasks
from toolkit.tasks.features import collate, encode_examples
from toolkit.utils.fsio import publish_dir
from toolkit.utils.lock import locked_output
from toolkit.utils.logging import RunLogger, close_log_file, configure_logging, get_logger
from toolkit.utils.meter import Throughput, memory_kind
from toolkit.utils.progress import ProgressBar

log = get_logger(__name__)


@dataclass
class AnchorConfig:
    """Ways to keep the multi-task teacher close to what it knew before (its generality)."""

    l2sp: float = arg(0.0, "L2-SP: add l2sp/2 x the squared distance of the encoder's weights to the pretrained "
                      "ones to the loss (0 = off; ZeRO stages 0-2)")
    relation: float = arg(0.0, "weight of a MiniLMv2 relation loss (Q-Q, K-K, V-V) between the encoder and its "
                          "frozen pretrained copy on unlabeled text from anchor.corpus, every micro step (0 = off)")
    relation_layer: int = arg(0, "1-based layer whose relations the relation anchor keeps (0 = the last)")
    relation_heads: int = arg(0, "relation heads of the relation anchor (0 = the encoder's attention heads)")
    corpus: CorpusConfig = arg(help="unlabeled text for the relation anchor (sources, seq_length, ...)",
                               factory=CorpusConfig)

    def __post_init__(self) -> None:
        if self.l2sp < 0:
            raise ConfigError("anchor.l2sp", f"must be >= 0, got {self.l2sp}")
        if self.relation < 0:
            raise ConfigError("anchor.relation", f"must be >= 0, got {self.relation}")
        if self.relation > 0 and not self.corpus.sources:
            raise ConfigError("anchor.corpus.sources", "the relation anchor needs unlabeled text")


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
    optim: OptimConfig = arg(help="AdamW and learning-rate schedule",
                             factory=lambda: OptimConfig(lr=3e-5, warmup_ratio=0.1))
    anchor: AnchorConfig = arg(help="keeping the teacher general: L2-SP and a relation anchor to the pretrained "
                               "encoder", factory=AnchorConfig)
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

    MOVED_FIELDS = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "warmup_ratio": "optim.warmup_ratio",
                    "decay": "optim.decay", "optimizer": "optim.impl"}

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks", "give at least one task")
        if self.sampling not in SAMPLING_MODES:
            raise ConfigError("sampling", f"must be one of {list(SAMPLING_MODES)}, got {self.sampling!r}")
        if self.temperature <= 0:
            raise ConfigError("temperature", "must be > 0")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("epochs", "set epochs > 0 or max_steps > 0")


class TeacherRecipe:
    def __init__(self, cfg: TeacherConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.logger: Optional[RunLogger] = None

    # ------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check the model folder, the DeepSpeed JSON and the anchor corpus before loading anything."""
        cfg = self.cfg
        check_model_dir("model", cfg.model)
        check_ds_config(cfg.ds_config)
        if cfg.anchor.relation > 0:
            check_corpus("anchor.corpus", cfg.anchor.corpus)

    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        self.validate()
        preflight("teacher", cfg)   # shapes and the batch, before any model is loaded
        self.tasks = resolve_tasks(cfg.tasks, cfg.data_dir)
        for task in self.tasks:   # every train split read (and checked) before the model loads
            task.load("train")
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
        self.engine = Engine(model, ds, cfg.optim, total_steps=self.total_steps, max_nonfinite=cfg.max_nonfinite)
        eng = self.engine
        self.model = eng.module
        self._setup_anchor()
        self.sampler = TaskBatchSampler(sizes, eng.micro_batch_size, eng.world_size, eng.rank, cfg.sampling,
                                        cfg.temperature, cfg.task_cap or None, cfg.seed)
        self.state: Dict[str, Any] = {"step": 0, "micro_step": 0, "best_score": -math.inf, "best_step": None,
                                      "history": [], "nonfinite_total": 0}
        dist.check_shared_folder(self.out)
        if cfg.resume:
            client = eng.load_checkpoint(self.ckpt_dir)
            if client is not None:
                missing = [k for k in ("sampler", "state") if k not in client]
                if missing:
                    raise ToolkitError(f"{self.ckpt_dir}: the latest checkpoint's state lacks {missing[0]!r} (not "
                                       f"written by toolkit teacher); start fresh with a new output_dir or "
                                       f"resume=false")
                self.sampler.load_state_dict(client["sampler"])
                self.state.update(client["state"])
                if self.anchor_loader is not None and "anchor_loader" in client:
                    self.anchor_loader.load_state_dict(client["anchor_loader"])
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

    def _setup_anchor(self) -> None:
        """L2-SP's starting point and the relation anchor's frozen copy and corpus stream."""
        cfg, eng = self.cfg, self.engine
        a = cfg.anchor
        self.anchor_weights: List[tuple] = []
        self.anchor_loader = None
        if a.l2sp > 0:
            if eng.zero_stage >= 3:
                raise ConfigError("anchor.l2sp", "L2-SP reads every encoder weight in full at each step, which "
                                  "ZeRO-3 partitions away; use ZeRO stage 0-2 (or the relation anchor)")
            self.anchor_weights = [(p, p.detach().float().clone()) for p in self.model.encoder.parameters()
                                   if p.requires_grad]
        if a.relation > 0:
            n = self.model.encoder.config.num_hidden_layers
            layer = resolve_layer(a.relation_layer or n, n, "anchor.relation_layer")
            needs = Needs(student={layer: {"q", "k", "v"}}, teacher={layer: {"q", "k", "v"}})
            self.anchor_teacher = FrozenTeacher(cfg.model, needs, eng.device, eng.compute_dtype, "model")
            heads = a.relation_heads or self.model.encoder.config.num_attention_heads
            if self.model.encoder.config.hidden_size % heads:
                raise ConfigError("anchor.relation_heads", f"{heads} relation heads do not divide the hidden size "
                                  f"{self.model.encoder.config.hidden_size}")
            self.anchor_relation = MiniLMv2RelationLoss(heads)
            self.anchor_layer = layer
            self.anchor_capture = LayerCapture(self.model.encoder, {layer: {"q", "k", "v"}})
            self.anchor_loader = build_loader(a.corpus, self.tokenizer, batch_size=eng.micro_batch_size,
                                              rank=eng.rank, world_size=eng.world_size)
            self.anchor_iter = None
        if a.l2sp > 0 or a.relation > 0:
            log.info("teacher: anchored to the pretrained encoder (L2-SP %g, relation %g%s)", a.l2sp, a.relation,
                     f" at layer {self.anchor_layer + 1}" if a.relation > 0 else "")

    def _anchor_batch(self) -> Optional[Dict[str, torch.Tensor]]:
        """The relation anchor's next batch of unlabeled text (None without the anchor). Drawn
        before the micro step seeds dropout, so the stream never shifts the dropout masks."""
        if self.anchor_loader is None:
            return None
        if self.anchor_iter is None:
            self.anchor_iter = iter(self.anchor_loader)
        batch = next(self.anchor_iter, None)
        if batch is None:   # a finite anchor corpus starts over
            self.anchor_iter = iter(self.anchor_loader)
            batch = next(self.anchor_iter)
        return {k: v.to(self.engine.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def _anchor_losses(self, batch: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        """The anchors' terms for this micro step (empty when no anchor is on)."""
        a, out = self.cfg.anchor, {}
        if self.anchor_weights:
            dist2 = sum(((p.float() - p0) ** 2).sum() for p, p0 in self.anchor_weights)
            out["l2sp"] = 0.5 * a.l2sp * dist2
        if batch is not None:
            target = self.anchor_teacher(batch)["layers"][self.anchor_layer]
            self.anchor_capture.clear()
            self.model.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               token_type_ids=batch["token_type_ids"])
            rel = self.anchor_relation(self.anchor_capture.captured[self.anchor_layer], target,
                                       batch["attention_mask"])["loss"]
            out["relation"] = a.relation * rel
        return out

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
        client = {"sampler": self.sampler.state_dict(), "state": dict(st)}
        if self.anchor_loader is not None:
            client["anchor_loader"] = self.anchor_loader.state_dict()
        self.engine.save_checkpoint(self.ckpt_dir, f"step{st['step']}", client, keep_last=self.cfg.keep_last)

    def _save_model(self, metrics: Dict[str, Any]) -> None:
        state = self.engine.consolidated_state_dict()
        if self.engine.is_main:
            # Replaces the previous best whole: a kill leaves it or this one, never half of one.
            with publish_dir(self.out / "model", kind="teacher", meta={"step": self.state["step"]}) as tmp:
                save_task_model(self.model, self.tokenizer, tmp, state_dict=state,
                                extra={"mitkd_teacher": {"tasks": [t.name for t in self.tasks],
                                                         "step": self.state["step"], **metrics}})
                write_json(tmp / "metrics.json", metrics)
        dist.barrier()

    def train(self) -> Dict[str, Any]:
        cfg, eng, st = self.cfg, self.engine, self.state
        meter = Throughput(eng.device, world_size=eng.world_size)
        running, n_loss = 0.0, 0
        anchor_sums: Dict[str, Any] = {}
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
                    anchor_batch = self._anchor_batch()
                # Dropout depends only on (seed, micro step, rank): exact resume without RNG state.
                torch.manual_seed(cfg.seed * 1_000_003 + st["micro_step"] * 1009 + eng.rank)
                out = eng(task=task.name, **forward_kwargs(self.model.forward, batch))
                anchors = self._anchor_losses(anchor_batch)
                loss = out.loss + sum(anchors.values()) if anchors else out.loss
                if eng.backward(loss):
                    running += out.loss.detach().double()   # on the device; read at log steps
                    for k, v in anchors.items():
                        anchor_sums[k] = anchor_sums.get(k, 0.0) + v.detach().double()
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
                    logged = mean_across_ranks({"loss": running, **{f"anchor/{k}": v for k, v in anchor_sums.items()}},
                                               n_loss)
                    self.logger.log(st["step"], {**logged, "lr": eng.lr, **meter.summary()})
                    running, n_loss, anchor_sums = 0.0, 0, {}
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
                  "throughput": {**summary, "memory_kind": memory_kind(eng.device)}}
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
        with locked_output(self.out, "teacher", is_main=dist.rank() == 0):
            try:
                self.setup()
                return self.train()
            finally:
                self.cleanup()


def run_teacher(cfg: TeacherConfig) -> Dict[str, Any]:
    return TeacherRecipe(cfg).run()
