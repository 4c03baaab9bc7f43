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

from toolkit.config import arg, cpu_accel_arg, normalize_cpu_accel, save_config
from toolkit.data.corpus import CorpusConfig
from toolkit.data.loader import build_loader
from toolkit.engine import Engine, OptimConfig, dist, prepare_frozen
from toolkit.engine.engine import OPTIMIZER_HELP, check_optimizer_impl, param_groups
from toolkit.engine.ds_config import load_ds_config
from toolkit.engine.precision import teacher_dtype
from toolkit.engine.signals import REQUEUE_EXIT_CODE, PreemptionHandler
from toolkit.errors import ConfigError, DataError
from toolkit.losses import LogitKDLoss, MiniLMv1Loss, MiniLMv2RelationLoss, TinyBERTLoss
from toolkit.losses.relations import describe_relation_kl
from toolkit.models.capture import (CheckpointLayers, ProjectionsOnly, QKVCapture, default_teacher_layer, resolve_layer,
                                    truncate_encoder)
from toolkit.models.encoder import (EncoderSpec, build_encoder, count_parameters, load_tokenizer, save_encoder,
                                    spec_from_model)
from toolkit.recipes.common import accelerate_cpu, mean_across_ranks, resolve_ds_config, write_json
from toolkit.utils.logging import RunLogger, close_log_file, configure_logging, get_logger
from toolkit.utils.meter import Throughput, memory_kind
from toolkit.utils.progress import ProgressBar

log = get_logger(__name__)

LOSS_NAMES = ("minilmv2", "minilm_v1", "tinybert", "logit_kd")
#: Losses that read only the Q/K/V projections of the distilled layers: with nothing else in
#: the mix, that layer stops after its projections (ProjectionsOnly), teacher and student.
QKV_ONLY_LOSSES = frozenset({"minilmv2", "minilm_v1"})


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

    def __post_init__(self) -> None:
        if self.init not in ("spec", "teacher_layers", "path"):
            raise ConfigError("student.init", f"must be spec, teacher_layers or path, got {self.init!r}")
        if self.init == "path" and not self.path:
            raise ConfigError("student.path", "init=path needs student.path")
        if self.hidden_size % self.num_heads:
            raise ConfigError("student.num_heads", f"hidden_size {self.hidden_size} is not divisible by "
                              f"num_heads {self.num_heads}")


@dataclass
class LossConfig:
    weights: Dict[str, float] = arg(help="loss name -> weight; names: minilmv2, minilm_v1, tinybert, logit_kd",
                                    factory=lambda: {"minilmv2": 1.0})
    num_relation_heads: int = arg(0, "MiniLMv2 relation heads (0 = the teacher's attention head count)")
    relations: List[str] = arg(help="MiniLMv2 relation types", factory=lambda: ["qq", "kk", "vv"])
    teacher_layer: int = arg(0, "1-based teacher layer the loss reads (0 = last for <=12 layers, "
                             "upper-middle for larger teachers, as MiniLMv2)")
    student_layer: int = arg(0, "1-based student layer (0 = the last)")
    temperature: float = arg(1.0, "logit_kd temperature")
    chunk_size: int = arg(0, "query rows per block in the relation KL (0 = automatic)")
    impl: str = arg("auto", "relation-KL implementation: auto | chunked | naive | triton")

    def __post_init__(self) -> None:
        bad = sorted(set(self.weights) - set(LOSS_NAMES))
        if bad:
            raise ConfigError(f"loss.weights.{bad[0]}", f"unknown loss; valid: {', '.join(LOSS_NAMES)}")
        if not any(w > 0 for w in self.weights.values()):
            raise ConfigError("loss.weights", "at least one loss needs a positive weight")
        if any(r not in ("qq", "kk", "vv") for r in self.relations):
            raise ConfigError("loss.relations", f"must be a subset of qq, kk, vv; got {self.relations}")


