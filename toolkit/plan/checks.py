"""The checks of a job before anything is built, and the facts its plan is made from.

:func:`inspect_job` reads the job's DeepSpeed JSON (every key, type and the batch over the
ranks) and the ``config.json`` of every model directory it names, builds the shapes at full
size on the meta device, and checks what the recipe would otherwise find only after loading
the models: relation heads against both hidden sizes, teacher and student layer ranges,
teacher/student vocabulary agreement, sequence lengths against the position embeddings,
tokenizer length against the embedding rows, task names. Each failure is one
:class:`~toolkit.errors.ConfigError` naming the field and the file.

Data (corpus shards, task train splits) is checked too. ``planning=True`` (the plan, made ahead
on a login node that may not see the data) turns a missing file into a warning, and lets a
model field name a shipped reference config (``teacher=bert-large-uncased``, configs/models/).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from toolkit.errors import ConfigError, DataError, ToolkitError
from toolkit.plan.shapes import ModelShape, shape_from_config, shape_from_dir

#: Losses that read only the Q/K/V projections of the distilled layers (the recipe's set).
QKV_ONLY_LOSSES = frozenset({"minilmv2", "minilm_v1"})


@dataclass
class TrainedPart:
    """One model a job trains or runs frozen, with what the memory and time estimates need."""

    name: str                       # "student", "teacher (frozen)", "task model"
    shape: ModelShape
    layers_run: int                 # layers its forward runs (a truncated teacher runs fewer)
    last_projections_only: bool     # the last layer run computes only Q/K/V
    trainable: int                  # parameters that get gradients and optimizer states
    extra_params: int = 0           # trained parameters outside the encoder (heads, loss projections)
    frozen: bool = False


@dataclass
class JobFacts:
    """What :func:`inspect_job` found: the checked configs and the shapes."""

    job: str
    world_size: int
    ds_path: Optional[Path]
    ds: Dict[str, Any]                       # the completed DeepSpeed config
    seq_length: int
    trained: Optional[TrainedPart] = None
    frozen: Optional[TrainedPart] = None
    max_steps: int = 0                      # 0: set by the data (epochs)
    epochs: float = 0.0
    runs: int = 1                           # fine-tuning runs (eval: tasks x lrs x seeds)
    relation_heads: int = 0
    relations: int = 0
    loss_impl: str = "auto"
    chunk_size: Optional[int] = None
    losses: List[str] = field(default_factory=list)
    activation_checkpointing: bool = False
    attention_dropout: float = 0.0
    notes: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    stages: List["JobFacts"] = field(default_factory=list)   # pipeline: one per training stage


def _message(e: ConfigError) -> str:
    """A ConfigError's message without its ``config field '...':`` prefix (to re-raise it)."""
    return str(e).split(f"config field '{e.field}': ", 1)[-1]


def _data_problem(strict: bool, facts: JobFacts, err: ToolkitError) -> None:
    if strict:
        raise err
    facts.warnings.append(str(err))


#: ``ds_config: auto`` on the device a plan is made for (a job resolves it on its own host).
AUTO_DS_CONFIG = {"gpu": "zero2_bf16.json", "cpu": "cpu_fp32.json"}


def _load_ds(ds_config: Optional[str], world_size: int, field_name: str = "ds_config",
             device: Optional[str] = None) -> tuple:
    from toolkit.engine.ds_config import load_ds_config
    from toolkit.recipes.common import resolve_ds_config

    if device is not None and ds_config in (None, "", "auto"):
        ds_config = AUTO_DS_CONFIG[device]
    try:
        path = resolve_ds_config(ds_config)
    except ConfigError as e:
        raise ConfigError(field_name, _message(e)) from None
    return path, load_ds_config(path, world_size)


def _check_tokenizer(shape: ModelShape, field_name: str, source: Optional[str]) -> None:
    """The tokenizer in the model directory must not produce ids past the embedding rows."""
    if not shape.has_tokenizer:
        return
    from toolkit.models.encoder import load_tokenizer

    try:
        n = len(load_tokenizer(shape.source))
    except ToolkitError as e:
        raise ConfigError(field_name, str(e), source) from None
    if n > shape.vocab:
        raise ConfigError(field_name, f"the tokenizer in {shape.source} has {n} token ids but the model's "
                          f"embedding has {shape.vocab} rows (vocab_size); use the tokenizer the model was "
                          f"trained with", source)


def _check_seq(seq: int, shape: ModelShape, field_name: str, source: Optional[str]) -> None:
    if seq > shape.max_positions:
        raise ConfigError(field_name, f"{seq} tokens exceed the {shape.max_positions} position embeddings of "
                          f"{shape.source} (max_position_embeddings)", source)


