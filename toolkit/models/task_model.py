"""A shared encoder with one head per task, and its save/load format.

Directory layout written by :func:`save_task_model`::

    config.json, model.safetensors   the encoder (``AutoModel.from_pretrained`` loads it)
    tokenizer files                  ``tokenizer.save_pretrained``
    heads.safetensors                head weights, keys ``<task>.<param>``
    heads.json                       {"format": 1, "heads": {task: head spec}, "extra": {...}}

A directory without ``heads.json`` (e.g. a distilled student) loads with no heads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from toolkit.errors import ConfigError, DataError, ToolkitError
from toolkit.models.encoder import Encoder, build_encoder, load_tokenizer, save_encoder, uses_task_id
from toolkit.models.heads import build_head
from toolkit.tasks.base import MULTIPLE_CHOICE

HEADS_WEIGHTS = "heads.safetensors"
HEADS_META = "heads.json"
_FORMAT = 1


@dataclass
class TaskOutput:
    """Result of :meth:`MultiTaskModel.forward`.

    Attributes:
        loss: scalar, or None when no labels were given.
        logits: the head's logits (shapes in :mod:`toolkit.models.heads`).
    """

    loss: Optional[torch.Tensor]
    logits: torch.Tensor


class MultiTaskModel(nn.Module):
    """One encoder shared by every task, one head per task name.

    Args:
        encoder: ``BertModel`` / ``ErnieModel``.
        heads: task name -> head module (may be empty; add with :meth:`add_head`).
        head_specs: task name -> ``{"task_type", "num_labels", "labels", "dropout"}``, kept for saving.
    """

    def __init__(self, encoder: Encoder, heads: Optional[Dict[str, nn.Module]] = None,
                 head_specs: Optional[Dict[str, Dict[str, Any]]] = None):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict()
        self.head_specs: Dict[str, Dict[str, Any]] = {}
        # heads.json "extra" of a loaded model (metrics, run config); saved again by the caller.
        self.extra: Dict[str, Any] = {}
        heads = heads or {}
        head_specs = head_specs or {}
        for name, head in heads.items():
            if name not in head_specs:
                raise ConfigError(f"heads.{name}", "has no entry in head_specs (task_type, num_labels, labels)")
            self._put(name, head, head_specs[name])

    @property
    def config(self):
        return self.encoder.config

    @property
    def task_names(self) -> List[str]:
        return list(self.heads.keys())

    def _put(self, name: str, head: nn.Module, spec: Dict[str, Any]) -> None:
        if not name or "." in name:
            raise ConfigError("task", f"task name {name!r} cannot name a head (empty or contains '.')")
        self.heads[name] = head
        self.head_specs[name] = {"task_type": spec["task_type"], "num_labels": int(spec["num_labels"]),
                                 "labels": list(spec["labels"]) if spec.get("labels") is not None else None,
                                 "dropout": float(spec.get("dropout", 0.1))}

    def add_head(self, task_name: str, task_type: str, num_labels: int, labels: Optional[List[str]] = None,
                 dropout: float = 0.1) -> nn.Module:
        """Create and attach a freshly initialised head for ``task_name``; returns it."""
        cfg = self.encoder.config
        head = build_head(task_type, cfg.hidden_size, num_labels, dropout=dropout,
                          initializer_range=getattr(cfg, "initializer_range", 0.02))
        ref = next(self.encoder.parameters())
        head.to(device=ref.device, dtype=ref.dtype)
        self._put(task_name, head, {"task_type": task_type, "num_labels": num_labels, "labels": labels,
                                    "dropout": dropout})
        return head

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               token_type_ids: Optional[torch.Tensor] = None,
               task_type_ids: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the encoder on ``[N, L]`` inputs -> (sequence ``[N, L, H]``, pooled ``[N, H]``)."""
        kwargs: Dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if uses_task_id(self.encoder):
            kwargs["task_type_ids"] = task_type_ids if task_type_ids is not None else torch.zeros_like(input_ids)
        out = self.encoder(**kwargs)
        return out.last_hidden_state, out.pooler_output

    def forward(self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None,
                task_type_ids: Optional[torch.Tensor] = None,
                choice_mask: Optional[torch.Tensor] = None) -> TaskOutput:
        """Encode and apply ``task``'s head.

        Args:
            task: a name in :attr:`task_names`.
            input_ids, attention_mask, token_type_ids, task_type_ids: ``[B, L]``, or
                ``[B, C, L]`` for multiple choice.
            labels: see the head (``[B]``, ``[B, 2]`` for span, ``[B, L]`` for tokens).
            choice_mask: ``[B, C]``, 1 for real choices (multiple choice only).
        """
        if task not in self.heads:
            raise ToolkitError(f"model has no head for task '{task}' (heads: {', '.join(self.heads) or 'none'})")
        head = self.heads[task]
        extra: Dict[str, Any] = {}
        if self.head_specs[task]["task_type"] == MULTIPLE_CHOICE:
            num_choices = input_ids.size(1)
            extra["num_choices"] = num_choices

            def flat(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
                return None if t is None else t.reshape(-1, t.size(-1))

            input_ids, attention_mask = flat(input_ids), flat(attention_mask)
            token_type_ids, task_type_ids = flat(token_type_ids), flat(task_type_ids)
            if choice_mask is not None:
                extra["choice_mask"] = choice_mask
        seq, pooled = self.encode(input_ids, attention_mask, token_type_ids, task_type_ids)
        logits = head(seq, pooled, attention_mask=attention_mask, **extra)
        loss = head.loss(logits, labels, attention_mask=attention_mask, **extra) if labels is not None else None
        return TaskOutput(loss=loss, logits=logits)


def save_task_model(model: MultiTaskModel, tokenizer: Any, out_dir: Union[str, Path],
                    extra: Optional[Dict[str, Any]] = None,
                    state_dict: Optional[Dict[str, torch.Tensor]] = None) -> Path:
    """Write encoder (safetensors), tokenizer and heads to ``out_dir``; returns it.

    Args:
        model: the model whose structure (and, without ``state_dict``, weights) is saved.
        tokenizer: saved alongside (None to skip).
        out_dir: created if needed.
        extra: JSON-serialisable data (e.g. task metrics, run config) kept in heads.json.
        state_dict: a full ``MultiTaskModel`` state dict to save instead of the live weights,
            e.g. gathered from ZeRO-3 shards (keys ``encoder.*`` / ``heads.<task>.*``, an
            optional ``module.`` prefix is stripped).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is not None:
        full = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
        enc_state = {k[len("encoder."):]: v for k, v in full.items() if k.startswith("encoder.")}
        if not enc_state:
            raise ToolkitError(f"{out}: the state_dict to save has no 'encoder.*' weights "
                               f"(pass the MultiTaskModel's state dict)")
        save_encoder(model.encoder, out, state_dict=enc_state)
        head_state = {k[len("heads."):]: v.detach().cpu().contiguous()
                      for k, v in full.items() if k.startswith("heads.")}
    else:
        save_encoder(model.encoder, out)
        head_state = {f"{name}.{k}": v.detach().cpu().contiguous()
                      for name, head in model.heads.items() for k, v in head.state_dict().items()}
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    if head_state:
        save_file(head_state, str(out / HEADS_WEIGHTS))
    meta = {"format": _FORMAT, "heads": model.head_specs, "extra": extra or {}}
    try:
        text = json.dumps(meta, indent=2, ensure_ascii=False)
    except TypeError as e:
        raise ToolkitError(f"{out / HEADS_META}: 'extra' must be JSON-serialisable: {e}") from None
    # heads.json last: its presence marks a complete task-model directory.
    (out / HEADS_META).write_text(text + "\n", encoding="utf-8")
    return out


def read_task_meta(model_dir: Union[str, Path]) -> Dict[str, Any]:
    """Contents of ``heads.json`` (``{"heads": {}, "extra": {}}`` when absent)."""
    path = Path(model_dir) / HEADS_META
    if not path.is_file():
        return {"format": _FORMAT, "heads": {}, "extra": {}}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON: {e.msg}", line=e.lineno) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("heads"), dict):
        raise DataError(path, "expected an object with a 'heads' mapping (was it written by save_task_model?)")
    return meta


def load_task_model(model_dir: Union[str, Path], attn_implementation: str = "sdpa",
                    load_tokenizer_files: bool = True) -> Tuple[MultiTaskModel, Any]:
    """Load what :func:`save_task_model` wrote (or a plain encoder directory, with no heads).

    Returns:
        (model, tokenizer); tokenizer is None when ``load_tokenizer_files`` is False.
    """
    from safetensors.torch import load_file

    d = Path(model_dir)
    encoder = build_encoder(d, attn_implementation=attn_implementation)
    model = MultiTaskModel(encoder)
    meta = read_task_meta(d)
    if meta["heads"]:
        weights = d / HEADS_WEIGHTS
        if not weights.is_file():
            raise DataError(weights, f"missing: {HEADS_META} lists heads {sorted(meta['heads'])} but their "
                            f"weights are absent (copy the whole model directory)")
        state = load_file(str(weights))
        for name, spec in meta["heads"].items():
            missing = [k for k in ("task_type", "num_labels") if k not in spec]
            if missing:
                raise DataError(d / HEADS_META, f"head '{name}' lacks '{missing[0]}'")
            head = model.add_head(name, spec["task_type"], spec["num_labels"], spec.get("labels"),
                                  dropout=spec.get("dropout", 0.1))
            prefix = name + "."
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            try:
                head.load_state_dict(sub, strict=True)
            except RuntimeError as e:
                raise DataError(weights, f"weights of head '{name}' do not match heads.json: "
                                f"{str(e).splitlines()[0]}") from None
    model.extra = meta.get("extra", {})
    tokenizer = load_tokenizer(d) if load_tokenizer_files else None
    return model, tokenizer
