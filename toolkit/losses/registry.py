"""The distillation-loss registry: a loss is one class, registered by name.

A registered loss (:class:`DistillLoss`) says what it reads (:meth:`DistillLoss.needs`: Q/K/V
projections or hidden states of given layers of the student and the teacher, the embedding
output, MLM logits on masked input), builds itself from its own options dataclass and the
model shapes (:class:`LossContext`), and computes its value from what was captured
(:class:`DistillInputs`). The distillation recipe only merges the needs of the configured
losses, captures that, and sums ``weight x value``; it has no per-loss code.

Adding a loss is one file and one registration::

    @register_loss("my_loss")
    class MyLoss(DistillLoss):
        @dataclass
        class Options:
            scale: float = arg(1.0, "what it does")

        def __init__(self, options, ctx):
            super().__init__(options, ctx)
            self.s, self.t = ctx.student_layer, ctx.teacher_layer

        def needs(self):
            return Needs(student={self.s: {"hidden"}}, teacher={self.t: {"hidden"}})

        def forward(self, inputs):
            diff = inputs.student[self.s]["hidden"] - inputs.teacher[self.t]["hidden"]
            return {"loss": self.options.scale * diff.pow(2).mean()}

and an import of the file in ``toolkit/losses/__init__.py`` (or anywhere before the job
builds its losses). Its options are set in the job YAML as ``loss.options.my_loss.scale``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, FrozenSet, Iterable, Mapping, Optional, Type

from torch import Tensor, nn

from toolkit.errors import ConfigError

#: Layer key of the embedding output (the input of encoder layer 0) in :class:`Needs`.
EMBEDDINGS = -1
#: What can be captured of an encoder layer.
CAPTURABLE = frozenset({"q", "k", "v", "hidden"})


def _freeze(spec: Optional[Mapping[int, Iterable[str]]], side: str) -> Dict[int, FrozenSet[str]]:
    out: Dict[int, FrozenSet[str]] = {}
    for layer, what in (spec or {}).items():
        what = frozenset(what)
        bad = sorted(what - CAPTURABLE)
        if bad:
            raise ValueError(f"{side} layer {layer}: cannot capture {bad}; choose from {sorted(CAPTURABLE)}")
        if layer == EMBEDDINGS and what != {"hidden"}:
            raise ValueError("the embedding output has only 'hidden'")
        out[int(layer)] = what
    return out


@dataclass(frozen=True)
class Needs:
    """What a loss reads. Layers are 0-based encoder layer indices (``EMBEDDINGS`` = -1 for the
    embedding output); each maps to a subset of ``{"q", "k", "v", "hidden"}`` where ``hidden``
    is the layer's output. ``mlm``: the input is masked and the teacher's MLM logits (over its
    full depth) are passed in ``DistillInputs.teacher_logits``."""

    student: Mapping[int, FrozenSet[str]] = field(default_factory=dict)
    teacher: Mapping[int, FrozenSet[str]] = field(default_factory=dict)
    mlm: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "student", _freeze(self.student, "student"))
        object.__setattr__(self, "teacher", _freeze(self.teacher, "teacher"))

    def __or__(self, other: "Needs") -> "Needs":
        def merge(a: Mapping[int, FrozenSet[str]], b: Mapping[int, FrozenSet[str]]) -> Dict[int, FrozenSet[str]]:
            out = dict(a)
            for k, v in b.items():
                out[k] = out.get(k, frozenset()) | v
            return out

        return Needs(merge(self.student, other.student), merge(self.teacher, other.teacher), self.mlm or other.mlm)


@dataclass
class LossContext:
    """What a loss may use to build itself.

    Attributes:
        teacher_config, student_config: the encoders' HF configs (hidden_size,
            num_attention_heads, num_hidden_layers, vocab_size, ...). ``teacher_config`` is the
            untruncated teacher's.
        teacher_layer: 0-based teacher layer the layer-pair losses read (``loss.teacher_layer``).
        student_layer: 0-based student layer they read (``loss.student_layer``).
        student: the student encoder (e.g. to tie an MLM decoder to its word embeddings).
        field: the config path of this loss's options, for error messages.
    """

    teacher_config: Any
    student_config: Any
    teacher_layer: int
    student_layer: int
    student: Optional[nn.Module] = None
    field: str = "loss"


@dataclass
class DistillInputs:
    """What the recipe captured for one micro batch, for one teacher.

    Attributes:
        student: layer -> {"q"|"k"|"v"|"hidden": ``[B, L, Hs]``} (with gradients).
        teacher: layer -> {...: ``[B, L, Ht]``} (no gradients).
        attention_mask: ``[B, L]``, 1 for real tokens.
        teacher_logits: ``[B, L, V]`` MLM logits of the teacher, when a loss needs ``mlm``.
        mlm_mask: ``[B, L]`` bool, the masked positions, when a loss needs ``mlm``.
    """

    student: Mapping[int, Mapping[str, Tensor]]
    teacher: Mapping[int, Mapping[str, Tensor]]
    attention_mask: Tensor
    teacher_logits: Optional[Tensor] = None
    mlm_mask: Optional[Tensor] = None


@dataclass
class NoOptions:
    """This loss has no options."""


class DistillLoss(nn.Module):
    """Base class of registered distillation losses (see the module docstring).

    Subclasses set ``Options`` (a config dataclass, fields declared with
    :func:`toolkit.config.arg`), implement :meth:`needs` and :meth:`forward`, and may hold
    learned parameters (e.g. projections), which train with the student.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[Type[Any]] = NoOptions

    def __init__(self, options: Any, ctx: LossContext):
        super().__init__()
        self.options = options
        self.field = ctx.field

    def needs(self) -> Needs:
        raise NotImplementedError

    def forward(self, inputs: DistillInputs) -> Dict[str, Tensor]:
        """Returns ``{"loss": scalar, <part>: scalar, ...}``; parts are logged as ``<name>/<part>``."""
        raise NotImplementedError


