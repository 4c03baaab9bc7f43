"""Capture Q/K/V projections and hidden states of chosen encoder layers with forward hooks.

Works on any model that contains a transformers BERT-style encoder (``BertModel``,
``ErnieModel``, ``BertForMaskedLM``, or a wrapper holding one): the hooks sit on
``encoder.layer[i].attention.self.{query,key,value}`` (the ``nn.Linear`` projections, output
``[B, L, H]`` before the head split) and on ``encoder.layer[i]`` (its output hidden state).
The model code is untouched and attention keeps its sdpa/flash implementation; no
``output_attentions`` needed.

Layer numbering:

* **User-facing** config values (``teacher_layer: 21``) are **1-based**: layer ``n`` is the
  n-th transformer layer, ``num_layers`` the last; negative values count from the end
  (``-1`` = last). :func:`resolve_layer` turns them into 0-based indices.
* **Code-facing** indices (``QKVCapture(layers=...)``) are **0-based**, negatives from the end.
  ``captured`` is keyed by the resolved non-negative 0-based index.

The frozen teacher is cut with :func:`truncate_encoder` so layers above the one the loss reads
never run, and :class:`ProjectionsOnly` makes the layer the loss reads stop after its Q/K/V
projections (its attention, output projection and feed-forward feed nothing the relation
losses use), for the teacher and for the student alike.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Iterable, List, Optional, Sequence

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from toolkit.errors import ConfigError, ToolkitError

_PROJ = {"q": "query", "k": "key", "v": "value"}
_WHAT = tuple(_PROJ) + ("hidden",)


def _find_layer_list(model: nn.Module) -> tuple:
    """(parent module, attribute name, ModuleList) of the outermost ``encoder.layer`` list."""
    best = None
    for name, module in model.named_modules():
        layer = getattr(module, "layer", None)
        if isinstance(layer, nn.ModuleList) and (name == "encoder" or name.endswith(".encoder")):
            depth = name.count(".")
            if best is None or depth < best[0]:
                best = (depth, module, layer)
    if best is None:
        raise ToolkitError(f"{type(model).__name__} has no BERT-style 'encoder.layer' list; capture and "
                           f"truncation support BertModel / ErnieModel and models wrapping them")
    return best[1], "layer", best[2]


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer layers ``encoder.layer`` of ``model`` (or of the encoder it wraps)."""
    return _find_layer_list(model)[2]


def resolve_layer(index: int, num_layers: int, field: str = "teacher_layer") -> int:
    """1-based user layer number -> 0-based index.

    Args:
        index: ``1..num_layers`` (``n`` = the n-th layer), or ``-num_layers..-1`` from the end.
        num_layers: layers in the model.
        field: config field named in the error.

    Returns:
        0-based index in ``[0, num_layers)``.
    """
    if isinstance(index, bool) or not isinstance(index, int) or index == 0 or not -num_layers <= index <= num_layers:
        raise ConfigError(field, f"layer {index!r} is out of range for a model with {num_layers} layers; "
                          f"use 1..{num_layers} (1-based) or -1 for the last layer")
    return index - 1 if index > 0 else num_layers + index


def default_teacher_layer(num_layers: int) -> int:
    """1-based teacher layer MiniLMv2 distills from: the last for <=12 layers, else ~7/8 depth.

    E.g. 12 -> 12, 6 -> 6, 24 -> 21 (BERT-large in the paper), 48 -> 42.
    """
    if num_layers < 1:
        raise ConfigError("teacher_layer", f"teacher has {num_layers} layers; need at least 1")
    if num_layers <= 12:
        return num_layers
    return int(round(num_layers * 21 / 24))


def truncate_encoder(model: nn.Module, num_layers: int) -> nn.Module:
    """Keep only the first ``num_layers`` transformer layers, in place.

    Also sets ``config.num_hidden_layers`` on every config found in the model. A truncated
    model's ``last_hidden_state`` is the full model's output of layer ``num_layers``.

    Args:
        model: a BERT-style model (or a wrapper holding one).
        num_layers: layers to keep (= the 1-based number of the last layer the loss reads).

    Returns:
        ``model`` itself.
    """
    parent, attr, layers = _find_layer_list(model)
    total = len(layers)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise ConfigError("teacher_layer", f"cannot keep {num_layers!r} layers of a {total}-layer teacher; "
                          f"use a layer number in 1..{total}")
    setattr(parent, attr, nn.ModuleList(list(layers)[:num_layers]))
    seen = set()
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "num_hidden_layers") and id(cfg) not in seen:
            seen.add(id(cfg))
            cfg.num_hidden_layers = num_layers
    return model