def _tasks(spec: Any, data_dir: Optional[str], field_name: str, source: Optional[str]) -> List[Any]:
    from toolkit.tasks import resolve_tasks

    try:
        return resolve_tasks(spec, data_dir)
    except ConfigError:
        raise
    except ToolkitError as e:
        raise ConfigError(field_name, str(e), source) from None


def _check_train_split(tasks: List[Any], facts: JobFacts, strict: bool) -> None:
    for task in tasks:
        try:
            if not task.has_split("train"):
                raise DataError(task.split_path("train"), f"task '{task.name}' has no train split here",
                                hint="check data_dir (the folder holding the official task data)")
        except ToolkitError as e:
            _data_problem(strict, facts, e)
            return


def _head_params(tasks: List[Any], hidden: int) -> int:
    """Task heads: one linear per task (hidden x outputs + bias); outputs as the head makes them."""
    from toolkit.models.heads import build_head

    total = 0
    for task in tasks:
        try:
            head = build_head(task.task_type, hidden, task.num_labels)
        except Exception:  # noqa: BLE001 - a head that needs the data to size: left out of the count
            continue
        total += sum(p.numel() for p in head.parameters())
    return total


# -- jobs ------------------------------------------------------------------------------------
def inspect_distill(cfg: Any, world_size: int, source: Optional[str] = None, planning: bool = False,
                    teacher_shape: Optional[ModelShape] = None, device: Optional[str] = None) -> JobFacts:
    from toolkit.models.capture import default_teacher_layer, resolve_layer
    from toolkit.models.encoder import EncoderSpec

    ds_path, ds = _load_ds(cfg.ds_config, world_size, device=device)
    facts = JobFacts(job="distill", world_size=world_size, ds_path=ds_path, ds=ds,
                     seq_length=cfg.corpus.seq_length, max_steps=cfg.max_steps)
    t = teacher_shape or shape_from_dir(cfg.teacher, "teacher", source, planning)
    if teacher_shape is None:
        _check_tokenizer(t, "teacher", source)
    _check_seq(cfg.corpus.seq_length, t, "corpus.seq_length", source)

    t_layer = cfg.loss.teacher_layer or default_teacher_layer(t.layers)
    try:
        t_idx = resolve_layer(t_layer, t.layers, "loss.teacher_layer")
    except ConfigError as e:
        raise ConfigError(e.field, f"{_message(e)} ({t.source})", source) from None

    sc = cfg.student
    if sc.init == "path":
        s = shape_from_dir(sc.path, "student.path", source, planning)
        if s.vocab != t.vocab:
            raise ConfigError("student.path", f"the student's vocabulary ({s.vocab}, {s.source}) differs from the "
                              f"teacher's ({t.vocab}, {t.source}); distillation needs one shared tokenizer", source)
    else:
        spec = EncoderSpec(arch=t.arch, num_layers=sc.num_layers, hidden_size=sc.hidden_size,
                           num_heads=sc.num_heads, intermediate_size=sc.intermediate_size, vocab_size=t.vocab,
                           max_position_embeddings=t.max_positions)
        s = shape_from_config(spec.to_config(), f"student spec ({sc.num_layers} layers, hidden {sc.hidden_size})")
        if sc.init == "teacher_layers":
            src = shape_from_dir(sc.init_from, "student.init_from", source, planning) if sc.init_from else t
            if sc.init_from and src.vocab != t.vocab:
                raise ConfigError("student.init_from", f"{src.source} has a vocabulary of {src.vocab} but the "
                                  f"teacher has {t.vocab}; they must share one tokenizer", source)
            if (src.hidden, src.heads, src.intermediate) != (sc.hidden_size, sc.num_heads, sc.intermediate_size):
                raise ConfigError("student.init", f"teacher_layers copies {src.source}'s layers, so the student's "
                                  f"hidden_size/num_heads/intermediate_size must be its {src.hidden}/{src.heads}/"
                                  f"{src.intermediate}", source)
            if sc.teacher_layers and len(sc.teacher_layers) != sc.num_layers:
                raise ConfigError("student.teacher_layers", f"needs {sc.num_layers} entries (one per student "
                                  f"layer), got {len(sc.teacher_layers)}", source)
            for i, layer in enumerate(sc.teacher_layers):
                try:
                    resolve_layer(layer, src.layers, f"student.teacher_layers[{i}]")
                except ConfigError as e:
                    raise ConfigError(e.field, f"{_message(e)} ({src.source})", source) from None
    try:
        s_idx = resolve_layer(cfg.loss.student_layer or s.layers, s.layers, "loss.student_layer")
    except ConfigError as e:
        raise ConfigError(e.field, _message(e), source) from None

    from toolkit.losses.registry import parse_options

    weights = sorted(k for k, v in cfg.loss.weights.items() if v > 0)
    rel_heads, relations, impl, chunk = 0, 0, "auto", None
    if "minilmv2" in weights:
        opts = parse_options("minilmv2", cfg.loss.options.get("minilmv2"), "loss.options.minilmv2")
        rel_heads = opts.num_relation_heads or t.heads
        for who, h in (("teacher", t.hidden), ("student", s.hidden)):
            if h % rel_heads:
                raise ConfigError("loss.options.minilmv2.num_relation_heads",
                                  f"{rel_heads} relation heads do not divide the {who} hidden size {h}; pick a "
                                  f"divisor of both {t.hidden} and {s.hidden}", source)
        relations, impl, chunk = len(opts.relations), opts.impl, (opts.chunk_size or None)
    if "minilm_v1" in weights and s.heads != t.heads:
        raise ConfigError("loss.weights.minilm_v1", f"MiniLM v1 needs as many student attention heads "
                          f"({s.heads}) as teacher heads ({t.heads}); use minilmv2 (relation heads)", source)

    qkv_only = set(weights) <= QKV_ONLY_LOSSES
    extra = s.hidden * t.hidden + t.hidden if "tinybert" in weights and s.hidden != t.hidden else 0
    facts.trained = TrainedPart("student", s, layers_run=s.layers,
                                last_projections_only=False,   # the student runs every layer whole
                                trainable=s.params - s.pooler_params + extra, extra_params=extra)
    facts.frozen = TrainedPart("teacher (frozen)", t, layers_run=t_idx + 1, last_projections_only=qkv_only,
                               trainable=0, frozen=True)
    facts.losses = weights
    facts.relation_heads = rel_heads
    facts.relations = relations
    facts.loss_impl, facts.chunk_size = impl, chunk
    facts.activation_checkpointing = sc.activation_checkpointing
    facts.attention_dropout = sc.attention_dropout
    facts.notes.append(f"teacher layer {t_idx + 1} of {t.layers} is read (the teacher runs {t_idx + 1} layers"
                       f"{', the last one only to its Q/K/V projections' if qkv_only else ''}); "
                       f"student layer {s_idx + 1} of {s.layers}")
    if not cfg.corpus.sources:
        raise ConfigError("corpus.sources", "give the corpus: files, folders or globs (text, JSONL, Parquet) "
                          "or hf:<dir>", source)
    from toolkit.data.sources import resolve_shards

    try:
        resolve_shards(list(cfg.corpus.sources), cfg.corpus.format)
    except ToolkitError as e:
        _data_problem(not planning, facts, e)
    return facts


