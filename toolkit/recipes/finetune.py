"""``toolkit finetune``: fine-tune an encoder on one task and score it on the dev split(s).

Engine settings (micro batch, accumulation, precision, ZeRO) come from the DeepSpeed JSON;
everything else from :class:`FinetuneConfig`. Used on its own and, in-process, by
``toolkit eval`` (one run per task x learning rate x seed).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from toolkit.config import arg, cpu_accel_arg, normalize_cpu_accel, save_config
from toolkit.engine import Engine, OptimConfig, dist
from toolkit.engine.engine import OPTIMIZER_HELP, check_optimizer_impl
from toolkit.errors import ConfigError, DataError
from toolkit.models.encoder import check_vocab
from toolkit.models.task_model import load_task_model, save_task_model
from toolkit.recipes.common import (accelerate_cpu, batch_size_of, count_tokens, forward_kwargs, resolve_ds_config,
                                    to_device, write_json)
from toolkit.recipes.predict import predict, score_split
from toolkit.tasks import get_task
from toolkit.tasks.features import collate, encode_examples
from toolkit.utils.logging import RunLogger, get_logger
from toolkit.utils.meter import Throughput, memory_kind
from toolkit.utils.progress import ProgressBar
from toolkit.utils.seed import set_seed

log = get_logger(__name__)


@dataclass
class FinetuneConfig:
    model: str = arg(help="encoder or task-model directory (HF save_pretrained) to fine-tune")
    task: str = arg(help="task name (sst2, mnli, squad_v2, cmrc2018, ...) or a custom task YAML path")
    data_dir: Optional[str] = arg(None, "data root (e.g. the GLUE download folder); custom YAML tasks ignore it")
    output_dir: str = arg("runs/finetune", "where results.json, logs and the fine-tuned model go")
    ds_config: str = arg("auto", "DeepSpeed JSON (path, or a name in ds_configs/): batch, precision, ZeRO; "
                         "auto = zero2_bf16.json on GPUs, cpu_fp32.json on CPUs")
    epochs: float = arg(3.0, "training epochs (ignored when max_steps > 0)")
    max_steps: int = arg(0, "optimizer steps; 0 = derive from epochs")
    lr: float = arg(2e-5, "peak learning rate")
    weight_decay: float = arg(0.01, "AdamW weight decay (not on biases and LayerNorm)")
    warmup_ratio: float = arg(0.1, "fraction of steps with linear warmup")
    decay: str = arg("linear", "learning-rate decay after warmup: linear | cosine | constant")
    optimizer: str = arg("auto", "AdamW implementation: " + OPTIMIZER_HELP)
    max_seq_length: int = arg(128, "tokens per sequence (longer inputs are truncated / windowed)")
    doc_stride: int = arg(128, "span tasks: stride between context windows")
    max_query_length: int = arg(64, "span tasks: question tokens kept")
    n_best_size: int = arg(20, "span tasks: candidate starts/ends considered when decoding")
    max_answer_length: int = arg(30, "span tasks: longest answer in tokens")
    eval_batch_size: int = arg(64, "batch size for prediction")
    eval_every: int = arg(0, "evaluate every N optimizer steps; 0 = after every epoch (see eval_each_epoch)")
    eval_each_epoch: bool = arg(True, "with eval_every 0: score dev after every epoch and keep the best; "
                                "false = only after the last step")
    train_limit: int = arg(0, "use only the first N training examples after a seeded shuffle (low-resource); 0 = all")
    dropout: float = arg(0.1, "dropout of a newly created task head")
    seed: int = arg(42, "random seed (data order, head init, dropout)")
    log_every: int = arg(20, "log training loss and throughput every N optimizer steps")
    save_model: bool = arg(True, "save the best model (by the task's main dev metric) to output_dir/model")
    write_submissions: bool = arg(True, "write leaderboard submission files for test splits that exist")
    cpu_accel: str = cpu_accel_arg()

    def __post_init__(self) -> None:
        self.cpu_accel = normalize_cpu_accel(self.cpu_accel)
        check_optimizer_impl(self.optimizer, "optimizer")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("epochs", "set epochs > 0 or max_steps > 0")
        if self.lr <= 0:
            raise ConfigError("lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        if self.max_seq_length < 8:
            raise ConfigError("max_seq_length", f"must be >= 8, got {self.max_seq_length}")
        if self.train_limit < 0:
            raise ConfigError("train_limit", "must be >= 0")


class FinetuneRecipe:
    """One task, one learning rate, one seed. ``run()`` = setup + train + cleanup."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    # ------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        set_seed(cfg.seed)
        self.task = get_task(cfg.task, cfg.data_dir)
        train = self.task.load("train")
        if not train:
            raise DataError(self.task.split_path("train"), "the train split is empty")
        if cfg.train_limit and cfg.train_limit < len(train):
            order = np.random.default_rng(cfg.seed).permutation(len(train))[: cfg.train_limit]
            train = [train[i] for i in sorted(order)]
        self.train_examples = train
        self.eval_sets = []
        for split, suffix in zip(self.task.eval_splits, self.task.eval_suffixes):
            ex = self.task.load(split)
            self.eval_sets.append((split, suffix, ex))

        model, tokenizer = load_task_model(cfg.model)
        check_vocab(tokenizer, model.encoder, cfg.model)
        if self.task.name not in model.heads:
            model.add_head(self.task.name, self.task.task_type, self.task.num_labels,
                           labels=self.task.labels, dropout=cfg.dropout)
        self.tokenizer = tokenizer
        enc_kw = dict(max_seq_length=cfg.max_seq_length, doc_stride=cfg.doc_stride,
                      max_query_length=cfg.max_query_length)
        self.train_enc = encode_examples(self.task, self.train_examples, tokenizer, **enc_kw)
        self.eval_enc = [(s, suf, ex, encode_examples(self.task, ex, tokenizer, **enc_kw))
                         for s, suf, ex in self.eval_sets]
        self.enc_kw = enc_kw

        ds_path = resolve_ds_config(cfg.ds_config)
        # Steps depend on the micro batch that the DS JSON sets: read it before building the
        # optimizer schedule, via a first engine-free look at the JSON.
        from toolkit.engine.ds_config import load_ds_config

        ds = load_ds_config(ds_path, int(os.environ.get("WORLD_SIZE", "1")))
        global_batch = ds["train_batch_size"]
        # Whole global batches only, as _micro_batches yields them (the last partial one is dropped).
        steps_per_epoch = max(1, len(self.train_enc) // global_batch)
        self.total_steps = cfg.max_steps or max(1, int(math.ceil(steps_per_epoch * cfg.epochs)))
        optim = OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio,
                            decay=cfg.decay, impl=cfg.optimizer)
        self.engine = Engine(model, ds, optim, total_steps=self.total_steps)
        self.model = self.engine.module
        self.cpu_accel = accelerate_cpu(self.model, trained=True, cpu_accel=cfg.cpu_accel, what="task model")
        self.steps_per_epoch = steps_per_epoch
        self.logger = RunLogger(self.out, is_main=self.engine.is_main)
        if self.engine.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.json")
        log.info("finetune %s: %d train features, %d steps (%d/epoch), global batch %d, device %s",
                 self.task.name, len(self.train_enc), self.total_steps, steps_per_epoch,
                 self.engine.train_batch_size, self.engine.device)

    # ------------------------------------------------------------------------------------
    def _micro_batches(self, epoch: int):
        """This rank's micro batches for one epoch: a seeded permutation, strided by rank."""
        eng = self.engine
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train_enc))
        gb = eng.micro_batch_size * eng.world_size
        for start in range(0, len(perm) - gb + 1 if len(perm) >= gb else 1, gb):
            chunk = perm[start: start + gb]
            mine = chunk[eng.rank * eng.micro_batch_size: (eng.rank + 1) * eng.micro_batch_size]
            if len(mine) == 0:
                mine = chunk[: eng.micro_batch_size]
            yield collate([self.train_enc[int(i)] for i in mine])

    def evaluate(self) -> Dict[str, Any]:
        metrics: Dict[str, float] = {}
        preds_by_split = {}
        for split, suffix, examples, enc in self.eval_enc:
            preds, extra = predict(self.engine, self.model, self.task, enc, self.cfg.eval_batch_size,
                                   self.engine.device, n_best_size=self.cfg.n_best_size,
                                   max_answer_length=self.cfg.max_answer_length)
            metrics.update(score_split(self.task, examples, preds, extra, suffix))
            preds_by_split[split] = preds
        return {"metrics": metrics, "predictions": preds_by_split}

    def main_score(self, metrics: Dict[str, float]) -> float:
        keys = [f"{self.task.main_metric}{s}" for s in self.task.eval_suffixes]
        vals = [metrics[k] for k in keys if k in metrics]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    def train(self) -> Dict[str, Any]:
        cfg, eng = self.cfg, self.engine
        meter = Throughput(eng.device, world_size=eng.world_size)
        best: Dict[str, Any] = {"score": -math.inf}
        history: List[Dict[str, Any]] = []
        epoch, done = 0, False
        t0 = time.time()
        running, n_loss = 0.0, 0

        def do_eval(tag: str) -> None:
            nonlocal best
            res = self.evaluate()
            score = self.main_score(res["metrics"])
            history.append({"step": eng.global_step, "epoch": epoch, **res["metrics"]})
            self.logger.log(eng.global_step, res["metrics"], prefix=f"eval/{self.task.name}")
            if score > best["score"] or best.get("metrics") is None:
                # Every rank keeps the best weights below ZeRO-3 (each predicts its shard of the
                # test set with them); under ZeRO-3 rank 0 keeps them and scatters them back.
                state = eng.consolidated_state_dict(all_ranks=eng.zero_stage < 3)
                # (already detached CPU copies: no second clone of the model)
                best = {"score": score, "metrics": res["metrics"], "step": eng.global_step, "epoch": epoch,
                        "state": state}

        bar = ProgressBar(self.total_steps, eng.is_main, desc=f"finetune {self.task.name}")
        while not done:
            it = self._micro_batches(epoch)
            while True:
                with meter.data_wait():
                    batch = next(it, None)
                if batch is None:
                    break
                n_samples, n_tokens = batch_size_of(batch), count_tokens(batch)   # host copy: no sync
                batch = to_device(batch, eng.device)
                out = eng(task=self.task.name, **forward_kwargs(self.model.forward, batch))
                if eng.backward(out.loss):
                    running += out.loss.detach().double()   # on the device; read at log steps
                    n_loss += 1
                stepped = eng.step()
                meter.step(n_samples, n_tokens)   # this rank's; sync_ranks sums all ranks' at log steps
                if stepped:
                    bar.update(1, loss=out.loss.detach())
                if stepped and eng.global_step % cfg.log_every == 0:
                    meter.sync_ranks(dist.all_reduce_sum)
                if stepped and eng.global_step % cfg.log_every == 0 and n_loss:
                    self.logger.log(eng.global_step,
                                    {"loss": float(running) / n_loss, "lr": eng.lr, **meter.summary()})
                    running, n_loss = 0.0, 0
                if stepped and cfg.eval_every and eng.global_step % cfg.eval_every == 0:
                    do_eval("step")
                if eng.global_step >= self.total_steps:
                    done = True
                    break
            epoch += 1
            if (not cfg.eval_every and cfg.eval_each_epoch) or done:
                if not history or history[-1]["step"] != eng.global_step:
                    do_eval("epoch")
            if epoch > 10_000:  # a guard against a zero-length epoch loop
                break

        bar.close()
        meter.sync_ranks(dist.all_reduce_sum)
        summary = meter.summary()
        result = {
            "task": self.task.name,
            "model": cfg.model,
            "lr": cfg.lr,
            "seed": cfg.seed,
            "train_examples": len(self.train_examples),
            "steps": eng.global_step,
            "best_step": best.get("step"),
            "metrics": best.get("metrics", {}),
            "main_metric": self.task.main_metric,
            "score": best["score"],
            "history": history,
            "throughput": {"train_samples_per_s": summary.get("samples_per_s"),
                           "train_tokens_per_s": summary.get("tokens_per_s"),
                           "peak_mem_mb": summary.get("peak_mem_mb"), "memory_kind": memory_kind(eng.device)},
            "cpu_accel": self.cpu_accel,
            "train_time_s": time.time() - t0,
        }
        if best.get("metrics") is not None:
            eng.load_full_state_dict(best.get("state"))   # all ranks: predictions use the best weights
        self._write_outputs(result, best.get("state"))
        return result

    def _write_outputs(self, result: Dict[str, Any], state: Optional[Dict[str, Any]] = None) -> None:
        cfg = self.cfg
        if cfg.write_submissions:
            subs = {}
            for split in self.task.test_splits:
                if not self.task.has_split(split):
                    continue
                ex = self.task.load(split)
                enc = encode_examples(self.task, ex, self.tokenizer, **self.enc_kw)
                preds, _ = predict(self.engine, self.model, self.task, enc, cfg.eval_batch_size,
                                   self.engine.device, n_best_size=cfg.n_best_size,
                                   max_answer_length=cfg.max_answer_length)
                if self.engine.is_main:
                    path = self.out / "submissions" / self.task.submission_name(split)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self.task.write_predictions(ex, preds, path)
                    subs[split] = str(path)
            result["submissions"] = subs
        if self.engine.is_main:
            if cfg.save_model:
                # The gathered weights: under ZeRO-3 the live module holds only partitions.
                save_task_model(self.model, self.tokenizer, self.out / "model",
                                extra={"task": self.task.name, "metrics": result["metrics"]}, state_dict=state)
            write_json(self.out / "results.json", result)
        dist.barrier()

    def cleanup(self) -> None:
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        if getattr(self, "engine", None) is not None:
            # toolkit eval runs many of these in one process: free each engine when its run ends.
            self.engine.close()
            self.engine = None

    def run(self) -> Dict[str, Any]:
        try:
            self.setup()
            return self.train()
        finally:
            self.cleanup()


def run_finetune(cfg: FinetuneConfig) -> Dict[str, Any]:
    return FinetuneRecipe(cfg).run()
