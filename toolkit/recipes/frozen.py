"""A frozen teacher cut to what the losses read: shared by distillation and by the multi-task
teacher's relation anchor."""
from __future__ import annotations

import copy
from typing import Any, Dict, Optional

import torch
from torch import nn

from toolkit.engine import prepare_frozen
from toolkit.errors import ConfigError, DataError
from toolkit.losses import EMBEDDINGS, Needs
from toolkit.models.capture import LayerCapture, encoder_layers, project_qkv, truncate_encoder
from toolkit.models.encoder import build_encoder, count_parameters


class FrozenTeacher:
    """A frozen teacher cut to what the losses read, with its captures.

    Layers above the highest one read never run. When the losses read only Q/K/V projections
    of that top layer (MiniLMv2, MiniLM v1), the layer is cut as well and its projections are
    applied to the previous layer's output. With ``mlm`` the teacher runs its full depth and
    its MLM head (``cls.predictions`` of the directory's ``*ForMaskedLM`` weights).

    Args:
        path: the teacher directory.
        needs: the merged needs of the losses (its ``teacher`` part is used).
        device, dtype: where and in what precision the teacher runs.
        field: the config field naming this teacher, for errors.
    """

    def __init__(self, path: str, needs: Needs, device: torch.device, dtype: torch.dtype, field: str = "teacher"):
        model = build_encoder(path)
        self.path = path
        self.config = copy.deepcopy(model.config)   # the untruncated shape
        self.params = count_parameters(model)
        n = model.config.num_hidden_layers
        spec = {layer: set(what) for layer, what in needs.teacher.items()}
        bad = [layer for layer in spec if not EMBEDDINGS <= layer < n]
        if bad:
            raise ConfigError(field, f"the losses read teacher layer {bad[0] + 1} but {path} has {n} layers")
        top = max([layer for layer in spec if layer != EMBEDDINGS], default=EMBEDDINGS)
        self.mlm = needs.mlm
        self.cut: Optional[int] = None
        keep = top + 1
        if self.mlm:
            keep = n
        elif top > 0 and spec[top] <= {"q", "k", "v"}:
            self.cut = top
            keep = top
        self.cut_block = encoder_layers(model)[top] if self.cut is not None else None
        self.cut_what = sorted(spec.pop(top)) if self.cut is not None else []
        if keep < 1:   # only the embedding output is read
            keep = 1
        truncate_encoder(model, keep)
        self.layers_run = keep
        self.model = prepare_frozen(model, device, dtype)
        if self.cut_block is not None:
            self.cut_block = prepare_frozen(self.cut_block, device, dtype)
        self.capture = LayerCapture(self.model, spec) if spec else None
        self.head = self._mlm_head(path, device, dtype) if self.mlm else None

    @staticmethod
    def _mlm_head(path: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
        from transformers import AutoModelForMaskedLM

        try:
            full = AutoModelForMaskedLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        except Exception as e:  # noqa: BLE001 - reported with the directory
            raise DataError(path, f"a loss reads MLM logits, but the teacher has no loadable MLM head: {e}") from None
        head = getattr(full, "cls", None)
        if head is None:
            raise DataError(path, "a loss reads MLM logits, but the teacher has no MLM head (cls.predictions)")
        return prepare_frozen(head, device, dtype)

    def to(self, dtype: torch.dtype) -> None:
        for m in (self.model, self.cut_block, self.head):
            if m is not None:
                m.to(dtype)

    @torch.no_grad()
    def __call__(self, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """``{"layers": {layer: {what: [B, L, H]}}, "logits": [B, L, V] or None}`` for one batch."""
        if self.capture is not None:
            self.capture.clear()
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         token_type_ids=batch["token_type_ids"])
        layers = {k: dict(v) for k, v in self.capture.captured.items()} if self.capture is not None else {}
        if self.cut is not None:
            layers[self.cut] = project_qkv(self.cut_block, out.last_hidden_state, self.cut_what)
        logits = self.head(out.last_hidden_state) if self.head is not None else None
        return {"layers": layers, "logits": logits}
