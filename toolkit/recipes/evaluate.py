"""``toolkit eval``: fine-tune an encoder on every task of a suite and report dev scores.

For each task, every (learning rate, seed) of the grid is one in-process fine-tuning run
(:class:`~toolkit.recipes.finetune.FinetuneRecipe`). As the papers do, the reported number per
task is the best learning rate's dev score; the mean and spread over seeds at that learning
rate are reported next to it. Writes ``results.json``, ``results.md`` and, for tasks whose
test split exists, the leaderboard submission files of the best run.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from toolkit.config import arg, cpu_accel_arg, normalize_cpu_accel, save_config
from toolkit.engine import dist
from toolkit.engine.engine import OPTIMIZER_HELP, check_optimizer_impl
from toolkit.errors import ConfigError
from toolkit.recipes.common import mean_std, task_ref, write_json
from toolkit.recipes.finetune import FinetuneConfig, FinetuneRecipe
from toolkit.tasks import resolve_tasks
from toolkit.utils.logging import get_logger

log = get_logger(__name__)


@dataclass
class EvalConfig:
    model: str = arg(help="encoder directory to evaluate (a distilled student, a teacher, any BERT/ERNIE)")
    tasks: List[str] = arg(help="task names, groups (glue, clue, fewclue) or custom task YAML paths", factory=list)
    data_dir: Optional[str] = arg(None, "data root holding the official task folders")
    output_dir: str = arg("runs/eval", "where results.json, results.md, per-run folders and submissions go")
    ds_config: str = arg("auto", "DeepSpeed JSON for the fine-tuning runs; "
                         "auto = zero2_bf16.json on GPUs, cpu_fp32.json on CPUs")
    lrs: List[float] = arg(help="learning-rate grid; the best per task is reported", factory=lambda: [2e-5])
    seeds: List[int] = arg(help="seeds per learning rate; mean and std are reported", factory=lambda: [42])
    epochs: float = arg(3.0, "epochs per fine-tuning run")
    max_steps: int = arg(0, "optimizer steps per run; 0 = derive from epochs")
    max_seq_length: int = arg(128, "tokens per sequence")
    warmup_ratio: float = arg(0.1, "warmup fraction")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    optimizer: str = arg("auto", "AdamW implementation: " + OPTIMIZER_HELP)
    train_limit: int = arg(0, "cut each train split to N examples (low-resource setting); 0 = all")
    eval_each_epoch: bool = arg(True, "score dev after every epoch and report the best epoch (false: last only)")
    eval_batch_size: int = arg(64, "prediction batch size")
    save_models: bool = arg(False, "keep each run's fine-tuned model (large); the best run's results are always kept")
    write_submissions: bool = arg(True, "write leaderboard submission files for test splits that exist")
    cpu_accel: str = cpu_accel_arg()

    def __post_init__(self) -> None:
        self.cpu_accel = normalize_cpu_accel(self.cpu_accel)
        check_optimizer_impl(self.optimizer, "optimizer")
        if not self.tasks:
            raise ConfigError("tasks", "give at least one task (e.g. --tasks glue)")
        if not self.lrs:
            raise ConfigError("lrs", "give at least one learning rate")
        if not self.seeds:
            raise ConfigError("seeds", "give at least one seed")


def _fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


class EvalRecipe:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    def run(self) -> Dict[str, Any]:
        cfg = self.cfg
        tasks = resolve_tasks(cfg.tasks, cfg.data_dir)
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.json")
        summary: Dict[str, Any] = {"model": cfg.model, "tasks": {}}
        for task in tasks:
            runs: List[Dict[str, Any]] = []
            for lr in cfg.lrs:
                for seed in cfg.seeds:
                    run_dir = self.out / task.name / f"lr{_fmt_lr(lr)}_seed{seed}"
                    fcfg = FinetuneConfig(
                        model=cfg.model, task=task_ref(task),
                        data_dir=cfg.data_dir, output_dir=str(run_dir), ds_config=cfg.ds_config,
                        epochs=cfg.epochs, max_steps=cfg.max_steps, lr=lr, seed=seed,
                        max_seq_length=cfg.max_seq_length, warmup_ratio=cfg.warmup_ratio,
                        weight_decay=cfg.weight_decay, optimizer=cfg.optimizer, train_limit=cfg.train_limit,
                        eval_each_epoch=cfg.eval_each_epoch,
                        eval_batch_size=cfg.eval_batch_size, save_model=cfg.save_models,
                        write_submissions=cfg.write_submissions, cpu_accel=cfg.cpu_accel)
                    log.info("eval: %s lr=%g seed=%d", task.name, lr, seed)
                    res = FinetuneRecipe(fcfg).run()
                    res["run_dir"] = str(run_dir)
                    runs.append(res)
            summary["tasks"][task.name] = self._summarize_task(task, runs)
        scores = [t["best"]["score"] for t in summary["tasks"].values()]
        summary["average"] = sum(scores) / len(scores) if scores else float("nan")
        if dist.is_main():
            self._copy_submissions(summary)
            write_json(self.out / "results.json", summary)
            (self.out / "results.md").write_text(render_table(summary), encoding="utf-8")
        dist.barrier()
        return summary

    def _summarize_task(self, task: Any, runs: List[Dict[str, Any]]) -> Dict[str, Any]:
        per_lr: Dict[str, Any] = {}
        for lr in self.cfg.lrs:
            scores = [r["score"] for r in runs if r["lr"] == lr]
            m, s = mean_std(scores)
            per_lr[_fmt_lr(lr)] = {"mean": m, "std": s, "scores": scores}
        best_lr = max(per_lr, key=lambda k: per_lr[k]["mean"])
        best_run = max((r for r in runs if _fmt_lr(r["lr"]) == best_lr), key=lambda r: r["score"])
        return {
            "main_metric": task.main_metric,
            "language": task.language,
            "best": {"lr": best_run["lr"], "seed": best_run["seed"], "score": per_lr[best_lr]["mean"],
                     "std": per_lr[best_lr]["std"], "metrics": best_run["metrics"],
                     "run_dir": best_run["run_dir"], "submissions": best_run.get("submissions", {})},
            "per_lr": per_lr,
            "throughput": best_run.get("throughput", {}),
            "runs": [{k: r[k] for k in ("lr", "seed", "score", "metrics", "steps", "run_dir")} for r in runs],
        }

    def _copy_submissions(self, summary: Dict[str, Any]) -> None:
        dest = self.out / "submissions"
        for t in summary["tasks"].values():
            for path in t["best"].get("submissions", {}).values():
                dest.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest / Path(path).name)


def render_table(summary: Dict[str, Any]) -> str:
    """Markdown table: one row per task with its main metric (best lr, mean ± std over seeds)."""
    lines = [f"# Evaluation of `{summary['model']}`", "",
             "| task | metric | score (mean ± std over seeds, best lr) | best lr | all metrics of the best run |",
             "|---|---|---|---|---|"]
    for name, t in summary["tasks"].items():
        b = t["best"]
        allm = ", ".join(f"{k} {v:.2f}" for k, v in b["metrics"].items())
        lines.append(f"| {name} | {t['main_metric']} | {b['score']:.2f} ± {b['std']:.2f} | {b['lr']:g} | {allm} |")
    lines.append(f"| **average** | | **{summary['average']:.2f}** | | |")
    return "\n".join(lines) + "\n"


def run_eval(cfg: EvalConfig) -> Dict[str, Any]:
    return EvalRecipe(cfg).run()
