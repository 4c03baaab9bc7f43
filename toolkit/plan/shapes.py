"""Model shapes at full size, from ``config.json`` alone, counted on the meta device.

A model directory needs only its ``config.json`` here (no weights): the plan of a job can be
made on a login node before any checkpoint is downloaded, and the checks at the start of a
job read nothing heavier than that file.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Tuple, Union

from toolkit.errors import ConfigError, DataError


@dataclass(frozen=True)
class ModelShape:
    """Sizes and parameter counts of a BERT/ERNIE encoder.

    Attributes:
        source: the model directory, or a description of the spec it comes from.
        arch: ``"bert"`` or ``"ernie"``.
        layers, hidden, heads, intermediate, vocab: the transformer's sizes.
        max_positions: longest sequence the position embeddings allow.
        embedding_params: the embeddings block (words, positions, types, task types, LayerNorm).
        layer_params: one transformer layer (all layers are the same).
        qkv_params: the Q, K and V projections of one layer (what a cut last layer runs).
        pooler_params: the pooler (0 when the model has none).
        has_tokenizer: the directory holds tokenizer files.
    """

    source: str
    arch: str
    layers: int
    hidden: int
    heads: int
    intermediate: int
    vocab: int
    max_positions: int
    embedding_params: int
    layer_params: int
    qkv_params: int
    pooler_params: int
    has_tokenizer: bool = False
    attention_dropout: float = 0.0

    @property
    def params(self) -> int:
        """Every parameter of the encoder (with the pooler)."""
        return self.embedding_params + self.layers * self.layer_params + self.pooler_params

    def params_up_to(self, layers: int, last_projections_only: bool = False) -> int:
        """Parameters of the encoder truncated after ``layers`` layers (no pooler); with
        ``last_projections_only`` the last kept layer runs only its Q/K/V projections."""
        if last_projections_only:
            return self.embedding_params + (layers - 1) * self.layer_params + self.qkv_params
        return self.embedding_params + layers * self.layer_params

    @property
    def non_embedding_params(self) -> int:
        return self.layers * self.layer_params


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def _count(config: Any) -> Tuple[int, int, int, int]:
    """(embeddings, one layer, its Q/K/V projections, pooler) parameters of ``config``'s
    encoder, built with one layer on the meta device (no memory, no weights)."""
    import torch

    from toolkit.models.encoder import ARCHS

    one = copy.deepcopy(config)
    one.num_hidden_layers = 1
    _, model_cls = ARCHS[one.model_type]
    with torch.device("meta"):
        model = model_cls(one)

    def n(module: Any) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    layer = model.encoder.layer[0]
    attn = layer.attention.self
    return (n(model.embeddings), n(layer), n(attn.query) + n(attn.key) + n(attn.value),
            n(getattr(model, "pooler", None)))


def shape_from_config(config: Any, source: str, has_tokenizer: bool = False) -> ModelShape:
    """The :class:`ModelShape` of a ``transformers`` BERT/ERNIE config."""
    emb, layer, qkv, pooler = _count(config)
    return ModelShape(source=source, arch=config.model_type, layers=int(config.num_hidden_layers),
                      hidden=int(config.hidden_size), heads=int(config.num_attention_heads),
                      intermediate=int(config.intermediate_size), vocab=int(config.vocab_size),
                      max_positions=int(config.max_position_embeddings), embedding_params=emb,
                      layer_params=layer, qkv_params=qkv, pooler_params=pooler, has_tokenizer=has_tokenizer,
                      attention_dropout=float(getattr(config, "attention_probs_dropout_prob", 0.0) or 0.0))


def reference_dir(name: Union[str, Path]) -> Optional[Path]:
    """The shipped reference config folder called ``name`` (``bert-large-uncased``), or None."""
    from toolkit.resources import model_config_dir

    p = Path(name)
    if p.parent != Path("."):
        return None
    cand = model_config_dir() / p.name
    return cand if (cand / "config.json").is_file() else None


def shape_from_dir(path: Union[str, Path], field: str, source: Optional[str] = None,
                   references: bool = False) -> ModelShape:
    """The shape of the encoder in directory ``path`` (only its ``config.json`` is read).

    With ``references`` (the plan), a bare name that is no directory here may name a shipped
    reference config instead (``teacher=bert-large-uncased``, see configs/models/). Errors
    name the config ``field`` that gave the directory (and the job file ``source``).
    """
    from toolkit.models.encoder import ARCHS

    p = Path(path)
    if references and not p.is_dir() and reference_dir(p) is not None:
        p = reference_dir(p)
    cfg_file = p / "config.json"
    if not p.is_dir():
        raise ConfigError(field, f"model directory not found: {p} (a save_pretrained directory; for a plan, "
                          f"one holding only config.json is enough)", source)
    if not cfg_file.is_file():
        raise ConfigError(field, f"{p} has no config.json (not a transformers save_pretrained directory)", source)
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(cfg_file, f"invalid JSON: {e.msg}", line=e.lineno) from None
    model_type = data.get("model_type")
    if model_type not in ARCHS:
        raise ConfigError(field, f"{cfg_file}: model_type {model_type!r} is not supported; this toolkit handles "
                          f"{sorted(ARCHS)} encoders", source)
    config_cls, _ = ARCHS[model_type]
    known = {k: v for k, v in data.items() if not k.startswith("_")}
    try:
        config = config_cls(**known)
    except (TypeError, ValueError) as e:
        raise DataError(cfg_file, f"not a valid {model_type} config: {e}") from None
    for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        value = getattr(config, name, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(cfg_file, f"{name} must be a positive integer, got {value!r}")
    if config.hidden_size % config.num_attention_heads:
        raise DataError(cfg_file, f"hidden_size {config.hidden_size} is not divisible by num_attention_heads "
                        f"{config.num_attention_heads}")
    has_tok = any((p / f).is_file() for f in _TOKENIZER_FILES)
    return shape_from_config(config, str(p), has_tokenizer=has_tok)
