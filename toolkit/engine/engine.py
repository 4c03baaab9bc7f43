"""The training engine: one object around ``deepspeed.initialize`` for every recipe.

Works in a plain ``python`` process (a world of one) and under ``deepspeed`` / ``torchrun``
/ ``srun``. The DeepSpeed JSON owns micro batch, accumulation, precision and ZeRO; the job
YAML owns the optimizer and LR schedule (:class:`OptimConfig`), which are built here and
handed to DeepSpeed. The default AdamW is torch's fused kernel, so no DeepSpeed op has to be
compiled; ``optim.impl`` picks DeepSpeed's or apex's fused Adam instead
(``benchmarks/bench_optimizer.py`` times them side by side).
"""
from __future__ import annotations

import collections
import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import nn

from toolkit.config import arg
from toolkit.engine import dist
from toolkit.engine.checkpoint import find_checkpoint, read_client_state, read_marker, write_atomic
from toolkit.engine.ds_config import load_ds_config
from toolkit.engine.precision import resolve_precision
from toolkit.engine.schedule import DECAYS, build_scheduler
from toolkit.errors import ConfigError, ToolkitError, TrainingError
from toolkit.utils.logging import get_logger

log = get_logger("engine")


#: AdamW implementations ``optim.impl`` accepts (benchmarks/bench_optimizer.py times them).
OPTIMIZER_IMPLS = ("auto", "torch_fused", "torch_foreach", "deepspeed", "apex")
OPTIMIZER_HELP = ("auto (torch fused where the device has it, else foreach) | torch_fused | torch_foreach | "
                  "deepspeed (FusedAdam on GPUs, DeepSpeedCPUAdam on CPUs; compiled on first use) | "
                  "apex (NVIDIA apex FusedAdam, GPUs, when installed)")


def check_optimizer_impl(impl: Any, field: str) -> None:
    """ConfigError naming ``field`` unless ``impl`` is one of :data:`OPTIMIZER_IMPLS`."""
    if impl not in OPTIMIZER_IMPLS:
        raise ConfigError(field, f"unknown AdamW implementation {impl!r}; choose one of {', '.join(OPTIMIZER_IMPLS)}")


@dataclass
class OptimConfig:
    """AdamW and LR schedule: the ``optim:`` section of the teacher, distill, finetune and eval jobs."""

    lr: float = arg(5e-5, help="peak learning rate")
    head_lr_scale: float = arg(1.0, help="learning rate of the task heads as a multiple of lr: a freshly "
                               "initialised head may learn faster than the pretrained encoder under it "
                               "(task models only)")
    weight_decay: float = arg(0.01, help="AdamW weight decay (not applied to biases and LayerNorm)")
    betas: Tuple[float, float] = arg((0.9, 0.999), help="AdamW betas")
    eps: float = arg(1e-8, help="AdamW epsilon")
    warmup_steps: int = arg(0, help="linear warmup steps (wins over warmup_ratio when > 0)")
    warmup_ratio: float = arg(0.0, help="warmup as a fraction of total steps")
    decay: str = arg("linear", help="decay after warmup: linear, cosine or constant")
    min_lr_ratio: float = arg(0.0, help="final LR as a fraction of the peak")
    max_grad_norm: Optional[float] = arg(None, help="gradient clipping; empty = gradient_clipping of the DS JSON")
    impl: str = arg("auto", help="AdamW implementation: " + OPTIMIZER_HELP)

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError("optim.betas", f"must be two numbers in [0, 1), got {self.betas}")
        if self.lr <= 0:
            raise ConfigError("optim.lr", f"must be > 0, got {self.lr}")
        if not self.head_lr_scale > 0:
            raise ConfigError("optim.head_lr_scale", f"must be > 0, got {self.head_lr_scale}")
        if self.weight_decay < 0 or self.eps <= 0:
            raise ConfigError("optim.weight_decay", "weight_decay must be >= 0 and eps > 0")
        if self.decay not in DECAYS:
            raise ConfigError("optim.decay", f"unknown decay {self.decay!r}; choose one of {sorted(DECAYS)}")
        if self.warmup_steps < 0 or not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError("optim.warmup_ratio", "warmup_steps must be >= 0 and warmup_ratio in [0, 1)")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ConfigError("optim.max_grad_norm", f"must be >= 0 (0 = off), got {self.max_grad_norm}")
        check_optimizer_impl(self.impl, "optim.impl")


