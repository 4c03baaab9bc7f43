"""TinyBERT (Jiao et al. 2020) intermediate-layer distillation.

* Hidden-state MSE between ``W s_l`` and ``t_m`` for each configured layer pair ``(l, m)``,
  with one learned projection ``W: Hs -> Ht`` per pair (the projections are trained with the
  student and discarded after distillation).
* Attention-score MSE between the unnormalized scores ``Q_a K_a^T / sqrt(d_a)`` per head
  (needs equal head counts), only over (real query, real key) pairs.

Both are averaged over real tokens (padding never enters) and summed over layer pairs, as
in the paper. The pair ``(EMBEDDINGS, EMBEDDINGS)`` (-1) is the embedding-layer term: its
hidden MSE is taken, and it has no attention term.

The registered loss ``tinybert`` maps every student layer to a teacher layer (uniformly, as
TinyBERT's ``g(m) = m N / M``, or by an explicit map), adds the embedding-layer term, and
optionally the prediction-layer term (soft cross-entropy of MLM logits on masked input).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from toolkit.config import arg
from toolkit.errors import ConfigError, ToolkitError
from toolkit.losses.registry import EMBEDDINGS, DistillInputs, DistillLoss, LossContext, Needs, register_loss


def _scores(q: Tensor, k: Tensor, heads: int) -> Tensor:
    """[B, L, H] query/key projections -> attention scores [B, A, L, L] (fp32)."""
    b, l, h = q.shape
    d = h // heads
    cdt = torch.promote_types(q.dtype, torch.float32)
    qh = q.to(cdt).view(b, l, heads, d).transpose(1, 2)
    kh = k.to(cdt).view(b, l, heads, d).transpose(1, 2)
    return qh @ kh.transpose(-1, -2) * d ** -0.5


class TinyBERTLoss(nn.Module):
    """Hidden-state MSE (learned projection) + attention-score MSE over layer pairs.

    Args:
        student_hidden_size: Hs.
        teacher_hidden_size: Ht.
        layer_pairs: ``[(student_layer, teacher_layer), ...]``: the keys under which the
            hidden states / Q-K projections are passed to ``forward`` (e.g. the
            0-based indices captured by :class:`toolkit.models.capture.QKVCapture`).
        student_heads: student attention heads (needed for the attention term).
        teacher_heads: teacher attention heads (must equal ``student_heads``).
    """

    def __init__(self, student_hidden_size: int, teacher_hidden_size: int,
                 layer_pairs: Sequence[Tuple[int, int]], student_heads: Optional[int] = None,
                 teacher_heads: Optional[int] = None):
        super().__init__()
        pairs = [tuple(p) for p in layer_pairs]
        if not pairs or any(len(p) != 2 for p in pairs):
            raise ConfigError("layer_pairs", f"must be a non-empty list of [student_layer, teacher_layer] pairs, "
                              f"got {list(layer_pairs)!r}")
        if (student_heads is None) != (teacher_heads is None) or (
                student_heads is not None and student_heads != teacher_heads):
            raise ConfigError("num_attention_heads",
                              f"TinyBERT's attention loss compares heads one to one: student heads "
                              f"({student_heads}) must equal teacher heads ({teacher_heads})")
        self.layer_pairs = pairs
        self.num_heads = student_heads
        self.projections = nn.ModuleList(nn.Linear(student_hidden_size, teacher_hidden_size) for _ in pairs)

    def forward(self, student_hidden: Mapping[int, Tensor], teacher_hidden: Mapping[int, Tensor],
                attention_mask: Tensor,
                student_qk: Optional[Mapping[int, Mapping[str, Tensor]]] = None,
                teacher_qk: Optional[Mapping[int, Mapping[str, Tensor]]] = None) -> Dict[str, Tensor]:
        """Args:
            student_hidden: layer -> hidden state ``[B, L, Hs]``.
            teacher_hidden: layer -> hidden state ``[B, L, Ht]`` (no gradient).
            attention_mask: ``[B, L]``, 1 for real tokens.
            student_qk, teacher_qk: layer -> ``{"q", "k"}`` ``[B, L, H]``; when both given the
                attention-score term is added.

        Returns:
            ``{"loss": hidden + attn, "hidden": scalar, "attn": scalar}``.
        """
        valid = attention_mask.to(torch.bool)                                  # [B, L]
        n_tok = valid.sum().clamp_min(1)
        hidden = attention_mask.new_zeros((), dtype=torch.float32)
        for proj, (s_layer, t_layer) in zip(self.projections, self.layer_pairs):
            s, t = self._get(student_hidden, s_layer, "student hidden"), self._get(teacher_hidden, t_layer,
                                                                                    "teacher hidden")
            diff = proj(s).float() - t.detach().float()                        # [B, L, Ht]
            sq = (diff ** 2).masked_fill(~valid[..., None], 0.0)
            hidden = hidden + sq.sum() / (n_tok * diff.shape[-1])
        attn = torch.zeros_like(hidden)
        if student_qk is not None and teacher_qk is not None:
            if self.num_heads is None:
                raise ConfigError("num_attention_heads", "the attention-score loss needs student_heads and "
                                  "teacher_heads")
            pair_ok = valid[:, None, :, None] & valid[:, None, None, :]       # [B, 1, L, L]
            n_pairs = pair_ok.sum().clamp_min(1) * self.num_heads
            for s_layer, t_layer in self.layer_pairs:
                if s_layer == EMBEDDINGS or t_layer == EMBEDDINGS:
                    continue   # the embedding output has no attention
                s = self._get(student_qk, s_layer, "student q/k")
                t = self._get(teacher_qk, t_layer, "teacher q/k")
                diff = _scores(s["q"], s["k"], self.num_heads) - _scores(t["q"].detach(), t["k"].detach(),
                                                                         self.num_heads)
                attn = attn + (diff ** 2).masked_fill(~pair_ok, 0.0).sum() / n_pairs
        return {"loss": hidden + attn, "hidden": hidden, "attn": attn}

    @staticmethod
    def _get(store: Mapping, layer: int, what: str):
        if layer not in store:
            raise ToolkitError(f"TinyBERT loss: no {what} captured for layer {layer}; captured layers: "
                               f"{sorted(store)}")
        return store[layer]


def uniform_layer_map(student_layers: int, teacher_layers: int) -> List[int]:
    """TinyBERT's uniform map: student layer m (1-based) reads teacher layer ``round(m N / M)``."""
    return [max(1, round((m + 1) * teacher_layers / student_layers)) for m in range(student_layers)]


