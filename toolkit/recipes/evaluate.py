"""``toolkit eval``: fine-tune an encoder on every task of a suite and report dev scores.

For each task, every (learning rate, seed) of the grid is one in-process fine-tuning run
(:class:`~toolkit.recipes.finetune.FinetuneRecipe`). As the papers do, the reported number per
task is the best learning rate's dev score; the mean and spread over seeds at that learning
rate are reported next to it, for the main metric and for each secondary one.

Writes to ``output_dir``:

* ``results.json`` and ``results.md`` (the table also printed at the end: one row per task,
  columns the main metric and each secondary metric, mean ± std over seeds);
* ``submissions/<benchmark>/`` and ``submissions/<benchmark>.zip`` for ``glue``, ``clue`` and
  ``fewclue``: the best run's test predictions under the leaderboard's file names, the zip
  holding the files at its top level as the leaderboards take it (GLUE's includes ``AX.tsv``,
  predicted by the MNLI model; GLUE refuses a zip without all eleven files, so missing ones
  are listed in ``results.json`` and logged). Other tasks' files go to ``submissions/other/``;
* ``predictions/<task>/``: span tasks' best-run dev predictions in the official scripts'
  formats (``predictions.json``, SQuAD v2.0's ``na_prob.json``).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from toolkit.config import arg, save_config
from toolkit.engine import dist
from toolkit.engine.engine import OptimConfig
from toolkit.errors import ConfigError
from toolkit.plan import preflight
from toolkit.recipes.common import check_ds_config, check_model_dir, mean_std, task_ref, write_json
from toolkit.recipes.finetune import FinetuneConfig, FinetuneRecipe, same_run_config
from toolkit.tasks import get_task, group_names, resolve_tasks
from toolkit.tasks.base import Task
from toolkit.utils.fsio import publish_dir, replacing, write_text_atomic
from toolkit.utils.lock import locked_output
from toolkit.utils.logging import get_logger

log = get_logger(__name__)

#: Benchmarks whose files are bundled into one folder and one zip.
BENCHMARKS = ("glue", "clue", "fewclue")
#: Benchmarks whose server refuses a submission that lacks any task's file.
COMPLETE_ONLY = ("glue",)


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
    optim: OptimConfig = arg(help="AdamW and learning-rate schedule of every run (optim.lr is replaced by each "
                             "value of lrs)", factory=lambda: OptimConfig(lr=2e-5, warmup_ratio=0.1))
    train_limit: int = arg(0, "cut each train split to N examples (low-resource setting); 0 = all")
    eval_each_epoch: bool = arg(True, "score dev after every epoch and report the best epoch (false: last only)")
    eval_batch_size: int = arg(64, "prediction batch size")
    save_models: bool = arg(False, "keep each run's fine-tuned model (large); the best run's results are always kept")
    write_submissions: bool = arg(True, "write leaderboard submission files (one folder and one zip per benchmark) "
                                  "for test splits that exist")

    MOVED_FIELDS = {"weight_decay": "optim.weight_decay", "warmup_ratio": "optim.warmup_ratio",
                    "optimizer": "optim.impl", "lr": "lrs"}

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks", "give at least one task (e.g. --tasks glue)")
        if not self.lrs:
            raise ConfigError("lrs", "give at least one learning rate")
        if any(lr <= 0 for lr in self.lrs):
            raise ConfigError("lrs", f"learning rates must be > 0, got {self.lrs}")
        if not self.seeds:
            raise ConfigError("seeds", "give at least one seed")


def finished_run(run_dir: Path, cfg: FinetuneConfig) -> Optional[Dict[str, Any]]:
    """The results of a grid run that already finished with this very config, else None.

    A requeued ``toolkit eval`` skips those runs; the run that was stopped resumes from its
    checkpoint (:class:`FinetuneRecipe` does that), the rest start.
    """
    try:
        res = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(res, dict) or "score" not in res or not same_run_config(run_dir / "config.json", cfg):
        return None
    return res


def _fmt_lr(lr: float) -> str:
    return f"{lr:.0e}".replace("e-0", "e-")


def metric_columns(task: Task) -> List[str]:
    """The task's secondary metric keys, in order: every official metric on every eval split
    (MNLI: ``accuracy_m``, ``accuracy_mm``) and on its report splits, minus the main metric."""
    keys = [f"{m}{suf}" for suf in task.eval_suffixes for m in task.metrics]
    keys += [f"{m}{suf}" for _, suf in task.report_splits for m in task.metrics]
    if len(task.eval_suffixes) <= 1:
        keys = [k for k in keys if k != f"{task.main_metric}{task.eval_suffixes[0] if task.eval_suffixes else ''}"]
    return list(dict.fromkeys(keys))


class EvalRecipe:
    def __init__(self, cfg: EvalConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    def _tasks(self) -> List[Task]:
        """The tasks to fine-tune. A test-only task predicted by another task's model (AX by
        MNLI) is dropped here: that task's runs write its file."""
        tasks = resolve_tasks(self.cfg.tasks, self.cfg.data_dir)
        names = {t.name for t in tasks}
        out = []
        for t in tasks:
            if t.predicted_by:
                if t.predicted_by not in names:
                    raise ConfigError("tasks", f"task '{t.name}' has no training data: its test set is predicted by "
                                      f"the fine-tuned '{t.predicted_by}' model; add '{t.predicted_by}' to tasks")
                log.info("eval: %s is predicted by the %s runs", t.name, t.predicted_by)
                continue
            out.append(t)
        return out

    def run(self) -> Dict[str, Any]:
        with locked_output(self.out, "eval", is_main=dist.rank() == 0):
            return self._run()

    def _run(self) -> Dict[str, Any]:
        cfg = self.cfg
        check_model_dir("model", cfg.model)
        check_ds_config(cfg.ds_config)
        tasks = self._tasks()
        preflight("eval", cfg)   # shapes and the batch, before any model is loaded
        for task in tasks:   # every train split read (and checked) before the first run starts
            task.load("train")
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.json")
        summary: Dict[str, Any] = {"model": cfg.model, "seeds": list(cfg.seeds), "tasks": {}}
        for task in tasks:
            runs: List[Dict[str, Any]] = []
            for lr in cfg.lrs:
                for seed in cfg.seeds:
                    run_dir = self.out / task.name / f"lr{_fmt_lr(lr)}_seed{seed}"
                    fcfg = FinetuneConfig(
                        model=cfg.model, task=task_ref(task),
                        data_dir=cfg.data_dir, output_dir=str(run_dir), ds_config=cfg.ds_config,
                        epochs=cfg.epochs, max_steps=cfg.max_steps, optim=dataclasses.replace(cfg.optim, lr=lr),
                        seed=seed, max_seq_length=cfg.max_seq_length, train_limit=cfg.train_limit,
                        eval_each_epoch=cfg.eval_each_epoch,
                        eval_batch_size=cfg.eval_batch_size, save_model=cfg.save_models,
                        write_submissions=cfg.write_submissions)
                    res = finished_run(run_dir, fcfg)
                    if res is not None:
                        log.info("eval: %s lr=%g seed=%d finished before (%s); skipped", task.name, lr, seed,
                                 run_dir / "results.json")
                    else:
                        log.info("eval: %s lr=%g seed=%d", task.name, lr, seed)
                        # A run stopped by a preemption signal resumes from its checkpoint; the signal
                        # stops this job too (SystemExit with the requeue code).
                        res = FinetuneRecipe(fcfg).run()
                    res["run_dir"] = str(run_dir)
                    runs.append(res)
            summary["tasks"][task.name] = self._summarize_task(task, runs)
        scores = [t["best"]["score"] for t in summary["tasks"].values()]
        summary["average"] = sum(scores) / len(scores) if scores else float("nan")
        if dist.is_main():
            summary["submissions"] = self._bundle_submissions(summary) if cfg.write_submissions else {}
            summary["prediction_files"] = self._copy_dev_predictions(summary)
            table = render_table(summary)
            write_text_atomic(self.out / "results.md", table)
            write_json(self.out / "results.json", summary)   # last: the record of a finished run
            sys.stdout.write("\n" + table)
            sys.stdout.flush()
        dist.barrier()
        return summary

    def _summarize_task(self, task: Task, runs: List[Dict[str, Any]]) -> Dict[str, Any]:
        per_lr: Dict[str, Any] = {}
        for lr in self.cfg.lrs:
            scores = [r["score"] for r in runs if r["lr"] == lr]
            m, s = mean_std(scores)
            per_lr[_fmt_lr(lr)] = {"mean": m, "std": s, "scores": scores}
        best_lr = max(per_lr, key=lambda k: per_lr[k]["mean"])
        at_best = [r for r in runs if _fmt_lr(r["lr"]) == best_lr]
        best_run = max(at_best, key=lambda r: r["score"])
        # Every metric's mean and std over the seeds of the best learning rate.
        keys = list(dict.fromkeys(k for r in at_best for k in r["metrics"]))
        spread = {k: mean_std([r["metrics"][k] for r in at_best if k in r["metrics"]]) for k in keys}
        return {
            "main_metric": task.main_metric,
            "language": task.language,
            "benchmark": task.benchmark,
            "columns": metric_columns(task),
            "best": {"lr": best_run["lr"], "seed": best_run["seed"], "score": per_lr[best_lr]["mean"],
                     "std": per_lr[best_lr]["std"], "metrics": best_run["metrics"],
                     "metrics_mean": {k: v[0] for k, v in spread.items()},
                     "metrics_std": {k: v[1] for k, v in spread.items()},
                     "run_dir": best_run["run_dir"], "submissions": best_run.get("submissions", {}),
                     "prediction_files": best_run.get("prediction_files", {})},
            "per_lr": per_lr,
            "throughput": best_run.get("throughput", {}),
            "runs": [{k: r[k] for k in ("lr", "seed", "score", "metrics", "steps", "run_dir")} for r in runs],
        }

    def _bundle_submissions(self, summary: Dict[str, Any]) -> Dict[str, Any]:
        """One folder and one zip per benchmark from the best runs' submission files."""
        root = self.out / "submissions"
        by_bench: Dict[str, List[Path]] = {}
        for t in summary["tasks"].values():
            for entry in t["best"].get("submissions", {}).values():
                bench = entry["benchmark"] if entry["benchmark"] in BENCHMARKS else "other"
                by_bench.setdefault(bench, []).append(Path(entry["path"]))
        out: Dict[str, Any] = {}
        for bench, files in by_bench.items():
            folder = root / bench
            # Replaced whole: a re-run must not ship a stale file of a task it dropped.
            with publish_dir(folder, kind="submissions", marker=False) as tmp:
                for f in files:
                    shutil.copy2(f, tmp / f.name)
            names = sorted(f.name for f in files)
            info: Dict[str, Any] = {"dir": str(folder), "files": names}
            if bench in BENCHMARKS:
                info["zip"] = str(write_zip(folder, names, root / f"{bench}.zip"))
                missing = sorted(set(expected_submissions(bench, self.cfg.data_dir)) - set(names))
                info["missing"] = missing
                if missing and bench in COMPLETE_ONLY:
                    log.warning("eval: the %s submission lacks %s; its server refuses an incomplete zip",
                                bench.upper(), ", ".join(missing))
                elif missing:
                    log.info("eval: the %s submission has no %s", bench.upper(), ", ".join(missing))
            out[bench] = info
        return out

    def _copy_dev_predictions(self, summary: Dict[str, Any]) -> Dict[str, Dict[str, str]]:
        """Span tasks' best-run dev predictions (official formats) under ``predictions/<task>/``."""
        out: Dict[str, Dict[str, str]] = {}
        for name, t in summary["tasks"].items():
            files = t["best"].get("prediction_files") or {}
            if not files:
                continue
            dest = self.out / "predictions" / name
            with publish_dir(dest, kind="predictions", marker=False) as tmp:
                for path in files.values():
                    shutil.copy2(path, tmp / Path(path).name)
            out[name] = {key: str(dest / Path(path).name) for key, path in files.items()}
        return out