def _no_decay(name: str, p: torch.Tensor) -> bool:
    # Biases and norm weights are 1-D; decaying them only hurts (BERT recipe).
    return p.ndim < 2 or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float, lr: Optional[float] = None,
                 head_lr_scale: float = 1.0) -> List[Dict[str, Any]]:
    """AdamW groups: decayed matrices/embeddings and undecayed biases/LayerNorm.

    With ``head_lr_scale`` other than 1, the parameters of ``model.heads`` (the task heads of a
    :class:`~toolkit.models.task_model.MultiTaskModel`) form their own two groups at
    ``lr * head_lr_scale``; the schedule scales every group alike.
    """
    heads = getattr(model, "heads", None)
    split = head_lr_scale != 1.0
    if split:
        if lr is None:
            raise ValueError("param_groups: head_lr_scale needs lr")
        if not isinstance(heads, nn.Module) or not any(p.requires_grad for p in heads.parameters()):
            raise ConfigError("optim.head_lr_scale", f"{type(model).__name__} has no task heads to scale; "
                              "leave head_lr_scale at 1 for this job")
    head_ids = {id(p) for p in heads.parameters()} if split else set()
    buckets: Dict[Tuple[bool, bool], List[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((id(p) in head_ids, _no_decay(name, p)), []).append(p)
    groups = []
    for is_head in (False, True):
        for nd in (False, True):
            if buckets.get((is_head, nd)):
                g: Dict[str, Any] = {"params": buckets[(is_head, nd)], "weight_decay": 0.0 if nd else weight_decay}
                if is_head:
                    g["lr"] = lr * head_lr_scale
                groups.append(g)
    return groups


def _first_device(groups: List[Any]) -> torch.device:
    first = groups[0]
    tensors = first["params"] if isinstance(first, dict) else groups
    return next(iter(tensors)).device


def build_optimizer(model: nn.Module, optim: OptimConfig,
                    params: Optional[Iterable[Any]] = None) -> torch.optim.Optimizer:
    """The AdamW of ``optim.impl`` over ``params`` (default: :func:`param_groups` of ``model``).

    ``auto`` is torch's fused AdamW where the parameters' device has it, else foreach: no op to
    compile, and on CPUs as fast as DeepSpeedCPUAdam (``benchmarks/bench_optimizer.py``
    compares them on a given machine). ``torch_fused``, ``deepspeed`` and
    ``apex`` raise a ConfigError naming ``optim.impl`` (the job YAML field) when they cannot run here.
    """
    if params is not None and optim.head_lr_scale != 1.0:
        raise ConfigError("optim.head_lr_scale", "this job builds its own parameter groups and has no task heads; "
                          "leave head_lr_scale at 1")
    groups: Any = (list(params) if params is not None
                   else param_groups(model, optim.weight_decay, optim.lr, optim.head_lr_scale))
    if not groups:
        raise ConfigError("params", "the model has no trainable parameters (all requires_grad=False?)")
    kw = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    impl = optim.impl
    device = _first_device(groups)
    if impl == "torch_foreach":
        return torch.optim.AdamW(groups, foreach=True, **kw)
    if impl == "torch_fused":
        try:
            return torch.optim.AdamW(groups, fused=True, **kw)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise ConfigError("optim.impl", f"torch's fused AdamW cannot run on {device.type} parameters here "
                              f"({exc}); use auto or torch_foreach") from None
    if impl == "deepspeed":
        return _deepspeed_adam(groups, device, kw)
    if impl == "apex":
        return _apex_adam(groups, device, kw)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kw)


def _deepspeed_adam(groups: Any, device: torch.device, kw: Dict[str, Any]) -> torch.optim.Optimizer:
    """DeepSpeed's AdamW: FusedAdam (CUDA) or DeepSpeedCPUAdam (CPU); both compile an op once."""
    try:
        if device.type == "cuda":
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(groups, adam_w_mode=True, **kw)
        if device.type == "cpu":
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    except Exception as exc:  # an op that fails to compile or load: say which and what to do
        raise ConfigError("optim.impl", f"DeepSpeed's Adam op could not be built or loaded on {device.type} "
                          f"({type(exc).__name__}: {exc}); use optim.impl: auto (torch's fused AdamW, "
                          f"no compile)") from None
    raise ConfigError("optim.impl", f"deepspeed has no Adam for {device.type} parameters; use auto")


def _apex_adam(groups: Any, device: torch.device, kw: Dict[str, Any]) -> torch.optim.Optimizer:
    """NVIDIA apex's FusedAdam in AdamW mode (optional; CUDA only)."""
    try:
        from apex.optimizers import FusedAdam
    except ImportError:
        raise ConfigError("optim.impl", "apex was asked for, but NVIDIA apex (apex.optimizers) is not importable; "
                          "install it from github.com/NVIDIA/apex (the PyPI package named 'apex' is an "
                          "unrelated library) or use optim.impl: auto") from None
    if device.type != "cuda":
        raise ConfigError("optim.impl", f"apex's FusedAdam runs on CUDA parameters, these are on {device.type}; "
                          f"use optim.impl: auto")
    return FusedAdam(groups, adam_w_mode=True, **kw)


def prepare_frozen(model: nn.Module, device: Union[str, torch.device], dtype: torch.dtype) -> nn.Module:
    """Move a frozen model (the teacher) to ``device``/``dtype``, eval mode, no grads.

    No optimizer or DeepSpeed engine: a frozen model only needs forward passes.
    """
    model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


class Engine:
    """DeepSpeed engine with the toolkit's optimizer, schedule, checks and checkpoints.

    Args:
        model: the trainable module (student / task model).
        ds_config: path to a DeepSpeed JSON or its dict.
        optim: optimizer and schedule settings.
        total_steps: optimizer steps of the run (for the LR schedule).
        params: optional parameters / param groups to optimize instead of ``model``'s.
        max_nonfinite: raise TrainingError after this many consecutive non-finite losses.
    """

    def __init__(self, model: nn.Module, ds_config: Union[str, Path, Dict[str, Any]],
                 optim: Optional[OptimConfig] = None, total_steps: int = 1,
                 params: Optional[Iterable[Any]] = None, *, max_nonfinite: int = 20):
        import deepspeed

        optim = optim or OptimConfig()
        dist.ensure_env()
        dist.init_distributed()
        self._device = (torch.device("cuda", dist.device_index()) if torch.cuda.is_available()
                        else torch.device("cpu"))
        cfg = load_ds_config(ds_config, dist.world_size())
        cfg, self._dtype, self.precision_note = resolve_precision(cfg, self._device)
        if optim.max_grad_norm is not None:
            cfg["gradient_clipping"] = float(optim.max_grad_norm)
        # DeepSpeed's own step printing and timers only add noise; RunLogger logs.
        cfg.setdefault("steps_per_print", 10 ** 9)
        cfg.setdefault("wall_clock_breakdown", False)
        zero = cfg.get("zero_optimization", {})
        if (zero.get("offload_optimizer") or {}).get("device", "none") != "none":
            # We hand DeepSpeed a torch AdamW (fused CPU kernel, no extension build);
            # DeepSpeed refuses a client optimizer with offload unless told otherwise.
            cfg.setdefault("zero_force_ds_cpu_optimizer", False)
        self.ds_config = cfg
        self.optim = optim
        self.total_steps = int(total_steps)
        self.max_nonfinite = int(max_nonfinite)
        self.nonfinite_total = 0
        self.nonfinite_consecutive = 0
        self._skip_pending = False
        self._window_open = False   # a backward ran since the last optimizer step

        model.to(self._device)
        optimizer = build_optimizer(model, optim, params)
        scheduler = build_scheduler(optimizer, self.total_steps, optim.warmup_steps, optim.warmup_ratio,
                                    optim.decay, optim.min_lr_ratio)
        self._ds, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                 config=cfg)
        log.info("engine: world %d, micro batch %d x accum %d = global batch %d, ZeRO-%d, %s",
                 self.world_size, self.micro_batch_size, self.grad_accum, self.train_batch_size,
                 self.zero_stage, str(self._dtype).replace("torch.", ""))

    # ----- read-back of engine settings -------------------------------------------------
    @property
    def ds(self) -> Any:
        """The underlying ``DeepSpeedEngine`` (escape hatch; prefer the methods here)."""
        return self._ds

    @property
    def micro_batch_size(self) -> int:
        return int(self._ds.train_micro_batch_size_per_gpu())

    @property
    def grad_accum(self) -> int:
        return int(self._ds.gradient_accumulation_steps())

    @property
    def train_batch_size(self) -> int:
        """Global batch: micro batch x accumulation x world size."""
        return int(self._ds.train_batch_size())

    @property
    def world_size(self) -> int:
        return dist.world_size()

    @property
    def rank(self) -> int:
        return dist.rank()

    @property
    def local_rank(self) -> int:
        return dist.local_rank()

    @property
    def is_main(self) -> bool:
        return dist.is_main()

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def zero_stage(self) -> int:
        return int(self._ds.zero_optimization_stage())

    @property
    def global_step(self) -> int:
        """Optimizer steps done (restored by :meth:`load_checkpoint`)."""
        return int(self._ds.global_steps)

    @property
    def lr(self) -> float:
        return float(self._ds.get_lr()[0])

    @property
    def grad_norm(self) -> Optional[float]:
        """Global gradient norm of the last optimizer step, when DeepSpeed computed one."""
        g = self._ds.get_global_grad_norm()
        return None if g is None else float(g)

    @property
    def module(self) -> nn.Module:
        """The unwrapped model (partitioned parameters under ZeRO-3)."""
        return self._ds.module

    # ----- training ----------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._ds(*args, **kwargs)

    def train(self) -> "Engine":
        self._ds.train()
        return self

    def eval(self) -> "Engine":
        self._ds.eval()
        return self

    def backward(self, loss: torch.Tensor) -> bool:
        """Backward of a scalar loss; False (and no backward) when it is not finite on any rank.

        A skipped micro-batch is dropped: the following :meth:`step` does nothing, so the
        accumulation window simply waits for one more good micro-batch.
        """
        bad = torch.tensor([0.0 if bool(torch.isfinite(loss.detach()).all()) else 1.0], device=self._device)
        # All ranks must agree, or one would enter the gradient all-reduce alone and hang.
        if dist.all_reduce_sum(bad).item() > 0:
            self.nonfinite_total += 1
            self.nonfinite_consecutive += 1
            self._skip_pending = True
            log.warning("non-finite loss at step %d (%d in a row, %d in total): micro-batch skipped",
                        self.global_step, self.nonfinite_consecutive, self.nonfinite_total)
            if self.nonfinite_consecutive >= self.max_nonfinite:
                raise TrainingError(
                    f"{self.nonfinite_consecutive} non-finite losses in a row at step {self.global_step}: "
                    f"training diverged. Checkpoints are intact; resume from the last one with a lower "
                    f"lr, longer warmup, gradient clipping or fp32/bf16 instead of fp16.")
            return False
        self.nonfinite_consecutive = 0
        self._skip_pending = False
        if not self._window_open:
            self._clear_stale_zero3_grads()
            self._window_open = True
        self._ds.backward(loss)
        return True

    def _clear_stale_zero3_grads(self) -> None:
        """Zero ZeRO-3's gradient partitions before the first backward of an accumulation window.

        ZeRO-3 (DeepSpeed 0.19) writes a parameter's reduced gradient into its slot of one flat
        buffer only when the parameter took part in the backward; the slot of a parameter that got
        no gradient in this window (the head of a task that is not in the batch) keeps the previous
        window's gradient, and the optimizer applies it again. Stages 0-2 hand such a parameter a
        zero gradient. Zeroing the buffer makes ZeRO-3 do the same, so every stage trains alike.
        """
        if self.zero_stage != 3:
            return
        buf = getattr(self._ds.optimizer, "grad_partitions_flat_buffer", None)
        if isinstance(buf, torch.Tensor):
            buf.zero_()

    def step(self) -> bool:
        """Finish a micro-batch; True when this was an accumulation boundary (optimizer step)."""
        if self._skip_pending:
            self._skip_pending = False
            return False
        boundary = bool(self._ds.is_gradient_accumulation_boundary())
        self._ds.step()
        if boundary:
            self._window_open = False
        return boundary

    # ----- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self, ckpt_dir: Union[str, Path], tag: str, client_state: Optional[Dict[str, Any]] = None,
                        keep_last: Optional[int] = None) -> Path:
        """Atomically save model, optimizer, scheduler and this rank's ``client_state``.

        All ranks must call it. Returns ``ckpt_dir/<tag>``.
        """
        def payload(tmp: Path) -> None:
            self._ds.save_checkpoint(str(tmp), tag=tag, client_state={}, save_latest=False)

        meta = {"global_step": self.global_step, "zero_stage": self.zero_stage, "ds_tag": tag}
        path = write_atomic(ckpt_dir, tag, payload, client_state, rank=self.rank, world_size=self.world_size,
                            barrier=dist.barrier, keep_last=keep_last, meta=meta)
        log.info("saved checkpoint %s (step %d)", path, self.global_step)
        return path

    def load_checkpoint(self, ckpt_dir: Union[str, Path], tag: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """Restore the newest complete checkpoint (or ``tag``); returns this rank's client state.

        Returns None when ``ckpt_dir`` holds no complete checkpoint. All ranks must call it.
        Under ZeRO-3 call it on a freshly built engine.
        """
        found: Tuple[str, Optional[str]] = ("ok", None)
        if self.is_main:
            try:
                p = find_checkpoint(ckpt_dir, tag)
                found = ("ok", str(p) if p is not None else None)
            except ToolkitError as e:
                found = ("err", str(e))
        # Rank 0 decides so every rank loads the same checkpoint.
        found = dist.broadcast_object(found)
        if found[0] == "err":
            raise ToolkitError(found[1])
        if found[1] is None:
            return None
        path = Path(found[1])
        marker = read_marker(path)
        ds_tag = str(marker.get("ds_tag", marker["tag"]))
        try:
            load_path, _ = self._ds.load_checkpoint(str(path), tag=ds_tag)
        except (RuntimeError, AssertionError, KeyError, ValueError) as e:
            saved_ws = marker.get("world_size")
            hint = (f" It was saved with world size {saved_ws}, this run has {self.world_size}."
                    if saved_ws not in (None, self.world_size) else "")
            if "parameter group" in str(e):
                hint += (" The optimizer's parameter groups differ from the run that saved it (optim.head_lr_scale "
                         "splits off the heads): resume with that run's optim settings, or use a new output_dir.")
            raise ToolkitError(f"{path}: cannot load checkpoint: {type(e).__name__}: {e}.{hint}") from None
        if load_path is None:
            raise ToolkitError(f"{path}: DeepSpeed found no checkpoint tag {ds_tag!r} inside")
        self._skip_pending = False
        self._window_open = False
        self.nonfinite_consecutive = 0
        log.info("resumed from %s (step %d)", path, self.global_step)
        return read_client_state(path, self.rank)

    def consolidated_state_dict(self, all_ranks: bool = False) -> Optional[Dict[str, torch.Tensor]]:
        """Full fp32 weights (CPU tensors) on rank 0, None elsewhere; all ranks must call it.

        Under ZeRO-3 parameters are gathered one at a time; in bf16/fp16 the fp32 master
        copies are returned, not the half-precision model weights. ``all_ranks``: every rank
        gets the full copy (each holds one model's worth of CPU memory).
        """
        module = self._ds.module
        main = self.is_main or all_ranks
        if self.zero_stage < 3 and self._dtype == torch.float32:
            if not main:
                return None
            return collections.OrderedDict((k, v.detach().cpu().clone()) for k, v in module.state_dict().items())

        import deepspeed
        from deepspeed.utils import safe_get_full_fp32_param

        full: Dict[int, torch.Tensor] = {}
        names: Dict[str, int] = {}
        for name, p in module.named_parameters(remove_duplicate=False):
            names[name] = id(p)
            if id(p) in full:
                continue  # tied weight, already gathered
            value = None
            if p.requires_grad:
                try:
                    value = safe_get_full_fp32_param(p)
                except AttributeError:
                    value = None
            if value is None:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    value = p.detach()
                    value = value.float().cpu().clone() if main else value
            full[id(p)] = value.detach().float().cpu().clone() if main else torch.empty(0)
        if not main:
            return None
        out: Dict[str, torch.Tensor] = collections.OrderedDict()
        for k, v in module.state_dict(keep_vars=True).items():
            out[k] = full[names[k]] if k in names else v.detach().cpu().clone()
        return out

    def close(self) -> None:
        """Release DeepSpeed's hooks and buffers and this engine's model and optimizer.

        For processes that build many engines one after another (``toolkit eval``'s grid of
        fine-tuning runs): without it each engine's ZeRO hooks, pinned buffers and optimizer
        state can outlive it (deepspeedai/DeepSpeed#5143). The engine is unusable afterwards.
        """
        ds = self.__dict__.pop("_ds", None)
        if ds is None:
            return
        try:
            ds.destroy()
        except Exception as exc:  # noqa: BLE001 - best effort; the caller is done with the engine
            log.debug("DeepSpeed engine destroy() failed: %s", exc)
        del ds
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def load_full_state_dict(self, state: Optional[Dict[str, torch.Tensor]]) -> None:
        """Put full weights (e.g. the best checkpoint's) into the model on every rank; all ranks
        must call it. Below ZeRO-3 every rank needs ``state``; under ZeRO-3 rank 0's is
        scattered to the partitions (the others may pass None). The optimizer's fp32 masters
        are not touched: use it for evaluation and prediction after training."""
        module = self._ds.module
        if self.zero_stage < 3:
            if state is None:
                raise ToolkitError(f"rank {self.rank}: load_full_state_dict below ZeRO-3 needs the state on "
                                   f"every rank (consolidated_state_dict(all_ranks=True))")
            module.load_state_dict(state, strict=False)
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=0):
            if self.is_main:
                if state is None:
                    raise ToolkitError("load_full_state_dict: rank 0 has no state to load")
                module.load_state_dict(state, strict=False)