@dataclass
class DistillConfig:
    teacher: str = arg(help="teacher encoder directory (e.g. the MITKD teacher's output_dir/model)")
    output_dir: str = arg("runs/distill", "output: student/ (save_pretrained + tokenizer), checkpoints/, logs")
    corpus: CorpusConfig = arg(help="the unlabeled corpus stream", factory=CorpusConfig)
    student: StudentConfig = arg(help="student architecture / initialisation", factory=StudentConfig)
    loss: LossConfig = arg(help="distillation objective", factory=LossConfig)
    ds_config: str = arg("auto", "DeepSpeed JSON: micro batch, accumulation, precision, ZeRO stage; "
                         "auto = zero2_bf16.json on GPUs, cpu_fp32.json on CPUs")
    max_steps: int = arg(1000, "optimizer steps")
    lr: float = arg(1e-4, "peak learning rate")
    weight_decay: float = arg(0.01, "AdamW weight decay")
    warmup_ratio: float = arg(0.04, "fraction of steps with linear warmup")
    decay: str = arg("linear", "decay after warmup: linear | cosine | constant")
    optimizer: str = arg("auto", "AdamW implementation: " + OPTIMIZER_HELP)
    log_every: int = arg(10, "log losses and throughput every N steps")
    save_every: int = arg(0, "checkpoint every N steps (0 = at the end and when stopped)")
    keep_last: int = arg(2, "checkpoints kept on disk")
    seed: int = arg(42, "random seed (student init, masking, dropout)")
    resume: bool = arg(True, "resume from the latest complete checkpoint in output_dir/checkpoints")
    max_nonfinite: int = arg(20, "stop with an error after this many consecutive non-finite losses")
    stop_after: int = arg(0, "testing aid: stop (with a checkpoint) after N steps, as a preemption would")
    mask_prob: float = arg(0.15, "logit_kd only: share of tokens masked for the MLM logits")
    cpu_accel: str = cpu_accel_arg()

    def __post_init__(self) -> None:
        self.cpu_accel = normalize_cpu_accel(self.cpu_accel)
        check_optimizer_impl(self.optimizer, "optimizer")
        if self.max_steps <= 0:
            raise ConfigError("max_steps", "must be > 0")
        if self.lr <= 0:
            raise ConfigError("lr", "must be > 0")


class StudentWithLoss(nn.Module):
    """The trainable part: the student encoder plus learned loss parameters (TinyBERT's
    projection). ``forward`` runs the student and returns the weighted loss and its parts."""

    def __init__(self, student: nn.Module, losses: nn.ModuleDict, weights: Dict[str, float], student_layer: int,
                 mlm_head: Optional[nn.Module] = None, activation_checkpointing: bool = False):
        super().__init__()
        self.student = student
        self.losses = losses
        self.weights = dict(weights)
        self.student_layer = student_layer
        self.mlm_head = mlm_head
        # Created at the first forward, i.e. after DeepSpeed has registered its module hooks:
        # forward hooks run in registration order, so the capture then stores the outputs as
        # ZeRO-3 wrapped them, and the gradient the loss sends into the captured Q/K/V triggers
        # ZeRO-3's re-gathering of the projection weights for their backward.
        self.capture: Optional[QKVCapture] = None
        # The relation losses read only the last layer's Q/K/V: its attention and feed-forward
        # would be computed and thrown away (no gradient reaches them), so they are skipped.
        last = student.config.num_hidden_layers - 1
        self.projections_only = (ProjectionsOnly(student, last)
                                 if set(losses) <= QKV_ONLY_LOSSES and student_layer == last else None)
        # Checkpoint the layers that run in full (a cut last layer keeps only its input anyway).
        full_layers = range(last if self.projections_only is not None else last + 1)
        self.checkpointed = CheckpointLayers(student, full_layers) if activation_checkpointing else None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                teacher: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        if self.capture is None:
            self.capture = QKVCapture(self.student, [self.student_layer])
        self.capture.clear()
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           output_hidden_states="tinybert" in self.losses)
        s_qkv = self.capture.captured[self.student_layer]
        parts: Dict[str, torch.Tensor] = {}
        total = None
        for name, fn in self.losses.items():
            w = self.weights[name]
            if name == "minilmv2":
                res = fn(s_qkv, teacher["qkv"], attention_mask)
                parts.update({f"minilmv2/{k}": v.detach() for k, v in res.items() if k != "loss"})
                val = res["loss"]
            elif name == "minilm_v1":
                res = fn(s_qkv, teacher["qkv"], attention_mask)
                parts.update({f"minilm_v1/{k}": v.detach() for k, v in res.items() if k != "loss"})
                val = res["loss"]
            elif name == "tinybert":
                s_hidden = {self.student_layer: out.hidden_states[self.student_layer + 1]}
                with_attn = fn.num_heads is not None
                res = fn(s_hidden, teacher["hidden"], attention_mask,
                         student_qk={self.student_layer: s_qkv} if with_attn else None,
                         teacher_qk=teacher["qkv_by_layer"] if with_attn else None)
                parts.update({f"tinybert/{k}": v.detach() for k, v in res.items() if k != "loss"})
                val = res["loss"]
            else:  # logit_kd
                logits = self.mlm_head(out.last_hidden_state)
                val = fn(logits, teacher["logits"], teacher["mlm_mask"])
            parts[name] = val.detach()
            total = val * w if total is None else total + val * w
        parts["loss"] = total
        return parts


