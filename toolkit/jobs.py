"""The job table: job name -> (config dataclass, recipe entry point).

Shared by the Click CLI and the ``launchers/`` scripts so both run exactly the same recipe.
Recipe modules are imported lazily: ``toolkit --help`` must not import torch.
"""
from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence


@dataclass(frozen=True)
class Job:
    name: str
    module: str
    config_class: str
    runner: str
    summary: str

    def load(self) -> tuple:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config_class), getattr(mod, self.runner)


JOBS: Dict[str, Job] = {
    "teacher": Job("teacher", "toolkit.recipes.teacher", "TeacherConfig", "run_teacher",
                   "MITKD step 1: multi-task fine-tuning of the teacher (DeepSpeed ZeRO)"),
    "distill": Job("distill", "toolkit.recipes.distill", "DistillConfig", "run_distill",
                   "MITKD step 2: streaming task-agnostic MiniLMv2 distillation into a student"),
    "finetune": Job("finetune", "toolkit.recipes.finetune", "FinetuneConfig", "run_finetune",
                    "fine-tune an encoder on one task and score it on dev"),
    "eval": Job("eval", "toolkit.recipes.evaluate", "EvalConfig", "run_eval",
                "fine-tune and score an encoder on a benchmark suite (GLUE, CLUE, custom)"),
    "pipeline": Job("pipeline", "toolkit.recipes.pipeline", "PipelineConfig", "run_pipeline",
                    "the whole MITKD pipeline: teacher -> distillation -> evaluation and report"),
}


def build_config(job: str, config_path: Optional[str], overrides: Sequence[str],
                 base: Optional[Dict[str, Any]] = None) -> Any:
    from toolkit.config import load_config

    cfg_cls, _ = JOBS[job].load()
    return load_config(cfg_cls, config_path, overrides, base=base)


def run_job(job: str, cfg: Any) -> Any:
    _, runner = JOBS[job].load()
    return runner(cfg)


def launcher_main(job: str, argv: Optional[List[str]] = None) -> None:
    """Entry of ``deepspeed launchers/<job>.py --ds_config X.json --config job.yaml [key=value ...]``.

    The deepspeed launcher appends ``--local_rank=N``; rank and world size come from the
    environment it sets. The DS JSON given here overrides ``ds_config`` in the YAML.
    """
    import argparse

    from toolkit.errors import ToolkitError

    p = argparse.ArgumentParser(prog=f"launchers/{job}.py", description=JOBS[job].summary)
    p.add_argument("--config", help="job YAML (see configs/)")
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config",
                   help="DeepSpeed JSON: the engine settings (see ds_configs/)")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the job YAML")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    if args.ds_config:
        overrides.append(f"ds_config={args.ds_config}")
    code = 0
    try:
        cfg = build_config(job, args.config, overrides)
        run_job(job, cfg)
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except SystemExit as e:  # a recipe asking to be requeued after a preemption signal
        code = e.code if isinstance(e.code, int) else 1
    # Tear the process group down and leave with os._exit: on CPU/gloo, rank 1 otherwise
    # aborts in interpreter shutdown ("terminate called without an active exception").
    from toolkit.engine import dist

    dist.finalize_and_exit(code)
