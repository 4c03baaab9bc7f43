"""The job table: job name -> (config dataclass, recipe entry point).

Shared by the Click CLI and the ``launchers/`` scripts so both run exactly the same recipe.
Recipe modules are imported lazily: ``toolkit --help`` must not import torch.
"""
from __future__ import annotations

import contextlib
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence


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
    "probe": Job("probe", "toolkit.recipes.probe", "ProbeConfig", "run_probe",
                 "linear probes of frozen encoders on tasks: how general are their features"),
    "pipeline": Job("pipeline", "toolkit.recipes.pipeline", "PipelineConfig", "run_pipeline",
                    "the whole MITKD pipeline: teacher -> distillation -> evaluation and report"),
}


def resolve_config_path(path: Optional[str]) -> Optional[Path]:
    """A job YAML: the path as given, else a shipped example by name
    (``distill_bert_large.yaml`` or ``distill_bert_large``) from any folder."""
    from toolkit.errors import ConfigError
    from toolkit.resources import config_dir, find_shipped, shipped_names

    if path is None:
        return None
    found = find_shipped(path, config_dir(), ".yaml")
    if found is None:
        names = ", ".join(shipped_names(config_dir(), "*.yaml")) or "none"
        raise ConfigError("config", f"file not found: {path} (a path, or a shipped example: {names})")
    return found


def build_config(job: str, config_path: Optional[str], overrides: Sequence[str] = (),
                 base: Optional[Dict[str, Any]] = None, options: Optional[Dict[str, Any]] = None) -> Any:
    """The job's typed config: ``base`` < the YAML < ``options`` < ``key=value`` overrides.

    ``options`` are dotted field names with values already typed (command-line options, taken
    as given); override values keep their text for typed fields (``teacher=0755`` is the path).
    """
    from toolkit.config import load_config

    cfg_cls, _ = JOBS[job].load()
    return load_config(cfg_cls, resolve_config_path(config_path), overrides, base=base, options=options)


@contextlib.contextmanager
def with_config_file(config_file: Optional[str]) -> Iterator[None]:
    """Errors about a job field raised inside name ``config_file`` (the job YAML) when they
    name no file of their own (the recipes' checks see the config, not the file it came from)."""
    from toolkit.errors import ConfigError

    try:
        yield
    except ConfigError as e:
        if e.source is not None or not config_file:
            raise
        message = str(e).split(f"config field '{e.field}': ", 1)[-1]
        raise ConfigError(e.field, message, config_file) from None


def run_job(job: str, cfg: Any, config_file: Optional[str] = None) -> Any:
    """Run ``job``'s recipe on ``cfg``; ``config_file`` (the job YAML) is named in its config errors."""
    _, runner = JOBS[job].load()
    with with_config_file(config_file):
        return runner(cfg)


def launcher_main(job: str, argv: Optional[List[str]] = None) -> None:
    """Entry of ``deepspeed launchers/<job>.py --ds_config X.json --config job.yaml [key=value ...]``.

    The deepspeed launcher appends ``--local_rank=N``; rank and world size come from the
    environment it sets. The DS JSON given here overrides ``ds_config`` in the YAML.
    """
    import argparse

    from toolkit.errors import ToolkitError

    p = argparse.ArgumentParser(prog=f"launchers/{job}.py", description=JOBS[job].summary)
    p.add_argument("--config", help="job YAML: a path, or a shipped example by name (see configs/)")
    p.add_argument("--ds_config", "--deepspeed_config", dest="ds_config",
                   help="DeepSpeed JSON: the engine settings; a path, or a shipped name (see ds_configs/)")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the job YAML")
    args = p.parse_args(argv)
    from toolkit.engine import dist
    from toolkit.engine.signals import PreemptionHandler

    # Caught from here on for the whole process (the recipe's own handler nests inside): a signal
    # during start-up is remembered, and one during the final teardown cannot kill the rank.
    with PreemptionHandler():
        code = 0
        try:
            cfg = build_config(job, args.config, list(args.overrides),
                               options={"ds_config": args.ds_config} if args.ds_config else None)
            run_job(job, cfg, config_file=args.config)
        except ToolkitError as e:
            print(f"error: {e}", file=sys.stderr)
            code = 2
        except SystemExit as e:  # a recipe asking to be requeued after a preemption signal
            code = e.code if isinstance(e.code, int) else 1
        # Tear the process group down and leave with os._exit: on CPU/gloo, rank 1 otherwise
        # aborts in interpreter shutdown ("terminate called without an active exception").
        dist.finalize_and_exit(code)