#: name -> loss class.
LOSSES: Dict[str, Type[DistillLoss]] = {}


def register_loss(name: str):
    """Class decorator: register a :class:`DistillLoss` subclass under ``name``."""

    def deco(cls: Type[DistillLoss]) -> Type[DistillLoss]:
        if not (isinstance(cls, type) and issubclass(cls, DistillLoss)):
            raise TypeError(f"register_loss({name!r}) decorates DistillLoss subclasses, got {cls!r}")
        if not dataclasses.is_dataclass(cls.Options):
            raise TypeError(f"{cls.__name__}.Options must be a dataclass")
        if name in LOSSES and LOSSES[name] is not cls:
            raise ValueError(f"a loss named {name!r} is already registered ({LOSSES[name].__name__})")
        cls.name = name
        LOSSES[name] = cls
        return cls

    return deco


def get_loss(name: str, field: str = "loss.weights") -> Type[DistillLoss]:
    """The loss class registered as ``name``; ConfigError naming ``field`` otherwise."""
    if name not in LOSSES:
        raise ConfigError(f"{field}.{name}", f"unknown loss; registered: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


def parse_options(name: str, raw: Optional[Mapping[str, Any]], field: str) -> Any:
    """Build loss ``name``'s Options dataclass from a mapping; errors name ``field.<key>``."""
    from toolkit.config import _from_dict

    cls = get_loss(name).Options
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(field, f"expected a mapping of {name}'s options, got {raw!r}")
    return _from_dict(cls, dict(raw or {}), prefix=field + ".")


def build_loss(name: str, raw_options: Optional[Mapping[str, Any]], ctx: LossContext) -> DistillLoss:
    """Instantiate the registered loss ``name`` from its raw options and the model context."""
    options = parse_options(name, raw_options, ctx.field)
    return get_loss(name)(options, ctx)