def _inspect_task_training(job: str, cfg: Any, tasks: List[Any], world_size: int, source: Optional[str],
                           planning: bool, model_shape: Optional[ModelShape] = None,
                           device: Optional[str] = None, check_data: bool = True) -> JobFacts:
    ds_path, ds = _load_ds(cfg.ds_config, world_size, device=device)
    shape = model_shape or shape_from_dir(cfg.model, "model", source, planning)
    if model_shape is None:
        _check_tokenizer(shape, "model", source)
    _check_seq(cfg.max_seq_length, shape, "max_seq_length", source)
    heads = _head_params(tasks, shape.hidden)
    facts = JobFacts(job=job, world_size=world_size, ds_path=ds_path, ds=ds, seq_length=cfg.max_seq_length,
                     max_steps=cfg.max_steps, epochs=float(getattr(cfg, "epochs", 0.0)))
    facts.trained = TrainedPart("task model", shape, layers_run=shape.layers, last_projections_only=False,
                                trainable=shape.params + heads, extra_params=heads)
    facts.attention_dropout = shape.attention_dropout
    facts.notes.append(f"{len(tasks)} task head(s): {', '.join(t.name for t in tasks)} ({heads:,} parameters)")
    if check_data:
        _check_train_split(tasks, facts, not planning)
    return facts


def inspect_teacher(cfg: Any, world_size: int, source: Optional[str] = None, planning: bool = False,
                    model_shape: Optional[ModelShape] = None, device: Optional[str] = None) -> JobFacts:
    tasks = _tasks(cfg.tasks, cfg.data_dir, "tasks", source)
    return _inspect_task_training("teacher", cfg, tasks, world_size, source, planning, model_shape, device)


def inspect_finetune(cfg: Any, world_size: int, source: Optional[str] = None, planning: bool = False,
                     model_shape: Optional[ModelShape] = None, device: Optional[str] = None) -> JobFacts:
    tasks = _tasks([cfg.task], cfg.data_dir, "task", source)
    return _inspect_task_training("finetune", cfg, tasks, world_size, source, planning, model_shape, device)