@register_loss("tinybert")
class TinyBERT(DistillLoss):
    """TinyBERT's general distillation: hidden-state and attention-score MSE for every mapped
    layer pair, the embedding-layer MSE, and optionally the prediction-layer term."""

    @dataclass
    class Options:
        layer_map: str = arg("uniform", "uniform (every student layer m reads teacher layer round(m N / M)) | "
                             "pair (only loss.student_layer / loss.teacher_layer) | a comma list of 1-based "
                             "teacher layers, one per student layer, e.g. 3,6,9,12")
        embedding: bool = arg(True, "add the embedding-layer MSE (learned projection)")
        attention: str = arg("auto", "attention-score MSE: auto (when head counts are equal) | on | off")
        prediction: bool = arg(False, "add the prediction-layer term: soft cross-entropy of MLM logits on "
                               "masked input (the teacher needs an MLM head)")
        temperature: float = arg(1.0, "temperature of the prediction-layer term")

    def __init__(self, options: "TinyBERT.Options", ctx: LossContext):
        super().__init__(options, ctx)
        s_cfg, t_cfg = ctx.student_config, ctx.teacher_config
        n_s, n_t = s_cfg.num_hidden_layers, t_cfg.num_hidden_layers
        pairs = self._layer_pairs(options.layer_map, ctx, n_s, n_t)
        if options.embedding:
            pairs = [(EMBEDDINGS, EMBEDDINGS)] + pairs
        if options.attention not in ("auto", "on", "off"):
            raise ConfigError(f"{ctx.field}.attention", f"must be auto, on or off, got {options.attention!r}")
        same_heads = s_cfg.num_attention_heads == t_cfg.num_attention_heads
        if options.attention == "on" and not same_heads:
            raise ConfigError(f"{ctx.field}.attention", f"the attention-score MSE compares heads one to one, but "
                              f"the student has {s_cfg.num_attention_heads} heads and the teacher "
                              f"{t_cfg.num_attention_heads}; set it to off (or auto)")
        self.with_attention = options.attention == "on" or (options.attention == "auto" and same_heads)
        heads = s_cfg.num_attention_heads if self.with_attention else None
        self.loss = TinyBERTLoss(s_cfg.hidden_size, t_cfg.hidden_size, pairs, heads, heads)
        self.pairs = pairs
        self.prediction = None
        if options.prediction:
            from toolkit.losses.logit_kd import LogitKDLoss, student_mlm_head

            if ctx.student is None:
                raise ToolkitError("the prediction-layer term needs the student encoder to tie its MLM head to")
            if s_cfg.vocab_size != t_cfg.vocab_size:
                raise ConfigError(f"{ctx.field}.prediction", "needs one vocabulary for teacher and student")
            try:
                self.prediction = LogitKDLoss(options.temperature)
            except ConfigError as e:
                raise ConfigError(f"{ctx.field}.temperature", e.message) from None
            self.mlm_head = student_mlm_head(ctx.student)
        self.last = n_s - 1

    def _layer_pairs(self, spec: str, ctx: LossContext, n_s: int, n_t: int) -> List[Tuple[int, int]]:
        field = f"{ctx.field}.layer_map"
        spec = str(spec).strip()
        if spec == "pair":
            return [(ctx.student_layer, ctx.teacher_layer)]
        if spec == "uniform":
            if n_t < n_s:
                raise ConfigError(field, f"a uniform map needs a teacher at least as deep as the student "
                                  f"({n_t} < {n_s} layers); give an explicit list")
            teacher = uniform_layer_map(n_s, n_t)
        else:
            try:
                teacher = [int(x) for x in spec.split(",") if x.strip()]
            except ValueError:
                raise ConfigError(field, f"expected uniform, pair or a comma list of teacher layers, got {spec!r}") \
                    from None
            if len(teacher) != n_s:
                raise ConfigError(field, f"gives {len(teacher)} teacher layers for a {n_s}-layer student")
        for t in teacher:
            if not 1 <= t <= n_t:
                raise ConfigError(field, f"teacher layer {t} is out of range 1..{n_t}")
        return [(m, t - 1) for m, t in enumerate(teacher)]

    def needs(self) -> Needs:
        what = {"hidden", "q", "k"} if self.with_attention else {"hidden"}
        student: Dict[int, set] = {}
        teacher: Dict[int, set] = {}
        for s_layer, t_layer in self.pairs:
            w = {"hidden"} if s_layer == EMBEDDINGS else what
            student.setdefault(s_layer, set()).update(w)
            teacher.setdefault(t_layer, set()).update(w)
        if self.prediction is not None:
            student.setdefault(self.last, set()).add("hidden")
        return Needs(student=student, teacher=teacher, mlm=self.prediction is not None)

    def forward(self, inputs: DistillInputs) -> Dict[str, Tensor]:
        s_hidden = {s: inputs.student[s]["hidden"] for s, _ in self.pairs}
        t_hidden = {t: inputs.teacher[t]["hidden"] for _, t in self.pairs}
        qk_s = qk_t = None
        if self.with_attention:
            qk_s = {s: inputs.student[s] for s, _ in self.pairs if s != EMBEDDINGS}
            qk_t = {t: inputs.teacher[t] for _, t in self.pairs if t != EMBEDDINGS}
        out = self.loss(s_hidden, t_hidden, inputs.attention_mask, qk_s, qk_t)
        if self.prediction is not None:
            pred = self.prediction(self.mlm_head(inputs.student[self.last]["hidden"]), inputs.teacher_logits,
                                   inputs.mlm_mask)
            out["prediction"] = pred
            out["loss"] = out["loss"] + pred
        return out
