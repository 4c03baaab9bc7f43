"""``toolkit distill`` / ``deepspeed launchers/distill.py``: streaming task-agnostic distillation.

Step 2 of MITKD: distil a (multi-task) teacher into a small student on unlabeled text with
MiniLMv2's multi-head self-attention relation loss (Q-Q, K-K, V-V relations of one teacher
layer and the student's last layer). The student never sees labels.

The teacher is frozen and cheap: no optimizer, ``no_grad``, half precision on GPUs, and
truncated after the layer the loss reads. Q/K/V come from forward hooks, so every layer keeps
its sdpa/flash attention. Only the student (plus any learned loss projections) is wrapped by
the DeepSpeed engine. The stream position of every rank is saved with each checkpoint, so a
resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from toolkit.config import arg, save_config
from toolkit.data.corpus import CorpusConfig
from toolkit.data.loader import build_loader
from toolkit.engine import Engine, OptimConfig, dist
from toolkit.engine.engine import param_groups
from toolkit.engine.ds_config import load_ds_config
from toolkit.engine.precision import teacher_dtype
from toolkit.engine.signals import REQUEUE_EXIT_CODE, PreemptionHandler
from toolkit.errors import ConfigError, DataError, ToolkitError
from toolkit.losses import EMBEDDINGS, LOSSES, DistillInputs, LossContext, Needs, build_loss
from toolkit.losses.registry import parse_options
from toolkit.losses.relations import describe_relation_kl
from toolkit.models.capture import LayerCapture, default_teacher_layer, encoder_layers, resolve_layer
from toolkit.models.encoder import (EncoderSpec, build_encoder, count_parameters, load_tokenizer, save_encoder,
                                    spec_from_model)
from toolkit.plan import preflight
from toolkit.recipes.common import (check_corpus, check_ds_config, check_model_dir, mean_across_ranks,
                                    resolve_ds_config, write_json)
from toolkit.recipes.frozen import FrozenTeacher
from toolkit.utils.fsio import publish_dir
from toolkit.utils.lock import locked_output
from toolkit.utils.logging import RunLogger, close_log_file, configure_logging, get_logger
from toolkit.utils.meter import Throughput, memory_kind
from toolkit.utils.progress import ProgressBar

log = get_logger(__name__)

#: Fields of earlier versions of this config, and where they are now.
_MOVED = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "warmup_ratio": "optim.warmup_ratio",
          "decay": "optim.decay", "optimizer": "optim.impl", "mask_prob": "loss.mask_prob"}


@dataclass
class StudentConfig:
    init: str = arg("spec", "spec (random, from the sizes below) | teacher_layers (copy teacher layers) | path")
    path: Optional[str] = arg(None, "init=path: an encoder directory to continue from")
    num_layers: int = arg(6, "transformer layers")
    hidden_size: int = arg(384, "hidden size")
    num_heads: int = arg(12, "attention heads")
    intermediate_size: int = arg(1536, "feed-forward size")
    teacher_layers: List[int] = arg(help="init=teacher_layers: 1-based teacher layers to copy, one per student "
                                    "layer (default: evenly spaced)", factory=list)
    hidden_dropout: float = arg(0.1, "student dropout on hidden states")
    attention_dropout: float = arg(0.0, "student attention-probability dropout. 0 keeps every student layer on "
                                   "the fused sdpa/flash kernels (dropout forces PyTorch's unfused attention on "
                                   "CPU); the relation loss reads Q/K/V, not attention probabilities")
    activation_checkpointing: bool = arg(False, "recompute each student layer's activations in the backward instead "
                                         "of keeping them: less memory at long sequences for one more forward of "
                                         "those layers per step")
    init_from: Optional[str] = arg(None, "init=teacher_layers: copy the layers from this encoder directory instead "
                                   "of the teacher (e.g. the pretrained model, so that students distilled from "
                                   "different teachers start from the same weights)")
    arch: str = arg("auto", "student architecture: auto (the teacher's) | bert | ernie (ERNIE 3.0: BERT layers plus "
                    "task-type embeddings); init=spec and teacher_layers")
    use_task_id: Optional[bool] = arg(None, "ERNIE students: task-type embeddings (null = as the teacher; a teacher "
                                      "without them gives a zero-initialised table)")

    def __post_init__(self) -> None:
        if self.init not in ("spec", "teacher_layers", "path"):
            raise ConfigError("student.init", f"must be spec, teacher_layers or path, got {self.init!r}")
        if self.init == "path" and not self.path:
            raise ConfigError("student.path", "init=path needs student.path")
        if self.hidden_size % self.num_heads:
            raise ConfigError("student.num_heads", f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_heads {self.num_heads}")
        if self.arch not in ("auto", "bert", "ernie"):
            raise ConfigError("student.arch", f"must be auto, bert or ernie, got {self.arch!r}")
        if self.use_task_id and self.arch == "bert":
            raise ConfigError("student.use_task_id", "task-type embeddings need arch: ernie")


@dataclass
class LossConfig:
    weights: Dict[str, float] = arg(help="loss name -> weight; the registered losses are listed by "
                                    "`toolkit distill --help` (minilmv2, minilm_v1, tinybert, logit_kd, ...)",
                                    factory=lambda: {"minilmv2": 1.0})
    teacher_layer: int = arg(0, "1-based teacher layer the layer-pair losses read (0 = the last for <=12 layers, "
                             "upper-middle for larger teachers, as MiniLMv2)")
    student_layer: int = arg(0, "1-based student layer they read (0 = the last)")
    mask_prob: float = arg(0.15, "share of tokens masked when a loss reads MLM logits (logit_kd, tinybert "
                           "prediction)")
    options: Dict[str, Dict[str, Any]] = arg(help="per-loss settings, keyed by loss name, e.g. "
                                             "{minilmv2: {num_relation_heads: 48}}", factory=dict)

    MOVED_FIELDS = {"num_relation_heads": "options.minilmv2.num_relation_heads",
                    "relations": "options.minilmv2.relations", "impl": "options.minilmv2.impl",
                    "chunk_size": "options.minilmv2.chunk_size", "temperature": "options.logit_kd.temperature"}

    def __post_init__(self) -> None:
        for name, w in self.weights.items():
            if name not in LOSSES:
                raise ConfigError(f"loss.weights.{name}", f"unknown loss; registered: {', '.join(sorted(LOSSES))}")
            if w < 0:
                raise ConfigError(f"loss.weights.{name}", f"must be >= 0, got {w}")
        if not any(w > 0 for w in self.weights.values()):
            raise ConfigError("loss.weights", "at least one loss needs a positive weight")
        for name, opts in self.options.items():
            if name not in self.weights:
                raise ConfigError(f"loss.options.{name}", f"options for a loss that is not in loss.weights "
                                  f"({', '.join(sorted(self.weights))})")
            parse_options(name, opts, f"loss.options.{name}")   # field errors now, not after loading models
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError("loss.mask_prob", f"must be in (0, 1), got {self.mask_prob}")


@dataclass
class DistillConfig:
    teacher: str = arg(help="teacher encoder directory (e.g. the MITKD teacher's output_dir/model)")
    output_dir: str = arg("runs/distill", "output: student/ (save_pretrained + tokenizer), checkpoints/, logs")
    corpus: CorpusConfig = arg(help="the unlabeled corpus stream", factory=CorpusConfig)
    student: StudentConfig = arg(help="student architecture / initialisation", factory=StudentConfig)
    loss: LossConfig = arg(help="distillation objective", factory=LossConfig)
    mix_teacher: Optional[str] = arg(None, "a second teacher (e.g. the pretrained model the multi-task teacher was "
                                     "trained from) whose targets are mixed in with weight mix_weight; the losses "
                                     "become (1 - mix_weight) x loss(teacher) + mix_weight x loss(mix_teacher), "
                                     "which for the KL losses is the KL to the mixed target distribution")
    mix_weight: float = arg(0.0, "weight of mix_teacher's targets, in [0, 1]")
    ds_config: str = arg("auto", "DeepSpeed JSON: micro batch, accumulation, precision, ZeRO stage; "
                         "auto = zero2_bf16.json on GPUs, cpu_fp32.json on CPUs")
    max_steps: int = arg(1000, "optimizer steps")
    optim: OptimConfig = arg(help="AdamW and learning-rate schedule",
                             factory=lambda: OptimConfig(lr=1e-4, warmup_ratio=0.04))
    log_every: int = arg(10, "log losses and throughput every N steps")
    save_every: int = arg(0, "checkpoint every N steps (0 = at the end and when stopped)")
    keep_last: int = arg(2, "checkpoints kept on disk")
    seed: int = arg(42, "random seed (student init, masking, dropout)")
    resume: bool = arg(True, "resume from the latest complete checkpoint in output_dir/checkpoints")
    max_nonfinite: int = arg(20, "stop with an error after this many consecutive non-finite losses")
    stop_after: int = arg(0, "testing aid: stop (with a checkpoint) after N steps, as a preemption would")

    MOVED_FIELDS = _MOVED

    def __post_init__(self) -> None:
        if self.max_steps <= 0:
            raise ConfigError("max_steps", "must be > 0")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ConfigError("mix_weight", f"must be in [0, 1], got {self.mix_weight}")
        if self.mix_weight > 0 and not self.mix_teacher:
            raise ConfigError("mix_teacher", "mix_weight > 0 needs a mix_teacher directory")


class StudentWithLoss(nn.Module):
    """The trainable part: the student encoder plus the registered losses (and their learned
    parameters, e.g. TinyBERT's projections). ``forward`` runs the student, captures what the
    losses read, and returns the weighted total and its parts, summed over the teachers with
    their weights."""

    def __init__(self, student: nn.Module, losses: nn.ModuleDict, weights: Dict[str, float], needs: Needs,
                 teacher_weights: List[float]):
        super().__init__()
        self.student = student
        self.losses = losses
        self.weights = dict(weights)
        self.spec = {layer: set(what) for layer, what in needs.student.items()}
        self.teacher_weights = list(teacher_weights)
        # Created at the first forward, i.e. after DeepSpeed has registered its module hooks:
        # forward hooks run in registration order, so the capture then stores the outputs as
        # ZeRO-3 wrapped them, and the gradient the losses send into the captures triggers
        # ZeRO-3's re-gathering of the weights for their backward.
        self.capture: Optional[LayerCapture] = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                teachers: List[Dict[str, Any]], mlm_mask: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        if self.capture is None:
            self.capture = LayerCapture(self.student, self.spec)
        self.capture.clear()
        self.student(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        captured = self.capture.captured
        parts: Dict[str, torch.Tensor] = {}
        total: Optional[torch.Tensor] = None
        many = len(teachers) > 1
        for i, (tw, t_out) in enumerate(zip(self.teacher_weights, teachers)):
            inputs = DistillInputs(student=captured, teacher=t_out["layers"], attention_mask=attention_mask,
                                   teacher_logits=t_out["logits"], mlm_mask=mlm_mask)
            tag = f"@t{i}" if many else ""
            for name, fn in self.losses.items():
                res = fn(inputs)
                val = res["loss"]
                parts.update({f"{name}/{k}{tag}": v.detach() for k, v in res.items() if k != "loss"})
                parts[f"{name}{tag}"] = val.detach()
                term = val * (self.weights[name] * tw)
                total = term if total is None else total + term
        parts["loss"] = total
        return parts


class DistillRecipe:
    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.logger: Optional[RunLogger] = None

    # ------------------------------------------------------------------------------------
    def _read_teacher_config(self) -> None:
        from transformers import AutoConfig

        cfg = self.cfg
        try:
            self.teacher_config = AutoConfig.from_pretrained(cfg.teacher, local_files_only=True)
        except (OSError, ValueError) as e:
            raise DataError(cfg.teacher, f"cannot read the teacher's config.json: {e}") from None
        n_layers = self.teacher_config.num_hidden_layers
        layer = cfg.loss.teacher_layer or default_teacher_layer(n_layers)
        self.teacher_idx = resolve_layer(layer, n_layers, "loss.teacher_layer")  # 0-based
        self.teacher_layer = self.teacher_idx + 1
        self.teacher_full_layers = n_layers
        self.device = torch.device("cuda", dist.device_index()) if torch.cuda.is_available() else torch.device("cpu")
        self.tokenizer = load_tokenizer(cfg.teacher)

    def _build_teachers(self, needs: Needs) -> None:
        """The teacher (and the mix teacher) cut to what the losses read."""
        cfg = self.cfg
        dtype = teacher_dtype(self.device)
        self.teachers = [FrozenTeacher(cfg.teacher, needs, self.device, dtype, "teacher")]
        self.teacher_weights = [1.0]
        if cfg.mix_teacher and cfg.mix_weight > 0:
            mix = FrozenTeacher(cfg.mix_teacher, needs, self.device, dtype, "mix_teacher")
            t, m = self.teacher_config, mix.config
            for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size"):
                if getattr(t, key) != getattr(m, key):
                    raise ConfigError("mix_teacher", f"{cfg.mix_teacher} has {key} {getattr(m, key)} but the teacher "
                                      f"has {getattr(t, key)}; the mixed targets need teachers of one shape "
                                      f"(e.g. the pretrained model the multi-task teacher was trained from)")
            self.teachers.append(mix)
            self.teacher_weights = [1.0 - cfg.mix_weight, cfg.mix_weight]
        self.teacher_params = self.teachers[0].params

    def _build_student(self) -> nn.Module:
        cfg, sc = self.cfg, self.cfg.student
        tcfg = self.teacher_config
        if sc.init == "path":
            student = build_encoder(sc.path)
            _set_dropout(student, sc.hidden_dropout, sc.attention_dropout)
            if student.config.vocab_size != tcfg.vocab_size:
                raise DataError(sc.path, f"student vocabulary ({student.config.vocab_size}) differs from the "
                                f"teacher's ({tcfg.vocab_size}); distillation needs one shared tokenizer")
            return student
        # An ERNIE 3.0 student may learn from a BERT teacher: the layers are the same modules.
        arch = sc.arch if sc.arch != "auto" else ("ernie" if tcfg.model_type == "ernie" else "bert")
        use_task_id = sc.use_task_id if sc.use_task_id is not None else bool(getattr(tcfg, "use_task_id", False))
        if use_task_id and arch != "ernie":
            raise ConfigError("student.use_task_id", f"the student is {arch} (student.arch={sc.arch}); "
                              f"task-type embeddings need student.arch: ernie")
        spec = EncoderSpec(arch=arch, num_layers=sc.num_layers, hidden_size=sc.hidden_size, num_heads=sc.num_heads,
                           intermediate_size=sc.intermediate_size, vocab_size=tcfg.vocab_size,
                           max_position_embeddings=tcfg.max_position_embeddings,
                           type_vocab_size=tcfg.type_vocab_size, use_task_id=use_task_id,
                           task_type_vocab_size=int(getattr(tcfg, "task_type_vocab_size", 3) or 3),
                           hidden_dropout=sc.hidden_dropout, attention_dropout=sc.attention_dropout)
        torch.manual_seed(cfg.seed)
        student = build_encoder(spec)
        if sc.init == "teacher_layers":
            self._copy_teacher_layers(student, sc)
        return student

    def _copy_teacher_layers(self, student: nn.Module, sc: StudentConfig) -> None:
        source = sc.init_from or self.cfg.teacher
        full = build_encoder(source)  # untruncated, fp32 copy as the source
        if full.config.vocab_size != self.teacher_config.vocab_size:
            raise DataError(source, f"student.init_from has a vocabulary of {full.config.vocab_size} but the teacher "
                            f"has {self.teacher_config.vocab_size}; they must share one tokenizer")
        t_spec = spec_from_model(full)
        if (t_spec.hidden_size, t_spec.num_heads, t_spec.intermediate_size) != \
                (sc.hidden_size, sc.num_heads, sc.intermediate_size):
            raise ConfigError("student.init", "teacher_layers needs the student's hidden_size/num_heads/"
                              f"intermediate_size to equal the teacher's ({t_spec.hidden_size}/{t_spec.num_heads}/"
                              f"{t_spec.intermediate_size})")
        n_t = t_spec.num_layers
        layers = sc.teacher_layers or [round((i + 1) * n_t / sc.num_layers) for i in range(sc.num_layers)]
        if len(layers) != sc.num_layers:
            raise ConfigError("student.teacher_layers", f"needs {sc.num_layers} entries, got {len(layers)}")
        # BERT and ERNIE embeddings differ only by ERNIE's task-type table: a table the source lacks
        # starts at zero (the student then computes the source's function for every task id),
        # one the student lacks is left out.
        task_table = "task_type_embeddings.weight"
        missing, unexpected = student.embeddings.load_state_dict(full.embeddings.state_dict(), strict=False)
        if set(missing) - {task_table} or set(unexpected) - {task_table}:
            raise ConfigError("student.init", f"cannot copy the embeddings of {source}: missing {missing}, "
                              f"unexpected {unexpected}")
        if task_table in missing:
            nn.init.zeros_(student.embeddings.task_type_embeddings.weight)
        for s_i, t_l in enumerate(layers):
            t_i = resolve_layer(t_l, n_t)
            student.encoder.layer[s_i].load_state_dict(full.encoder.layer[t_i].state_dict())
        if getattr(full, "pooler", None) is not None and getattr(student, "pooler", None) is not None:
            student.pooler.load_state_dict(full.pooler.state_dict())
        del full

    def _build_losses(self, student: nn.Module) -> nn.ModuleDict:
        cfg = self.cfg
        s_layers = student.config.num_hidden_layers
        self.student_idx = resolve_layer(cfg.loss.student_layer or s_layers, s_layers, "loss.student_layer")
        losses = nn.ModuleDict()
        for name, weight in cfg.loss.weights.items():
            if weight > 0:
                ctx = LossContext(self.teacher_config, student.config, self.teacher_idx, self.student_idx,
                                  student=student, field=f"loss.options.{name}")
                losses[name] = build_loss(name, cfg.loss.options.get(name), ctx)
        return losses

    def validate(self) -> None:
        """Check the inputs a user gives before loading any model: model folders, the DeepSpeed
        JSON and the corpus (ConfigError/DataError naming the field or file)."""
        cfg = self.cfg
        check_model_dir("teacher", cfg.teacher)
        if cfg.mix_teacher and cfg.mix_weight > 0:
            check_model_dir("mix_teacher", cfg.mix_teacher)
        if cfg.student.init == "path":
            check_model_dir("student.path", cfg.student.path)
        elif cfg.student.init == "teacher_layers" and cfg.student.init_from:
            check_model_dir("student.init_from", cfg.student.init_from)
        check_ds_config(cfg.ds_config)
        check_corpus("corpus", cfg.corpus)

    def setup(self) -> None:
        cfg = self.cfg
        self.validate()
        preflight("distill", cfg)   # shapes, layers and relation heads, before any model is loaded
        self._read_teacher_config()
        student = self._build_student()
        tcfg = self.teacher_config
        if student.config.vocab_size != tcfg.vocab_size:
            raise DataError(cfg.teacher, "teacher and student vocabularies differ")
        if len(self.tokenizer) > tcfg.vocab_size:
            raise DataError(cfg.teacher, f"the tokenizer has {len(self.tokenizer)} tokens but the teacher's "
                            f"embedding has {tcfg.vocab_size} rows")
        # The student's pooler never receives a gradient from these losses: freeze it so
        # every optimizer (and ZeRO) sees only parameters that train.
        if getattr(student, "pooler", None) is not None:
            student.pooler.requires_grad_(False)
        losses = self._build_losses(student)
        needs = Needs()
        for fn in losses.values():
            needs = needs | fn.needs()
        self.needs = needs
        self._build_teachers(needs)
        weights = {k: v for k, v in cfg.loss.weights.items() if v > 0}
        module = StudentWithLoss(student, losses, weights, needs, self.teacher_weights)
        self._freeze_unreached(module)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        ds = load_ds_config(resolve_ds_config(cfg.ds_config), world)
        if cfg.student.activation_checkpointing:
            self._checkpoint_layers(student, needs)
        # The BERT recipe's two groups: no weight decay on biases and LayerNorm weights.
        self.engine = Engine(module, ds, cfg.optim, total_steps=cfg.max_steps,
                             params=param_groups(module, cfg.optim.weight_decay), max_nonfinite=cfg.max_nonfinite)
        eng = self.engine
        self.module = eng.module
        # On a CPU with native bf16 a bf16 job runs its frozen teachers in bf16 too (as on GPUs);
        # the relation statistics stay fp32 in the losses.
        t_dtype = teacher_dtype(self.device, eng.compute_dtype)
        if self.device.type == "cpu" and t_dtype != torch.float32:
            for t in self.teachers:
                t.to(t_dtype)
        self.loader = build_loader(cfg.corpus, self.tokenizer, batch_size=eng.micro_batch_size, rank=eng.rank,
                                   world_size=eng.world_size)
        self.state: Dict[str, Any] = {"step": 0, "micro_step": 0, "tokens": 0, "samples": 0, "nonfinite_total": 0}
        self._meter: Optional[Throughput] = None   # train()'s, for _sync_counts
        dist.check_shared_folder(self.out)
        if cfg.resume:
            client = eng.load_checkpoint(self.ckpt_dir)
            if client is not None:
                missing = [k for k in ("loader", "state", "world_size") if k not in client]
                if missing:
                    raise ToolkitError(f"{self.ckpt_dir}: the latest checkpoint's state lacks {missing[0]!r} (not "
                                       f"written by toolkit distill); start fresh with a new output_dir or "
                                       f"resume=false")
                if client.get("world_size") != eng.world_size:
                    raise ConfigError("ds_config", f"the checkpoint in {self.ckpt_dir} was written by "
                                      f"{client.get('world_size')} ranks but this run has {eng.world_size}; the "
                                      "stream position is per rank, so resume with the same number of ranks")
                self.loader.load_state_dict(client["loader"])
                self.state.update(client["state"])
                log.info("resumed from step %d", self.state["step"])
        self.logger = RunLogger(self.out, is_main=eng.is_main)
        # Every rank keeps its own log file (output_dir/logs/rank{r}.log); the console and the
        # metrics files are rank 0's.
        self.rank_log = configure_logging(self.out, eng.rank)
        self.student_params = count_parameters(student)
        if eng.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.json")
        main = self.teachers[0]
        mix = (f"; targets mixed {self.teacher_weights[0]:g} teacher + {self.teacher_weights[1]:g} {cfg.mix_teacher}"
               if len(self.teachers) > 1 else "")
        log.info("distill: teacher %s (%d of %d layers run%s, layer %d read), student %d layers/%d hidden "
                 "(%.1fM params), losses %s, global batch %d, seq %d, %s%s", cfg.teacher, main.layers_run,
                 self.teacher_full_layers, ", the last cut after Q/K/V" if main.cut is not None else "",
                 self.teacher_layer, student.config.num_hidden_layers, student.config.hidden_size,
                 self.student_params / 1e6, ", ".join(f"{k} x{v:g}" for k, v in weights.items()),
                 eng.train_batch_size, cfg.corpus.seq_length, eng.compute_dtype, mix)
        for name, fn in losses.items():
            relation = getattr(fn, "relation", None)
            if relation is not None:
                log.info("distill: %s relation KL %s", name, describe_relation_kl(
                    relation.impl, self.device, eng.micro_batch_size, relation.num_relation_heads,
                    cfg.corpus.seq_length, relation.chunk_size))

    @staticmethod
    def _checkpoint_layers(student: nn.Module, needs: Needs) -> None:
        """transformers' activation checkpointing (non-reentrant: the dropout masks of the first
        forward are replayed) on every student layer except those a loss reads. Their outputs
        are captured by hooks, and their weights past what the loss reads are frozen, which
        ZeRO-3 partitions again before a recompute and the checkpoint's metadata check refuses."""
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = encoder_layers(student)
        for i in needs.student:
            if 0 <= i < len(layers):
                layers[i].gradient_checkpointing = False

    def _freeze_unreached(self, module: StudentWithLoss) -> None:
        """Freeze the trainable parameters that no loss reaches (e.g. the student layer the relation
        loss reads, past its Q/K/V projections), found by one forward of a tiny batch.

        They would get no gradient in any step, and DeepSpeed hands every trainable parameter
        without one a zero gradient, so AdamW would decay them (and ZeRO-3 would do so differently
        from the other stages). Frozen, they keep their initial values under every ZeRO stage and
        are saved with the student unchanged.
        """
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        module.to(self.device)
        tok = self.tokenizer
        length = max(4, min(16, self.cfg.corpus.seq_length))
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(len(tok.all_special_ids), len(tok), (2, length), generator=g)
        ids[:, 0], ids[:, -1] = tok.cls_token_id, tok.sep_token_id
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
        batch = {k: v.to(self.device) for k, v in batch.items()}
        mlm_mask = None
        if self.needs.mlm:
            mlm_mask = torch.zeros_like(ids, dtype=torch.bool)
            mlm_mask[:, 1:-1] = True
            mlm_mask = mlm_mask.to(self.device)
        with torch.no_grad():
            teacher_out = [_as_float(t(batch)) for t in self.teachers]
        try:
            parts = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"], teachers=teacher_out, mlm_mask=mlm_mask)
            grads = torch.autograd.grad(parts["loss"], [p for _, p in params], allow_unused=True)
        finally:
            # The capture must be created after DeepSpeed's hooks (see StudentWithLoss.capture).
            if module.capture is not None:
                module.capture.remove()
                module.capture = None
        unreached = [(n, p) for (n, p), gr in zip(params, grads) if gr is None]
        for _, p in unreached:
            p.requires_grad_(False)
        if unreached:
            n = sum(p.numel() for _, p in unreached)
            log.info("distill: %d parameter tensors (%s values) no loss reaches are kept frozen: %s", len(unreached),
                     f"{n:,}", ", ".join(name for name, _ in unreached[:6]) + (" ..." if len(unreached) > 6 else ""))

    def _mask_for_mlm(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Mask tokens in place (BERT's 80/10/10 over ``loss.mask_prob`` of the real, non-special
        tokens) so the MLM logits carry signal; returns the mask."""
        ids = batch["input_ids"]
        tok = self.tokenizer
        special = torch.zeros_like(ids, dtype=torch.bool)
        for sid in tok.all_special_ids:
            special |= ids == sid
        special |= batch["attention_mask"] == 0
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.state["micro_step"] * 31 + self.engine.rank)
        shape = ids.shape
        chosen = (torch.rand(shape, generator=g) < self.cfg.loss.mask_prob) & ~special.cpu()
        action = torch.rand(shape, generator=g)
        random_ids = torch.randint(len(tok), shape, generator=g)
        new = ids.cpu().clone()
        new[chosen & (action < 0.8)] = tok.mask_token_id
        swap = chosen & (action >= 0.8) & (action < 0.9)
        new[swap] = random_ids[swap]
        batch["input_ids"] = new.to(ids.device)
        return chosen.to(ids.device)

    def _sync_counts(self) -> None:
        """Make ``state["tokens"]``/``["samples"]`` and the meter's run totals exact (they are
        estimated per micro step as this rank's count times the world size). A collective: every
        rank calls it at the same points (log steps, checkpoints)."""
        if self._meter is not None:
            d_samples, d_tokens = self._meter.sync_ranks(dist.all_reduce_sum)
            self.state["samples"] += d_samples
            self.state["tokens"] += d_tokens

    def save_checkpoint(self) -> None:
        self._sync_counts()
        # Client state is stored per rank by the engine: each rank keeps its own stream position.
        self.engine.save_checkpoint(self.ckpt_dir, f"step{self.state['step']}",
                                    {"loader": self.loader.state_dict(), "world_size": self.engine.world_size,
                                     "state": dict(self.state)}, keep_last=self.cfg.keep_last)

    def train(self) -> Dict[str, Any]:
        cfg, eng, st = self.cfg, self.engine, self.state
        meter = self._meter = Throughput(eng.device, world_size=eng.world_size)
        sums: Dict[str, Any] = {}
        n_sum = 0
        t0 = time.time()
        it = iter(self.loader)
        last: Dict[str, float] = {}
        bar = ProgressBar(cfg.max_steps, eng.is_main, initial=st["step"], desc="distill")
        with PreemptionHandler() as pre, bar:
            while st["step"] < cfg.max_steps:
                with meter.data_wait():
                    batch = next(it, None)
                    # A finite corpus ends on each rank after its own shards: all ranks stop at the
                    # first micro step where any of them has no batch (one all-reduce per micro step,
                    # only for finite corpora; an endless stream never ends).
                    ended = dist.any_rank(batch is None) if cfg.corpus.epochs else batch is None
                    if ended:
                        log.warning("the corpus ended after %d steps (corpus.epochs=%d%s); stopping early",
                                    st["step"], cfg.corpus.epochs,
                                    "" if batch is None else ", on another rank first")
                        break
                    # This rank's counts, on the host copy: on a GPU, counting the device mask
                    # would wait for the queued work every micro step.
                    n_samples = batch["input_ids"].shape[0]
                    n_tokens = int(batch["attention_mask"].sum())
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
                             if isinstance(v, torch.Tensor)}
                mlm_mask = self._mask_for_mlm(batch) if self.needs.mlm else None
                torch.manual_seed(cfg.seed * 1_000_003 + st["micro_step"] * 1009 + eng.rank)
                teacher_out = [t(batch) for t in self.teachers]
                parts = eng(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=batch["token_type_ids"], teachers=teacher_out, mlm_mask=mlm_mask)
                del teacher_out
                ok = eng.backward(parts["loss"])
                st["micro_step"] += 1
                if ok:
                    for k, v in parts.items():   # device tensors: read back only when logged
                        sums[k] = sums.get(k, 0.0) + v.detach().double()
                    n_sum += 1
                else:
                    st["nonfinite_total"] += 1
                # Step times stay the device's: Engine.backward reads the loss's finiteness (one
                # host sync per micro step), so no work is still queued when the meter ticks.
                st["samples"] += n_samples * eng.world_size   # estimates until _sync_counts
                st["tokens"] += n_tokens * eng.world_size
                meter.step(n_samples, n_tokens)
                if not eng.step():
                    continue
                st["step"] = eng.global_step
                bar.update(1, loss=parts["loss"].detach() if ok else None,   # read only when shown
                           tokens_per_s=meter.summary().get("tokens_per_s"))
                if st["step"] % cfg.log_every == 0:
                    self._sync_counts()
                    last = mean_across_ranks(sums, n_sum)
                    self.logger.log(st["step"], {**last, "lr": eng.lr, **meter.summary()})
                    sums, n_sum = {}, 0
                if cfg.save_every and st["step"] % cfg.save_every == 0:
                    self.save_checkpoint()
                # All ranks must agree: one that alone saw the signal would checkpoint (collectives)
                # while the others run the next step's.
                preempted = dist.any_rank(pre.requested)
                if preempted or (cfg.stop_after and st["step"] >= cfg.stop_after):
                    self.save_checkpoint()
                    log.warning("stopping at step %d with a checkpoint (%s)", st["step"],
                                "preemption signal" if preempted else "stop_after")
                    if preempted:
                        self.logger.close()
                        raise SystemExit(REQUEUE_EXIT_CODE)
                    return {"stopped_at": st["step"]}
        if sums:  # the same on every rank: all log at the same steps
            last = mean_across_ranks(sums, n_sum)
        self.save_checkpoint()
        return self._finish(meter.summary(), last, time.time() - t0)

    def _finish(self, throughput: Dict[str, Any], last: Dict[str, float], elapsed: float) -> Dict[str, Any]:
        eng = self.engine
        state = eng.consolidated_state_dict()
        result = {
            "teacher": self.cfg.teacher, "teacher_layer": self.teacher_layer,
            "mix_teacher": self.cfg.mix_teacher if len(self.teachers) > 1 else None,
            "mix_weight": self.teacher_weights[1] if len(self.teachers) > 1 else 0.0,
            "teacher_layers_total": self.teacher_full_layers, "student_layer": self.student_idx + 1,
            "student_params": self.student_params, "teacher_params": self.teacher_params,
            "steps": self.state["step"], "tokens": self.state["tokens"], "samples": self.state["samples"],
            "final_losses": last, "nonfinite_losses": self.state["nonfinite_total"],
            "throughput": {**throughput, "memory_kind": memory_kind(eng.device)},
            "train_time_s": elapsed,
            "corpus_stats": self.loader.stats,  # this rank's stream: documents, skips, truncations
        }
        if eng.is_main:
            student = self.module.student
            # The student appears whole (COMPLETE.json last) or not at all.
            with publish_dir(self.out / "student", kind="student", meta={"step": self.state["step"]}) as tmp:
                if state is not None:
                    prefix = "student."
                    sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                    save_encoder(student, tmp, state_dict=sd)
                else:
                    save_encoder(student, tmp)
                self.tokenizer.save_pretrained(tmp)
                write_json(tmp / "distill_info.json", result)
            write_json(self.out / "metrics.json", result)
        dist.barrier()
        return result

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if getattr(self, "rank_log", None) is not None:
            close_log_file(self.rank_log)

    def run(self) -> Dict[str, Any]:
        with locked_output(self.out, "distill", is_main=dist.rank() == 0):
            try:
                self.setup()
                return self.train()
            finally:
                self.cleanup()


def _as_float(obj: Any) -> Any:
    """Floating tensors in a (nested) teacher output as fp32 (half-precision teachers on GPUs)."""
    if isinstance(obj, torch.Tensor):
        return obj.float() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _as_float(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_as_float(v) for v in obj)
    return obj


def _set_dropout(model: nn.Module, hidden: float, attention: float) -> None:
    """Set dropout rates on an already built encoder (modules keep the rate they were built with)."""
    model.config.hidden_dropout_prob = hidden
    model.config.attention_probs_dropout_prob = attention
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout):
            module.p = attention if name.endswith("attention.self.dropout") else hidden


def run_distill(cfg: DistillConfig) -> Dict[str, Any]:
    return DistillRecipe(cfg).run()