class DistillRecipe:
    def __init__(self, cfg: DistillConfig):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.logger: Optional[RunLogger] = None

    # ------------------------------------------------------------------------------------
    def _build_teacher(self) -> None:
        cfg = self.cfg
        teacher = build_encoder(cfg.teacher)
        n_layers = teacher.config.num_hidden_layers
        layer = cfg.loss.teacher_layer or default_teacher_layer(n_layers)
        idx = resolve_layer(layer, n_layers)  # 0-based, ConfigError when out of range
        truncate_encoder(teacher, idx + 1)
        self.teacher_layer = idx + 1
        self.teacher_full_layers = n_layers
        self.teacher_params = count_parameters(teacher)
        self.device = torch.device("cuda", dist.device_index()) if torch.cuda.is_available() else torch.device("cpu")
        self.teacher = prepare_frozen(teacher, self.device, teacher_dtype(self.device))
        self.teacher_capture = QKVCapture(self.teacher, [idx])
        # The truncated teacher's last layer is the one the loss reads: with Q/K/V-only losses
        # its attention and feed-forward are skipped as well.
        weights = {k for k, v in cfg.loss.weights.items() if v > 0}
        self.teacher_cut = ProjectionsOnly(self.teacher, idx) if weights <= QKV_ONLY_LOSSES else None
        self.teacher_idx = idx
        self.tokenizer = load_tokenizer(cfg.teacher)

    def _build_student(self) -> nn.Module:
        cfg, sc = self.cfg, self.cfg.student
        tcfg = self.teacher.config
        arch = "ernie" if tcfg.model_type == "ernie" else "bert"
        if sc.init == "path":
            student = build_encoder(sc.path)
            _set_dropout(student, sc.hidden_dropout, sc.attention_dropout)
            if student.config.vocab_size != tcfg.vocab_size:
                raise DataError(sc.path, f"student vocabulary ({student.config.vocab_size}) differs from the "
                                f"teacher's ({tcfg.vocab_size}); distillation needs one shared tokenizer")
            return student
        spec = EncoderSpec(arch=arch, num_layers=sc.num_layers, hidden_size=sc.hidden_size, num_heads=sc.num_heads,
                           intermediate_size=sc.intermediate_size, vocab_size=tcfg.vocab_size,
                           max_position_embeddings=tcfg.max_position_embeddings,
                           type_vocab_size=tcfg.type_vocab_size,
                           use_task_id=bool(getattr(tcfg, "use_task_id", False)),
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
        if full.config.vocab_size != self.teacher.config.vocab_size:
            raise DataError(source, f"student.init_from has a vocabulary of {full.config.vocab_size} but the teacher "
                            f"has {self.teacher.config.vocab_size}; they must share one tokenizer")
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
        student.embeddings.load_state_dict(full.embeddings.state_dict())
        for s_i, t_l in enumerate(layers):
            t_i = resolve_layer(t_l, n_t)
            student.encoder.layer[s_i].load_state_dict(full.encoder.layer[t_i].state_dict())
        if getattr(full, "pooler", None) is not None and getattr(student, "pooler", None) is not None:
            student.pooler.load_state_dict(full.pooler.state_dict())
        del full

    def setup(self) -> None:
        cfg = self.cfg
        self._build_teacher()
        student = self._build_student()
        if student.config.vocab_size != self.teacher.config.vocab_size:
            raise DataError(cfg.teacher, "teacher and student vocabularies differ")
        if len(self.tokenizer) > self.teacher.config.vocab_size:
            raise DataError(cfg.teacher, f"the tokenizer has {len(self.tokenizer)} tokens but the teacher's "
                            f"embedding has {self.teacher.config.vocab_size} rows")
        # The student's pooler never receives a gradient from these losses: freeze it so
        # every optimizer (and ZeRO) sees only parameters that train.
        if getattr(student, "pooler", None) is not None:
            student.pooler.requires_grad_(False)
        s_layers = student.config.num_hidden_layers
        s_idx = resolve_layer(cfg.loss.student_layer or s_layers, s_layers)
        losses = nn.ModuleDict()
        weights = {k: v for k, v in cfg.loss.weights.items() if v > 0}
        t_heads = self.teacher.config.num_attention_heads
        rel_heads = cfg.loss.num_relation_heads or t_heads
        for name in weights:
            if name == "minilmv2":
                losses[name] = MiniLMv2RelationLoss(rel_heads, relations=tuple(cfg.loss.relations),
                                                    chunk_size=cfg.loss.chunk_size or None, impl=cfg.loss.impl)
                _check_divisible(rel_heads, self.teacher.config.hidden_size, student.config.hidden_size)
            elif name == "minilm_v1":
                losses[name] = MiniLMv1Loss(student_heads=student.config.num_attention_heads, teacher_heads=t_heads,
                                            chunk_size=cfg.loss.chunk_size or None)
            elif name == "tinybert":
                same_heads = student.config.num_attention_heads == t_heads
                losses[name] = TinyBERTLoss(student.config.hidden_size, self.teacher.config.hidden_size,
                                            layer_pairs=[(s_idx, self.teacher_idx)],
                                            student_heads=t_heads if same_heads else None,
                                            teacher_heads=t_heads if same_heads else None)
            elif name == "logit_kd":
                losses[name] = LogitKDLoss(cfg.loss.temperature)
        mlm_head = None
        if "logit_kd" in weights:
            mlm_head, self.teacher_mlm = self._mlm_heads(student)
        module = StudentWithLoss(student, losses, weights, s_idx, mlm_head,
                                 activation_checkpointing=cfg.student.activation_checkpointing)
        self.student_idx = s_idx

        world = int(os.environ.get("WORLD_SIZE", "1"))
        ds = load_ds_config(resolve_ds_config(cfg.ds_config), world)
        optim = OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_ratio=cfg.warmup_ratio, decay=cfg.decay,
                            impl=cfg.optimizer)
        # The BERT recipe's two groups: no weight decay on biases and LayerNorm weights.
        self.engine = Engine(module, ds, optim, total_steps=cfg.max_steps,
                             params=param_groups(module, cfg.weight_decay), max_nonfinite=cfg.max_nonfinite)
        eng = self.engine
        self.module = eng.module
        # On a CPU with native bf16 a bf16 job runs its frozen teacher in bf16 too (as on GPUs);
        # the relation statistics stay fp32 in the losses.
        t_dtype = teacher_dtype(self.device, eng.compute_dtype)
        if self.device.type == "cpu" and t_dtype != torch.float32:
            self.teacher.to(t_dtype)
            if getattr(self, "teacher_mlm", None) is not None:
                self.teacher_mlm.to(t_dtype)
        self.cpu_accel = {
            "teacher": accelerate_cpu(self.teacher, trained=False, cpu_accel=cfg.cpu_accel, what="teacher"),
            "student": accelerate_cpu(self.module, trained=True, cpu_accel=cfg.cpu_accel, what="student")}
        self.loader = build_loader(cfg.corpus, self.tokenizer, batch_size=eng.micro_batch_size, rank=eng.rank,
                                   world_size=eng.world_size)
        self.state: Dict[str, Any] = {"step": 0, "micro_step": 0, "tokens": 0, "samples": 0, "nonfinite_total": 0}
        self._meter: Optional[Throughput] = None   # train()'s, for _sync_counts
        if cfg.resume:
            client = eng.load_checkpoint(self.ckpt_dir)
            if client is not None:
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
        log.info("distill: teacher %s (%d of %d layers run, layer %d read, %s), student %d layers/%d hidden "
                 "(%.1fM params), relation heads %d, global batch %d, seq %d, %s", cfg.teacher, self.teacher_layer,
                 self.teacher_full_layers, self.teacher_layer, self.teacher.dtype if hasattr(self.teacher, "dtype")
                 else "", student.config.num_hidden_layers, student.config.hidden_size, self.student_params / 1e6,
                 rel_heads, eng.train_batch_size, cfg.corpus.seq_length, eng.compute_dtype)
        if "minilmv2" in weights:
            log.info("distill: relation KL %s", describe_relation_kl(cfg.loss.impl, self.device, eng.micro_batch_size,
                                                                      rel_heads, cfg.corpus.seq_length,
                                                                      cfg.loss.chunk_size or None))

    def _mlm_heads(self, student: nn.Module):
        from transformers import AutoModelForMaskedLM
        from transformers.models.bert.modeling_bert import BertOnlyMLMHead

        try:
            t_mlm = AutoModelForMaskedLM.from_pretrained(self.cfg.teacher, local_files_only=True,
                                                          dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - reported with the directory
            raise DataError(self.cfg.teacher, f"logit_kd needs a teacher with an MLM head: {e}") from None
        t_head = t_mlm.cls if hasattr(t_mlm, "cls") else None
        if t_head is None:
            raise DataError(self.cfg.teacher, "logit_kd needs a teacher with an MLM head (cls.predictions)")
        t_head = prepare_frozen(t_head, self.device, teacher_dtype(self.device))
        s_head = BertOnlyMLMHead(student.config)
        s_head.predictions.decoder.weight = student.embeddings.word_embeddings.weight  # tied, as BERT
        return s_head, t_head

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _teacher_forward(self, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        self.teacher_capture.clear()
        out = self.teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"])
        res: Dict[str, Any] = {"qkv": dict(self.teacher_capture.captured[self.teacher_idx])}
        if "tinybert" in self.module.losses:
            # The truncated teacher's last hidden state is the distilled layer's output.
            res["hidden"] = {self.teacher_idx: out.last_hidden_state}
            res["qkv_by_layer"] = {self.teacher_idx: res["qkv"]}
        if "logit_kd" in self.module.losses:
            res["logits"] = self.teacher_mlm(out.last_hidden_state)
            res["mlm_mask"] = batch["mlm_mask"]
        return res

    def _mask_for_mlm(self, batch: Dict[str, torch.Tensor]) -> None:
        """logit_kd: mask tokens (BERT's 80/10/10) so the MLM logits carry signal."""
        ids = batch["input_ids"]
        special = torch.zeros_like(ids, dtype=torch.bool)
        for sid in (self.tokenizer.cls_token_id, self.tokenizer.sep_token_id, self.tokenizer.pad_token_id):
            if sid is not None:
                special |= ids == sid
        g = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.state["micro_step"] * 31 + self.engine.rank)
        probs = torch.rand(ids.shape, generator=g)
        mask = (probs < self.cfg.mask_prob) & ~special.cpu()
        ids = ids.clone()
        ids[mask.to(ids.device)] = self.tokenizer.mask_token_id
        batch["input_ids"] = ids
        batch["mlm_mask"] = mask.to(ids.device)

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
                    if batch is None:
                        log.warning("the corpus ended after %d steps (corpus.epochs=%d); stopping early",
                                    st["step"], cfg.corpus.epochs)
                        break
                    # This rank's counts, on the host copy: on a GPU, counting the device mask
                    # would wait for the queued work every micro step.
                    n_samples = batch["input_ids"].shape[0]
                    n_tokens = int(batch["attention_mask"].sum())
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()
                             if isinstance(v, torch.Tensor)}
                if "logit_kd" in self.module.losses:
                    self._mask_for_mlm(batch)
                torch.manual_seed(cfg.seed * 1_000_003 + st["micro_step"] * 1009 + eng.rank)
                teacher_out = self._teacher_forward(batch)
                parts = eng(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            token_type_ids=batch["token_type_ids"], teacher=teacher_out)
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
            "teacher_layers_total": self.teacher_full_layers, "student_layer": self.student_idx + 1,
            "student_params": self.student_params, "teacher_params": self.teacher_params,
            "steps": self.state["step"], "tokens": self.state["tokens"], "samples": self.state["samples"],
            "final_losses": last, "nonfinite_losses": self.state["nonfinite_total"],
            "throughput": {**throughput, "memory_kind": memory_kind(eng.device)},
            "cpu_accel": self.cpu_accel, "train_time_s": elapsed,
            "corpus_stats": self.loader.stats,  # this rank's stream: documents, skips, truncations
        }
        if eng.is_main:
            student = self.module.student
            if state is not None:
                prefix = "student."
                sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
                save_encoder(student, self.out / "student", state_dict=sd)
            else:
                save_encoder(student, self.out / "student")
            self.tokenizer.save_pretrained(self.out / "student")
            write_json(self.out / "student" / "distill_info.json", result)
            write_json(self.out / "metrics.json", result)
        dist.barrier()
        return result

    def cleanup(self) -> None:
        if self.logger is not None:
            self.logger.close()
        if getattr(self, "rank_log", None) is not None:
            close_log_file(self.rank_log)

    def run(self) -> Dict[str, Any]:
        try:
            self.setup()
            return self.train()
        finally:
            self.cleanup()


def _set_dropout(model: nn.Module, hidden: float, attention: float) -> None:
    """Set dropout rates on an already built encoder (modules keep the rate they were built with)."""
    model.config.hidden_dropout_prob = hidden
    model.config.attention_probs_dropout_prob = attention
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout):
            module.p = attention if name.endswith("attention.self.dropout") else hidden


def _check_divisible(r: int, t_hidden: int, s_hidden: int) -> None:
    for name, h in (("teacher", t_hidden), ("student", s_hidden)):
        if h % r:
            raise ConfigError("loss.num_relation_heads", f"{r} relation heads do not divide the {name} hidden "
                              f"size {h}; pick a divisor of both {t_hidden} and {s_hidden}")


def run_distill(cfg: DistillConfig) -> Dict[str, Any]:
    return DistillRecipe(cfg).run()