class QKVCapture:
    """Forward hooks storing Q/K/V projections and/or layer outputs of chosen layers.

    Usage::

        with QKVCapture(teacher, layers=[-1]) as cap:
            teacher(**batch)
            qkv = cap.captured[cap.layers[0]]     # {"q": [B, L, H], "k": ..., "v": ...}

    Tensors are stored as produced (no detach), so a student's captures carry gradients;
    call a frozen teacher under ``torch.no_grad()``. Call :meth:`clear` after each step so the
    activations are freed as soon as the loss has them.

    Args:
        model: BERT/ERNIE model or a wrapper holding one.
        layers: 0-based layer indices; negative counts from the end.
        what: any of ``"q"``, ``"k"``, ``"v"`` (projection outputs) and ``"hidden"``
            (the layer's output hidden state ``[B, L, H]``).
    """

    def __init__(self, model: nn.Module, layers: Iterable[int], what: Sequence[str] = ("q", "k", "v")):
        layer_list = encoder_layers(model)
        n = len(layer_list)
        bad = [w for w in what if w not in _WHAT]
        if bad or not what:
            raise ConfigError("what", f"unknown capture target(s) {bad or list(what)}; choose from {list(_WHAT)}")
        resolved: List[int] = []
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ConfigError("layers", f"layer index {i!r} is out of range for an encoder with {n} layers "
                                  f"(0-based, negatives from the end)")
            j = i % n
            if j not in resolved:
                resolved.append(j)
        if not resolved:
            raise ConfigError("layers", "name at least one layer to capture")
        self.layers: List[int] = resolved
        self.num_layers = n
        self.what = tuple(what)
        self.captured: Dict[int, Dict[str, Tensor]] = {j: {} for j in resolved}
        self._handles: list = []
        for j in resolved:
            block = layer_list[j]
            for w in self.what:
                target = block if w == "hidden" else self._projection(block, w, j)
                self._handles.append(target.register_forward_hook(self._hook(j, w)))

    @staticmethod
    def _projection(block: nn.Module, what: str, index: int) -> nn.Module:
        attn = getattr(getattr(block, "attention", None), "self", None)
        proj = getattr(attn, _PROJ[what], None)
        if not isinstance(proj, nn.Module):
            raise ToolkitError(f"encoder layer {index} has no attention.self.{_PROJ[what]} projection to hook; "
                               f"only BERT-style attention modules are supported")
        return proj

    def _hook(self, layer: int, what: str):
        def hook(module: nn.Module, inputs: tuple, output) -> None:
            # BertLayer returns a tensor in transformers 5; older versions return a tuple.
            self.captured[layer][what] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def get(self, layer: Optional[int] = None) -> Dict[str, Tensor]:
        """Captures of ``layer`` (0-based, as given or resolved; default: the first captured layer)."""
        key = self.layers[0] if layer is None else layer % self.num_layers
        if key not in self.captured or not self.captured[key]:
            raise ToolkitError(f"nothing captured for layer {layer}; captured layers {self.layers} "
                               f"(call the model inside the capture first)")
        return self.captured[key]

    def clear(self) -> None:
        """Drop stored tensors (keeps the hooks)."""
        for store in self.captured.values():
            store.clear()

    def remove(self) -> None:
        """Remove the hooks and drop stored tensors."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self.clear()

    def __enter__(self) -> "QKVCapture":
        return self

    def __exit__(self, *exc) -> None:
        # Hooks go, but the last captures stay readable until the object is dropped.
        for h in self._handles:
            h.remove()
        self._handles = []


def _layer_returns_tuple() -> bool:
    """transformers < 5 encoder layers return a tuple; 5.x return the hidden-state tensor."""
    try:
        import transformers

        return int(transformers.__version__.split(".")[0]) < 5
    except (ImportError, ValueError):  # pragma: no cover - transformers is a dependency
        return False


class _ProjectionsLayer(nn.Module):
    """An encoder layer cut to its Q/K/V projections (installed by :class:`ProjectionsOnly`).

    It holds the original layer's submodules under the same names, so parameter names, the
    ``state_dict`` and every hook on the submodules are the original layer's. The projections
    run as submodule calls, so capture hooks (and DeepSpeed's per-module hooks) fire as usual;
    the layer then passes its input through unchanged.
    """

    def __init__(self, layer: nn.Module, returns_tuple: bool):
        super().__init__()
        for name, child in layer.named_children():
            self.add_module(name, child)
        for name, param in layer.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, buf in layer.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        self.returns_tuple = returns_tuple

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Any:
        attn = self.attention.self
        attn.query(hidden_states)
        attn.key(hidden_states)
        attn.value(hidden_states)
        return (hidden_states,) if self.returns_tuple else hidden_states


class ProjectionsOnly:
    """Make the last encoder layer compute only its Q/K/V projections, in place.

    The relation losses (MiniLMv2, MiniLM v1) read the Q/K/V projections of one layer and
    nothing after them: that layer's attention, output projection and feed-forward are dead
    work, a quarter of a layer's matmuls and most of its elementwise work, in the forward of
    the teacher and of the student (autograd already skips their backward). With this handle
    the layer's slot in ``encoder.layer`` holds a module that computes the projections and
    returns its input, so the model's ``last_hidden_state`` is the *previous* layer's output: use
    it only where nothing reads the cut layer's output (no ``hidden`` capture of it, no TinyBERT,
    no logit KD).

    Parameters and ``state_dict`` are untouched (the stand-in holds the layer's own submodules
    under their names), so a student saved while cut is complete. :meth:`remove` puts the
    layer back.

    Args:
        model: BERT/ERNIE model or a wrapper holding one.
        layer: 0-based index (negative from the end) of the layer to cut; must be the last
            layer, since later layers would receive the wrong input.
    """

    def __init__(self, model: nn.Module, layer: int = -1):
        layer_list = encoder_layers(model)
        n = len(layer_list)
        if isinstance(layer, bool) or not isinstance(layer, int) or not -n <= layer < n:
            raise ConfigError("layers", f"layer index {layer!r} is out of range for an encoder with {n} layers")
        if layer % n != n - 1:
            raise ToolkitError(f"ProjectionsOnly cuts the last encoder layer only (layer {n - 1}), got layer "
                               f"{layer % n}: the layers after it would receive the wrong input")
        block = layer_list[n - 1]
        if isinstance(block, _ProjectionsLayer):
            raise ToolkitError(f"encoder layer {n - 1} is already cut to its projections")
        for what in ("q", "k", "v"):
            QKVCapture._projection(block, what, n - 1)   # same error as the capture for non-BERT layers
        self.layer = n - 1
        self._list: Optional[nn.ModuleList] = layer_list
        self._block = block
        layer_list[n - 1] = _ProjectionsLayer(block, _layer_returns_tuple())

    @property
    def active(self) -> bool:
        return self._list is not None

    def remove(self) -> None:
        """Put the full layer back."""
        if self._list is not None:
            self._list[self.layer] = self._block
            self._list = None

    def __enter__(self) -> "ProjectionsOnly":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class CheckpointLayers:
    """Recompute chosen encoder layers' activations in the backward instead of keeping them.

    Each chosen layer runs under ``torch.utils.checkpoint`` (non-reentrant, RNG state preserved,
    so dropout masks are the same in the recompute) while the model trains: the forward keeps
    only the layer's input, and the backward runs the layer again before differentiating it. At
    long sequences most of a small student's training memory is these activations (the
    feed-forward's ``[B, L, 4H]`` tensors above all); the price is one more forward of the
    checkpointed layers per step. It uses transformers' own per-layer switch
    (``GradientCheckpointingLayer``: ``gradient_checkpointing`` and the checkpoint function it
    calls); parameters and ``state_dict`` are untouched, and :meth:`remove` undoes it.

    Args:
        model: BERT/ERNIE model or a wrapper holding one.
        layers: 0-based indices (negative from the end) of the layers to checkpoint.
    """

    def __init__(self, model: nn.Module, layers: Iterable[int]):
        from transformers.modeling_layers import GradientCheckpointingLayer

        layer_list = encoder_layers(model)
        n = len(layer_list)
        chosen: List[int] = []
        for i in layers:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise ConfigError("layers", f"layer index {i!r} is out of range for an encoder with {n} layers")
            if i % n not in chosen:
                chosen.append(i % n)
        self.layers = sorted(chosen)
        blocks = [layer_list[j] for j in self.layers]
        for j, block in zip(self.layers, blocks):
            if isinstance(block, _ProjectionsLayer):
                raise ToolkitError(f"encoder layer {j} is cut to its projections (ProjectionsOnly); checkpoint only "
                                   f"the layers that run in full")
            if not isinstance(block, GradientCheckpointingLayer):
                raise ToolkitError(f"encoder layer {j} ({type(block).__name__}) is not a transformers "
                                   f"GradientCheckpointingLayer; activation checkpointing needs transformers >= 5")
        fn = functools.partial(checkpoint, use_reentrant=False)
        for block in blocks:
            block.gradient_checkpointing = True
            block._gradient_checkpointing_func = fn
        self._blocks: List[nn.Module] = blocks

    def remove(self) -> None:
        """Run the layers without checkpointing again."""
        for block in self._blocks:
            block.gradient_checkpointing = False
        self._blocks = []