def inspect_eval(cfg: Any, world_size: int, source: Optional[str] = None, planning: bool = False,
                 model_shape: Optional[ModelShape] = None, device: Optional[str] = None) -> JobFacts:
    tasks = _tasks(cfg.tasks, cfg.data_dir, "tasks", source)
    facts = _inspect_task_training("eval", cfg, tasks[:1], world_size, source, planning, model_shape, device,
                                   check_data=False)
    facts.runs = len(tasks) * len(cfg.lrs) * len(cfg.seeds)
    facts.notes[-1] = (f"{facts.runs} fine-tuning runs ({len(tasks)} tasks x {len(cfg.lrs)} learning rates x "
                       f"{len(cfg.seeds)} seeds), one task head each; the plan is one run's")
    _check_train_split(tasks, facts, not planning)
    return facts


def _sub_config(job: str, data: Dict[str, Any], prefix: str, source: Optional[str]) -> Any:
    from toolkit.config import load_config
    from toolkit.jobs import JOBS

    cls, _ = JOBS[job].load()
    try:
        return load_config(cls, None, base=data)
    except ConfigError as e:
        raise ConfigError(f"{prefix}.{e.field}", _message(e), source) from None


def inspect_pipeline(cfg: Any, world_size: int, source: Optional[str] = None, planning: bool = False,
                     device: Optional[str] = None) -> JobFacts:
    """The pipeline's stages as the recipe builds them: the teacher job, the distillations and
    one evaluation run, checked against the teacher named in the config."""
    from toolkit.recipes.pipeline import PipelineRecipe, _merge

    recipe = PipelineRecipe(cfg)
    ds_path, ds = _load_ds(recipe.distill_job.get("ds_config", cfg.ds_config), world_size, "distill_job.ds_config",
                           device)
    for name, job in (("teacher_job", recipe.teacher_job), ("eval_job", recipe.eval_job)):
        _load_ds(job.get("ds_config", cfg.ds_config), world_size, f"{name}.ds_config", device)
    facts = JobFacts(job="pipeline", world_size=world_size, ds_path=ds_path, ds=ds, seq_length=0)
    if not cfg.teacher:
        facts.notes.append("no teacher in the config: the stages use the embedded demo data's teacher, "
                           "checked when the data stage has built it")
        return facts
    t = shape_from_dir(cfg.teacher, "teacher", source, planning)
    _check_tokenizer(t, "teacher", source)
    out = Path(cfg.output_dir)
    if cfg.in_domain:
        tcfg = _sub_config("teacher", _merge({"model": cfg.teacher, "tasks": cfg.in_domain,
                                              "data_dir": cfg.task_data_dir, "output_dir": str(out / "teacher")},
                                             recipe.teacher_job), "teacher_job", source)
        facts.stages.append(inspect_teacher(tcfg, world_size, source, planning, model_shape=t, device=device))
    if cfg.corpus:
        djob = _merge({"teacher": cfg.teacher, "output_dir": str(out / "mitkd"), "corpus": {"sources": cfg.corpus}},
                      recipe.distill_job)
        if djob.get("student", {}).get("init") == "teacher_layers":
            djob["student"] = {**djob["student"], "init_from": cfg.teacher}
        dcfg = _sub_config("distill", djob, "distill_job", source)
        facts.stages.append(inspect_distill(dcfg, world_size, source, planning, teacher_shape=t, device=device))
        student = facts.stages[-1].trained.shape
        tasks = list(cfg.in_domain) + list(cfg.out_of_domain)
        if tasks:
            ecfg = _sub_config("eval", _merge({"model": cfg.teacher, "tasks": tasks, "data_dir": cfg.task_data_dir,
                                               "output_dir": str(out / "eval"), "seeds": recipe.seeds},
                                              recipe.eval_job), "eval_job", source)
            facts.stages.append(inspect_eval(ecfg, world_size, source, planning, model_shape=student, device=device))
    return facts


INSPECTORS: Dict[str, Callable[..., JobFacts]] = {
    "teacher": inspect_teacher, "distill": inspect_distill, "finetune": inspect_finetune, "eval": inspect_eval,
    "pipeline": inspect_pipeline,
}


def inspect_job(job: str, cfg: Any, world_size: Optional[int] = None, source: Optional[str] = None,
                planning: bool = False, device: Optional[str] = None) -> JobFacts:
    """Check ``job``'s config ``cfg`` completely without building a model; see the module doc.

    ``world_size`` defaults to the launcher's ``WORLD_SIZE``; ``device`` (``"gpu"``/``"cpu"``, a
    plan's target) picks what ``ds_config: auto`` means there, else this host decides.
    """
    if job not in INSPECTORS:
        raise ConfigError("job", f"unknown job {job!r}; one of {', '.join(INSPECTORS)}")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    return INSPECTORS[job](cfg, world_size, source, planning, device=device)


def preflight(job: str, cfg: Any, world_size: Optional[int] = None) -> JobFacts:
    """The checks at the start of every job, before any model is loaded: a bad config fails
    here in seconds with one named error (see :func:`inspect_job`; data files must exist)."""
    return inspect_job(job, cfg, world_size)