def write_zip(folder: Path, names: Sequence[str], path: Path) -> Path:
    """Zip ``names`` from ``folder`` at the archive's top level (no folder inside), atomically."""
    with replacing(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as z:
            for n in names:
                z.write(folder / n, arcname=n)
    return path


def expected_submissions(benchmark: str, data_dir: Optional[str] = None) -> List[str]:
    """Every file a complete submission to ``benchmark`` holds (its group's test splits and
    their companions: GLUE's eleven ``.tsv`` files)."""
    names: List[str] = []
    for member in group_names().get(benchmark, []):
        task = get_task(member, data_dir)
        names += [task.submission_name(s) for s in task.test_splits]
        for comp in task.companion_tests:
            ct = get_task(comp, data_dir)
            names += [ct.submission_name(s) for s in ct.test_splits]
    return list(dict.fromkeys(names))


def _cell(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None or mean != mean:  # None or nan
        return ""
    return f"{mean:.2f} ± {(std or 0.0):.2f}"


def render_table(summary: Dict[str, Any]) -> str:
    """Markdown: one row per task; the main metric, then each secondary metric (the union over
    tasks, blank where a task has none), all as mean ± std over seeds at the best lr."""
    tasks = summary["tasks"]
    columns = list(dict.fromkeys(c for t in tasks.values() for c in t.get("columns", [])))
    n_seeds = len(summary.get("seeds") or []) or 1
    head = ["task", "main metric", "score"] + columns + ["best lr"]
    lines = [f"# Evaluation of `{summary['model']}`", "",
             f"mean ± std over {n_seeds} seed{'s' if n_seeds != 1 else ''} at each task's best learning rate", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in tasks.items():
        b = t["best"]
        means, stds = b.get("metrics_mean", {}), b.get("metrics_std", {})
        cells = [name, t["main_metric"], _cell(b["score"], b["std"])]
        cells += [_cell(means.get(c), stds.get(c)) if c in t.get("columns", []) else "" for c in columns]
        cells.append(f"{b['lr']:g}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| **average** | | **" + f"{summary['average']:.2f}" + "** |" + " |" * (len(columns) + 1))
    return "\n".join(lines) + "\n"


def run_eval(cfg: EvalConfig) -> Dict[str, Any]:
    return EvalRecipe(cfg).run()
