"""``toolkit finetune``: fine-tune an encoder on one task and score it on the dev split(s).

Engine settings (micro batch, accumulation, precision, ZeRO) come from the DeepSpeed JSON;
everything else from :class:`FinetuneConfig`. Used on its own and, in-process, by
``toolkit eval`` (one run per task x learning rate x seed).

Besides ``results.json`` and the best model, a run writes with the best weights:

* ``submissions/``: the leaderboard file of every test split that exists (``CoLA.tsv``,
  ``afqmc_predict.json``, ...), plus those of the task's companion tests (GLUE's ``AX.tsv``
  from the MNLI model);
* for span tasks, the dev predictions in the official evaluation scripts' formats:
  ``predictions.json`` ``{qid: answer}`` and, for SQuAD v2.0, ``na_prob.json``;
* the scores of labelled held-out splits that never select the model (FewCLUE's
  ``test_public``), as ``<metric>_test_public`` in ``metrics``.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from toolkit.config import arg, save_config, to_dict
from toolkit.engine import Engine, OptimConfig, dist
from toolkit.engine.signals import REQUEUE_EXIT_CODE, PreemptionHandler
from toolkit.errors import ConfigError, DataError
from toolkit.models.encoder import check_vocab
from toolkit.models.task_model import load_task_model, save_task_model
from toolkit.plan import preflight
from toolkit.recipes.common import (batch_size_of, check_ds_config, check_model_dir, count_tokens, forward_kwargs,
                                    resolve_ds_config, to_device, write_json)
from toolkit.recipes.predict import predict, score_split
from toolkit.tasks import get_task
from toolkit.tasks.base import SPAN
from toolkit.tasks.features import collate, encode_examples
from toolkit.utils.fsio import publish_dir, replacing
from toolkit.utils.lock import locked_output
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
    optim: OptimConfig = arg(help="AdamW and learning-rate schedule",
                             factory=lambda: OptimConfig(lr=2e-5, warmup_ratio=0.1))
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
    resume: bool = arg(True, "continue from output_dir/checkpoints when a stopped run of the same config left one")
    save_every: int = arg(0, "checkpoint every N steps (0 = only when a preemption signal stops the run)")
    keep_checkpoints: bool = arg(False, "keep output_dir/checkpoints after the run finished (they only serve a "
                                 "resume; an eval grid would otherwise keep one optimizer state per run)")
    stop_after: int = arg(0, "testing aid: stop (with a checkpoint) after N steps, as a preemption would")

    MOVED_FIELDS = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "warmup_ratio": "optim.warmup_ratio",
                    "decay": "optim.decay", "optimizer": "optim.impl"}
    #: Fields that change how a run is stopped and saved, not what it computes: a run may resume
    #: (and an eval grid may reuse a finished run) when only these differ.
    RUN_CONTROL = ("resume", "save_every", "keep_checkpoints", "stop_after")

    def __post_init__(self) -> None:
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("epochs", "set epochs > 0 or max_steps > 0")
        if self.max_seq_length < 8:
            raise ConfigError("max_seq_length", f"must be >= 8, got {self.max_seq_length}")
        if self.train_limit < 0:
            raise ConfigError("train_limit", "must be >= 0")
        if self.save_every < 0 or self.stop_after < 0:
            raise ConfigError("save_every", "save_every and stop_after must be >= 0")


class FinetuneRecipe:
    """One task, one learning rate, one seed. ``run()`` = setup + train + cleanup."""

    def __init__(self, cfg: FinetuneConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    # ------------------------------------------------------------------------------------
    def setup(self) -> None:
        cfg = self.cfg
        set_seed(cfg.seed)
        # Inputs checked before any model loads: the model folder, the task's data and the
        # DeepSpeed JSON, then the shapes and the batch against the ranks.
        check_model_dir("model", cfg.model)
        self.task = get_task(cfg.task, cfg.data_dir)
        train = self.task.load("train")
        if not train:
            raise DataError(self.task.split_path("train"), "the train split is empty")
        check_ds_config(cfg.ds_config)
        preflight("finetune", cfg)
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
        optim = cfg.optim
        self.engine = Engine(model, ds, optim, total_steps=self.total_steps)
        self.model = self.engine.module
        self.steps_per_epoch = steps_per_epoch
        dist.check_shared_folder(self.out)
        self._resume()
        self.logger = RunLogger(self.out, is_main=self.engine.is_main)
        if self.engine.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.json")
        log.info("finetune %s: %d train features, %d steps (%d/epoch), global batch %d, device %s",
                 self.task.name, len(self.train_enc), self.total_steps, steps_per_epoch,
                 self.engine.train_batch_size, self.engine.device)

    # ------------------------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def _same_config(self) -> bool:
        """The run folder was started with this config (so its checkpoint may be resumed)."""
        return same_run_config(self.out / "config.json", self.cfg)

    def _resume(self) -> None:
        """Training state: fresh, or restored from the newest checkpoint of a stopped run."""
        eng = self.engine
        # best: the best dev evaluation so far; its weights live apart (rank 0's copy is checkpointed).
        self.state: Dict[str, Any] = {"epoch": 0, "batch_in_epoch": 0, "micro_step": 0, "history": [],
                                      "best": {"score": -math.inf}, "running": 0.0, "n_loss": 0}
        self.best_state: Optional[Dict[str, Any]] = None
        if not self.cfg.resume or not dist.all_ranks(self.ckpt_dir.is_dir()):
            return
        if not dist.broadcast_object(self._same_config() if eng.is_main else None):
            log.warning("finetune %s: %s holds checkpoints of another config; starting over", self.task.name,
                        self.ckpt_dir)
            if eng.is_main:
                shutil.rmtree(self.ckpt_dir, ignore_errors=True)
            dist.barrier()
            return
        client = eng.load_checkpoint(self.ckpt_dir)
        if client is None:
            return
        self.state.update(client["state"])
        best_state = client.get("best_state")
        if eng.zero_stage < 3:
            # Below ZeRO-3 every rank predicts with the best weights: hand rank 0's copy to all.
            best_state = dist.broadcast_object(best_state)
        self.best_state = best_state
        log.info("finetune %s: resumed from step %d (epoch %d)", self.task.name, eng.global_step,
                 self.state["epoch"])

    def save_checkpoint(self) -> None:
        """Engine state plus the loop position, the eval history and the best weights so far (rank 0's)."""
        eng = self.engine
        client = {"state": dict(self.state)}
        if eng.is_main:
            client["best_state"] = self.best_state
        eng.save_checkpoint(self.ckpt_dir, f"step{eng.global_step}", client, keep_last=1)

    def _micro_batches(self, epoch: int, start_batch: int = 0):
        """This rank's micro batches for one epoch: a seeded permutation, strided by rank (from its
        ``start_batch``-th on, after a resume)."""
        eng = self.engine
        perm = np.random.default_rng([self.cfg.seed, epoch]).permutation(len(self.train_enc))
        gb = eng.micro_batch_size * eng.world_size
        starts = range(0, len(perm) - gb + 1 if len(perm) >= gb else 1, gb)
        for start in starts[start_batch:]:
            chunk = perm[start: start + gb]
            mine = chunk[eng.rank * eng.micro_batch_size: (eng.rank + 1) * eng.micro_batch_size]
            if len(mine) == 0:
                mine = chunk[: eng.micro_batch_size]
            yield collate([self.train_enc[int(i)] for i in mine])

    def evaluate(self) -> Dict[str, Any]:
        metrics: Dict[str, float] = {}
        preds_by_split, extras = {}, {}
        for split, suffix, examples, enc in self.eval_enc:
            preds, extra = predict(self.engine, self.model, self.task, enc, self.cfg.eval_batch_size,
                                   self.engine.device, n_best_size=self.cfg.n_best_size,
                                   max_answer_length=self.cfg.max_answer_length)
            metrics.update(score_split(self.task, examples, preds, extra, suffix))
            preds_by_split[split] = preds
            extras[split] = extra
        return {"metrics": metrics, "predictions": preds_by_split, "extras": extras}

    def main_score(self, metrics: Dict[str, float]) -> float:
        keys = [f"{self.task.main_metric}{s}" for s in self.task.eval_suffixes]
        vals = [metrics[k] for k in keys if k in metrics]
        return float(sum(vals) / len(vals)) if vals else float("nan")

    def train(self) -> Dict[str, Any]:
        cfg, eng, st = self.cfg, self.engine, self.state
        meter = Throughput(eng.device, world_size=eng.world_size)
        best: Dict[str, Any] = st["best"]
        history: List[Dict[str, Any]] = st["history"]
        done = eng.global_step >= self.total_steps
        t0 = time.time()

        def do_eval(tag: str) -> None:
            nonlocal best
            res = self.evaluate()
            score = self.main_score(res["metrics"])
            history.append({"step": eng.global_step, "epoch": st["epoch"], **res["metrics"]})
            self.logger.log(eng.global_step, res["metrics"], prefix=f"eval/{self.task.name}")
            if score > best["score"] or best.get("metrics") is None:
                # Every rank keeps the best weights below ZeRO-3 (each predicts its shard of the
                # test set with them); under ZeRO-3 rank 0 keeps them and scatters them back.
                # (already detached CPU copies: no second clone of the model)
                self.best_state = eng.consolidated_state_dict(all_ranks=eng.zero_stage < 3)
                best = {"score": score, "metrics": res["metrics"], "step": eng.global_step, "epoch": st["epoch"],
                        "predictions": res["predictions"], "extras": res["extras"]}
                st["best"] = {k: v for k, v in best.items() if k not in ("predictions", "extras")}

        bar = ProgressBar(self.total_steps, eng.is_main, initial=eng.global_step, desc=f"finetune {self.task.name}")
        with PreemptionHandler() as pre:
            while not done:
                it = self._micro_batches(st["epoch"], st["batch_in_epoch"])
                while not done:
                    with meter.data_wait():
                        batch = next(it, None)
                    if batch is None:
                        break
                    st["batch_in_epoch"] += 1
                    n_samples, n_tokens = batch_size_of(batch), count_tokens(batch)   # host copy: no sync
                    batch = to_device(batch, eng.device)
                    # Dropout depends only on (seed, micro step, rank): a resumed run draws the masks an
                    # uninterrupted one would.
                    torch.manual_seed(cfg.seed * 1_000_003 + st["micro_step"] * 1009 + eng.rank)
                    st["micro_step"] += 1
                    out = eng(task=self.task.name, **forward_kwargs(self.model.forward, batch))
                    if eng.backward(out.loss):
                        st["running"] += out.loss.detach().double()   # on the device; read at log steps
                        st["n_loss"] += 1
                    stepped = eng.step()
                    meter.step(n_samples, n_tokens)   # this rank's; sync_ranks sums all ranks' at log steps
                    done = eng.global_step >= self.total_steps
                    if not stepped:
                        continue
                    bar.update(1, loss=out.loss.detach())
                    if eng.global_step % cfg.log_every == 0:
                        meter.sync_ranks(dist.all_reduce_sum)
                        if st["n_loss"]:
                            self.logger.log(eng.global_step, {"loss": float(st["running"]) / st["n_loss"],
                                                              "lr": eng.lr, **meter.summary()})
                        st["running"], st["n_loss"] = 0.0, 0
                    if cfg.eval_every and eng.global_step % cfg.eval_every == 0:
                        do_eval("step")
                    if cfg.save_every and eng.global_step % cfg.save_every == 0 and not done:
                        self._checkpoint_now()
                    # All ranks agree, so they stop at one step with one checkpoint. After the last
                    # step only the final evaluation is left: the run finishes instead.
                    preempted = dist.any_rank(pre.requested) and not done
                    if preempted or (cfg.stop_after and eng.global_step >= cfg.stop_after and not done):
                        self._checkpoint_now()
                        log.warning("finetune %s: stopping at step %d with a checkpoint (%s)", self.task.name,
                                    eng.global_step, "preemption signal" if preempted else "stop_after")
                        bar.close()
                        if preempted:
                            raise SystemExit(REQUEUE_EXIT_CODE)
                        return {"stopped_at": eng.global_step}
                st["epoch"] += 1
                st["batch_in_epoch"] = 0
                if (not cfg.eval_every and cfg.eval_each_epoch) or done:
                    if not history or history[-1]["step"] != eng.global_step:
                        do_eval("epoch")
                if st["epoch"] > 10_000:  # a guard against a zero-length epoch loop
                    break

        bar.close()
        meter.sync_ranks(dist.all_reduce_sum)
        summary = meter.summary()
        result = {
            "task": self.task.name,
            "model": cfg.model,
            "lr": cfg.optim.lr,
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
            "train_time_s": time.time() - t0,
        }
        if best.get("metrics") is not None:
            eng.load_full_state_dict(self.best_state)   # all ranks: predictions use the best weights
            if "predictions" not in best:
                # The best evaluation happened before a resume: its predictions (deterministic, from
                # the same weights) are made again.
                res = self.evaluate()
                best = {**best, "predictions": res["predictions"], "extras": res["extras"]}
        self._write_outputs(result, self.best_state, best)
        if eng.is_main and not cfg.keep_checkpoints:
            shutil.rmtree(self.ckpt_dir, ignore_errors=True)
        dist.barrier()
        return result

    def _checkpoint_now(self) -> None:
        self.state["running"] = float(self.state["running"])   # a plain number in the checkpoint
        self.save_checkpoint()

    def _predict_split(self, examples: List[Any]) -> List[Any]:
        """Predictions of the current (best) weights with this task's head, in this task's
        label set, for examples of this task or of a companion test (all ranks)."""
        cfg = self.cfg
        enc = encode_examples(self.task, examples, self.tokenizer, **self.enc_kw)
        preds, _ = predict(self.engine, self.model, self.task, enc, cfg.eval_batch_size, self.engine.device,
                           n_best_size=cfg.n_best_size, max_answer_length=cfg.max_answer_length)
        return preds

    def _submission_sources(self) -> List[Any]:
        """``(task, split)`` pairs to predict for the leaderboard: this task's test splits that
        exist, then its companion tests' (GLUE's AX, predicted with the MNLI head)."""
        out = [(self.task, s) for s in self.task.test_splits if self.task.has_split(s)]
        for name in self.task.companion_tests:
            comp = get_task(name, self.cfg.data_dir)
            if list(comp.labels or []) != list(self.task.labels or []):
                raise ConfigError("task", f"task '{comp.name}' is predicted by '{self.task.name}' but their label "
                                  f"sets differ ({comp.labels} vs {self.task.labels})")
            found = [s for s in comp.test_splits if comp.has_split(s)]
            if not found:
                log.warning("%s: no %s test file under %s; %s is not written", self.task.name, comp.name,
                            comp.data_dir, comp.submission_name())
            out += [(comp, s) for s in found]
        return out

    def _write_dev_predictions(self, best: Dict[str, Any]) -> Dict[str, str]:
        """Span tasks: the dev predictions in the official scripts' formats (main rank)."""
        if self.task.task_type != SPAN or not best.get("predictions"):
            return {}
        from toolkit.tasks.squad import NA_PROB_FILE, PREDICTIONS_FILE, na_probabilities

        files: Dict[str, str] = {}
        single = len(self.eval_sets) == 1
        for split, _, examples in self.eval_sets:
            tag = "" if single else f"_{split}"
            path = self.out / PREDICTIONS_FILE.replace(".json", f"{tag}.json")
            with replacing(path) as tmp:
                self.task.write_predictions(examples, best["predictions"][split], tmp)
            files[f"predictions{tag}"] = str(path)
            odds = best.get("extras", {}).get(split, {}).get("null_odds")
            if odds is not None and getattr(self.task, "version_2_with_negative", False):
                na_path = self.out / NA_PROB_FILE.replace(".json", f"{tag}.json")
                with replacing(na_path) as tmp:
                    self.task.write_na_probs(examples, na_probabilities(odds), tmp)
                files[f"na_prob{tag}"] = str(na_path)
        return files

    def _write_outputs(self, result: Dict[str, Any], state: Optional[Dict[str, Any]] = None,
                       best: Optional[Dict[str, Any]] = None) -> None:
        cfg = self.cfg
        # Held-out labelled splits, scored once with the selected weights (all ranks predict).
        result["metrics"] = dict(result["metrics"])
        for split, suffix in self.task.report_splits:
            if self.task.has_split(split):
                ex = self.task.load(split)
                preds = self._predict_split(ex)
                result["metrics"].update({f"{k}{suffix}": float(v) for k, v in self.task.score(ex, preds).items()})
        if self.engine.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            result["prediction_files"] = self._write_dev_predictions(best or {})
        if cfg.write_submissions:
            # Every rank predicts; rank 0 writes the folder, which appears whole.
            predicted = [(task, split, ex, self._predict_split(ex))
                         for task, split in self._submission_sources() for ex in [task.load(split)]]
            subs = {}
            if self.engine.is_main and predicted:
                folder = self.out / "submissions"
                with publish_dir(folder, kind="submissions", marker=False) as tmp:
                    for task, split, ex, preds in predicted:
                        task.write_predictions(ex, preds, tmp / task.submission_name(split))
                for task, split, _, _ in predicted:
                    key = split if task is self.task else f"{task.name}/{split}"
                    subs[key] = {"path": str(folder / task.submission_name(split)), "benchmark": task.benchmark,
                                 "task": task.name}
            result["submissions"] = subs
        if self.engine.is_main:
            if cfg.save_model:
                # The gathered weights: under ZeRO-3 the live module holds only partitions.
                with publish_dir(self.out / "model", kind="task_model", meta={"task": self.task.name}) as tmp:
                    save_task_model(self.model, self.tokenizer, tmp,
                                    extra={"task": self.task.name, "metrics": result["metrics"]}, state_dict=state)
            write_json(self.out / "results.json", result)   # last: the record of a finished run
        dist.barrier()

    def cleanup(self) -> None:
        if getattr(self, "logger", None) is not None:
            self.logger.close()
        if getattr(self, "engine", None) is not None:
            # toolkit eval runs many of these in one process: free each engine when its run ends.
            self.engine.close()
            self.engine = None

    def run(self) -> Dict[str, Any]:
        with locked_output(self.out, "finetune", is_main=dist.rank() == 0):
            try:
                self.setup()
                return self.train()
            finally:
                self.cleanup()


def same_run_config(saved_file: Path, cfg: FinetuneConfig) -> bool:
    """``saved_file`` (a run's config.json) holds ``cfg``, up to :attr:`FinetuneConfig.RUN_CONTROL`."""
    try:
        saved = json.loads(Path(saved_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    now = json.loads(json.dumps(to_dict(cfg)))
    if not isinstance(saved, dict):
        return False
    for key in FinetuneConfig.RUN_CONTROL:
        saved.pop(key, None)
        now.pop(key, None)
    return saved == now


def run_finetune(cfg: FinetuneConfig) -> Dict[str, Any]:
    return FinetuneRecipe(cfg).run()
