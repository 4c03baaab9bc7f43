"""oneDNN GEMMs for the linear layers of CPU fp32 models: the frozen teacher and the trained student.

torch sends an fp32 ``nn.Linear`` on x86 CPUs to MKL's sgemm. On the AMD EPYC hosts this
project runs on, oneDNN's fp32 GEMM (``torch.ops.mkldnn._linear_pointwise``, the op torch's
own inductor uses for frozen CPU linears) is ~17% faster for the same product: 2048^2 at 2
threads 214.8 against 183.9 GFLOP/s (the benchmark's own probe). It also adds the bias inside the GEMM instead of
copying it into the output first, as ``addmm`` does.

:func:`use_onednn_linears` switches every plain ``nn.Linear`` of a model to
:class:`OneDNNLinear` by changing the module's class: parameters, state-dict keys and
registered hooks (the Q/K/V captures, DeepSpeed's ZeRO-3 gather hooks) stay as they are.

* **Frozen** (``prepare_frozen``, the teacher): the no-grad forward is one oneDNN call.
* **Trained** (``trainable=True``, the engine's model on a CPU fp32 run): a small autograd
  function runs the forward and the input gradient ``dY @ W`` on oneDNN (the distillation step
  2-3% shorter, benchmarks/RESULTS.md run O), and the weight gradient ``dYᵀ X`` on MKL (``mm``; oneDNN was not faster for
  this reduction over the tokens). It saves what ``F.linear`` saves (the weight, and the input
  where the weight gets a gradient), so memory is unchanged, and it works under activation checkpointing and ZeRO-3 (the
  parameter itself is saved, not a view, so the backward reads the weight ZeRO gathered for it).
  It is differentiable once: a double backward (``create_graph=True`` through the gradient)
  raises, so switch such a model back with :func:`restore_linears` or ``TOOLKIT_ONEDNN_LINEAR=0``.

* **Feed-forward GELU**: a block whose ``dense`` layer is switched and whose activation is the exact
  (erf) GELU runs ``gelu(dense(x))`` as one oneDNN call with a GELU post-op where nothing needs
  a gradient (the teacher; a trained model in evaluation), one memory pass over ``[B, L, 4H]``
  fewer (:func:`fuse_dense_gelu`; the post-op is checked against ``F.gelu`` once). Where a
  gradient is due, the GELU and its backward run on the compiled kernel (``_CompiledGelu``), and
  a BERT/ERNIE layer's whole feed-forward is one autograd function that keeps the GELU's input
  and recomputes its output in the backward (:func:`recompute_feed_forward_gelu`).

Either way, the oneDNN path is taken only for fp32 CPU tensors outside CPU autocast;
``nn.Linear``'s forward runs otherwise, so a model that moves to a GPU, is cast to bf16 or runs
under autocast keeps working. The results differ from MKL's in the last bits (~1e-6 relative).
Before the first switch in a process the op is checked against ``F.linear`` (forward and the
transposed-weight product of the backward); a missing op, a failed check or
``TOOLKIT_ONEDNN_LINEAR=0`` leaves the model alone (the reason is in
:func:`onednn_unavailable_reason`).
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from toolkit.cpu import gemm as cpu_linear
from toolkit.cpu import wgrad as cpu_wgrad
from toolkit.cpu.bind import BoundMethod

_CHECK: dict = {}


def onednn_gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ weight.T + bias`` on oneDNN (``weight`` may be a strided view, e.g. a transpose)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def onednn_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ weight.T + bias`` for fp32 CPU tensors: on the compiled GEMM kernel of
    :mod:`toolkit.kernels.cpu_linear` where it builds, else on oneDNN (``weight`` may be a
    strided view, e.g. a transpose)."""
    kernel = cpu_linear.load()
    if kernel is not None and x.numel() >= cpu_linear.MIN_ROWS * x.shape[-1]:
        return kernel.linear(x, weight, bias)
    return onednn_gemm(x, weight, bias)


class _OneDNNLinearFunction(torch.autograd.Function):
    """``F.linear`` with oneDNN's forward and input gradient; the weight and bias gradients from
    the compiled kernel of :mod:`toolkit.kernels.cpu_wgrad` (MKL's ``mm`` and a ``sum`` without it)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        # The input only for the weight gradient: a frozen layer keeps only its weight, as
        # F.linear's autograd does.
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        x, weight = ctx.saved_tensors
        return _linear_backward(grad, x, weight, *ctx.needs_input_grad[:2], ctx.has_bias and ctx.needs_input_grad[2])


def _linear_backward(grad: Tensor, x: Optional[Tensor], weight: Tensor, wants_x: bool, wants_w: bool,
                     wants_b: bool) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(dX, dW, db)`` of ``y = x Wᵀ + b`` from ``grad = dL/dy``, each None unless wanted: dX on the
    GEMM of :func:`onednn_linear`, dW and db from the compiled kernel of :mod:`toolkit.kernels.cpu_wgrad`
    (MKL's ``mm`` and a ``sum`` without it)."""
    grad_x = grad_w = grad_b = None
    if wants_x:
        grad_x = onednn_linear(grad, weight.t(), None)              # dY @ W
    kernel = cpu_wgrad.load() if wants_w else None
    if kernel is not None:
        grad_w, grad_b = kernel.weight_grad(grad, x, wants_b)       # dW and db in one pass over dY
    elif wants_w or wants_b:
        grad2 = grad.reshape(-1, grad.shape[-1])
        if wants_w:
            grad_w = grad2.t().mm(x.reshape(-1, x.shape[-1]))       # dY^T X, summed over the tokens
        if wants_b:
            grad_b = grad2.sum(0)
    return grad_x, grad_w, grad_b


class OneDNNLinear(nn.Linear):
    """``nn.Linear`` whose fp32 CPU forward (and backward) runs oneDNN's GEMM with the bias fused."""

    def forward(self, x: Tensor) -> Tensor:
        return linear_forward(x, self.weight, self.bias)


def linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN (with its backward) for fp32 CPU tensors outside
    CPU autocast, else ``F.linear`` itself."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32
            or torch.is_autocast_enabled("cpu")):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _OneDNNLinearFunction.apply(x, weight, bias)
    return onednn_linear(x, weight, bias)


def onednn_unavailable_reason() -> Optional[str]:
    """None when :func:`use_onednn_linears` would switch layers here, else why not."""
    if "reason" not in _CHECK:
        _CHECK["reason"] = _check()
    return _CHECK["reason"]


def _check() -> Optional[str]:
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return "this torch build has no oneDNN linear op"
    try:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(3, 7, 40, generator=gen)
        w, b = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
        g = torch.randn(3, 7, 24, generator=gen)
        errs = []
        for got, want in ((onednn_gemm(x, w, b), F.linear(x.double(), w.double(), b.double())),
                          (onednn_gemm(g, w.t(), None), g.double() @ w.double())):
            errs.append(float((got.double() - want).abs().max() / want.abs().max()))
        err = max(errs)
    except Exception as e:  # noqa: BLE001 - an optional fast path: any failure means "not here"
        return f"the oneDNN linear op failed: {type(e).__name__}: {e}"
    if not err <= 1e-5:
        return f"the oneDNN linear op differs from F.linear by {err:.1e}"
    return None


def _is_exact_gelu(act: Any) -> bool:
    """transformers' ``"gelu"`` activation (erf GELU through ``F.gelu``) or ``nn.GELU()``."""
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    return type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is F.gelu


def _gelu_postop_reason() -> Optional[str]:
    """None when oneDNN's GELU post-op matches ``F.gelu`` here, else why not (checked once)."""
    if "gelu" not in _CHECK:
        try:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(3, 7, 40, generator=gen) * 2.0
            w, b = torch.randn(24, 40, generator=gen), torch.randn(24, generator=gen)
            got = torch.ops.mkldnn._linear_pointwise(x, w, b, "gelu", [], "none").double()
            want = F.gelu(F.linear(x.double(), w.double(), b.double()))
            err = float((got - want).abs().max() / want.abs().max())
            _CHECK["gelu"] = None if err <= 1e-5 else f"oneDNN's GELU post-op differs from F.gelu by {err:.1e}"
        except Exception as e:  # noqa: BLE001 - an optional fusion: any failure means "not here"
            _CHECK["gelu"] = f"oneDNN's GELU post-op failed: {type(e).__name__}: {e}"
    return _CHECK["gelu"]


class _CompiledGelu(torch.autograd.Function):
    """``F.gelu`` (erf form) on the compiled kernel of :mod:`toolkit.kernels.cpu_linear`, forward and
    backward (one pass each, ~2x cheaper than ATen's here); saves its input, as ``F.gelu`` does."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, kernel: Any) -> Tensor:
        ctx.save_for_backward(h)
        ctx.kernel = kernel
        return kernel.gelu(h)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Tensor, None]:
        h, = ctx.saved_tensors
        return ctx.kernel.gelu_grad(h, grad.contiguous()), None


def _dense_gelu_forward(self: nn.Module, hidden_states: Tensor) -> Tensor:
    """``gelu(dense(x))`` of a feed-forward block (bound by :func:`use_onednn_linears`): where nothing
    needs a gradient, one call (GEMM, bias, GELU: oneDNN's post-op, else the compiled kernel's
    epilogue); where something does, the dense layer and then the compiled kernel's GELU with its
    backward; the block's own forward otherwise."""
    dense = self.dense
    bias = dense.bias
    if (type(dense) is OneDNNLinear and hidden_states.device.type == "cpu" and hidden_states.dtype == torch.float32
            and dense.weight.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        if torch.is_grad_enabled() and (hidden_states.requires_grad or dense.weight.requires_grad
                                        or (bias is not None and bias.requires_grad)):
            kernel = cpu_linear.load()
            if kernel is not None:
                return _CompiledGelu.apply(dense(hidden_states), kernel)
        elif not dense._forward_hooks and not dense._forward_pre_hooks:
            # oneDNN's GELU post-op costs ~1.0 ms at 4096 x 384 -> 1536 here, the kernel's
            # epilogue ~1.3 (bench_gemm.py): the kernel's runs where the post-op fails its check.
            if _gelu_postop_reason() is None:
                return torch.ops.mkldnn._linear_pointwise(hidden_states, dense.weight, bias, "gelu", [], "none")
            kernel = cpu_linear.load()
            if kernel is not None:
                return kernel.linear(hidden_states, dense.weight, bias, gelu=True)
    return type(self).forward(self, hidden_states)


class _FeedForwardFunction(torch.autograd.Function):
    """``gelu(x W1ᵀ + b1) W2ᵀ + b2``, a feed-forward block's two GEMMs and GELU, saving ``x`` and
    the GELU's input ``h`` but not its output ``g``: the backward recomputes ``g = gelu(h)`` (one
    GELU pass) where autograd would have kept it for ``dW2``. ``g`` is ``[tokens, intermediate]``,
    the largest activation a BERT layer saves (4H per token of ~16H): ~12 MiB per layer at seq 512
    batch 4. The GEMMs as :class:`_OneDNNLinearFunction` runs them, the GELU on the compiled kernel."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w1: Tensor, b1: Optional[Tensor], w2: Tensor, b2: Optional[Tensor],
                kernel: Any) -> Tensor:
        h = onednn_linear(x, w1, b1)
        y = onednn_linear(kernel.gelu(h), w2, b2)
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w1, h, w2)
        ctx.kernel, ctx.has_b1, ctx.has_b2 = kernel, b1 is not None, b2 is not None
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tuple[Optional[Tensor], ...]:
        x, w1, h, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad = grad.contiguous()
        g = ctx.kernel.gelu(h) if need[3] else None                  # recomputed, not saved
        dg, dw2, db2 = _linear_backward(grad, g, w2, any(need[:3]), need[3], ctx.has_b2 and need[4])
        del g
        dx = dw1 = db1 = None
        if dg is not None:
            dh = ctx.kernel.gelu_grad(h, dg)
            del dg
            dx, dw1, db1 = _linear_backward(dh, x, w1, need[0], need[1], ctx.has_b1 and need[2])
        return dx, dw1, db1, dw2, db2, None


def _feed_forward_chunk(self: nn.Module, attention_output: Tensor) -> Tensor:
    """A BERT/ERNIE layer's feed-forward (``output(intermediate(x), x)``) with its GEMMs and GELU as
    one :class:`_FeedForwardFunction` where a gradient is due (bound by :func:`use_onednn_linears`
    on a trained model); the layer's own method otherwise."""
    inter, out = self.intermediate, self.output
    d1, d2 = inter.dense, out.dense
    x = attention_output
    if (torch.is_grad_enabled() and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and type(d1) is OneDNNLinear and type(d2) is OneDNNLinear
            and d1.weight.dtype == torch.float32 and d2.weight.dtype == torch.float32
            and not any(m._forward_hooks or m._forward_pre_hooks for m in (inter, d1, out, d2))
            and (x.requires_grad or any(p.requires_grad for p in (*d1.parameters(), *d2.parameters())))):
        kernel = cpu_linear.load()
        if kernel is not None:
            y = _FeedForwardFunction.apply(x, d1.weight, d1.bias, d2.weight, d2.bias, kernel)
            return out.LayerNorm(out.dropout(y) + x)
    return type(self).feed_forward_chunk(self, attention_output)


def _is_bert_feed_forward(layer: nn.Module) -> bool:
    """A layer whose ``feed_forward_chunk`` is BERT's ``output(intermediate(x), x)`` (BERT, ERNIE, ...)
    with an exact-GELU intermediate and an output of dense, dropout and LayerNorm on oneDNN."""
    inter, out = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    return (callable(getattr(type(layer), "feed_forward_chunk", None)) and "feed_forward_chunk" not in layer.__dict__
            and type(getattr(inter, "dense", None)) is OneDNNLinear
            and _is_exact_gelu(getattr(inter, "intermediate_act_fn", None))
            and type(getattr(out, "dense", None)) is OneDNNLinear
            and isinstance(getattr(out, "LayerNorm", None), nn.LayerNorm) and hasattr(out, "dropout")
            and type(inter).forward.__qualname__.endswith("Intermediate.forward")
            and type(out).forward.__qualname__.endswith("Output.forward"))


def recompute_feed_forward_gelu(model: nn.Module) -> int:
    """Bind :class:`_FeedForwardFunction` to every BERT-style layer of a trained CPU model (done by
    :func:`use_onednn_linears` with ``trainable``): the GELU's output is recomputed in the backward
    instead of kept (~10% less peak memory at seq 512 batch 4 for one GELU pass per layer, a
    cost the step's A/B does not resolve: ``bench_row_kernel_ab.py --switch ffn-recompute``,
    benchmarks/RESULTS.md run U). Needs the compiled GEMM kernel (for its
    GELU); ``TOOLKIT_FFN_RECOMPUTE=0`` keeps the layers' own methods. Returns how many layers."""
    if cpu_linear.load() is None:
        return 0
    n = 0
    for module in model.modules():
        if _is_bert_feed_forward(module):
            module.feed_forward_chunk = BoundMethod(_feed_forward_chunk, module)
            n += 1
    return n


def _is_bound(module: nn.Module, attr: str, func: Any) -> bool:
    """Whether ``module``'s own ``attr`` is ``func`` bound to it (a method these switches bound)."""
    return getattr(module.__dict__.get(attr), "__func__", None) is func


def _unbind(model: nn.Module, attr: str, func: Any) -> int:
    """Drop every ``attr`` bound to ``func`` in ``model``'s modules (their class's method again); how many."""
    n = 0
    for module in model.modules():
        if _is_bound(module, attr, func):
            del module.__dict__[attr]
            n += 1
    return n


def count_recomputed_feed_forward(model: nn.Module) -> int:
    """How many layers of ``model`` run :class:`_FeedForwardFunction` when training."""
    return sum(_is_bound(m, "feed_forward_chunk", _feed_forward_chunk) for m in model.modules())


def fuse_dense_gelu(model: nn.Module) -> int:
    """Bind the one-call GEMM + GELU forward to ``model``'s feed-forward blocks whose dense layer is
    on oneDNN and whose activation is the exact GELU; returns how many (done by
    :func:`use_onednn_linears`). Needs the compiled GEMM kernel or oneDNN's GELU post-op."""
    if cpu_linear.load() is None and _gelu_postop_reason() is not None:
        return 0
    n = 0
    for module in model.modules():
        dense = getattr(module, "dense", None)
        if (type(dense) is OneDNNLinear and _is_exact_gelu(getattr(module, "intermediate_act_fn", None))
                and "forward" not in module.__dict__):
            module.forward = BoundMethod(_dense_gelu_forward, module)
            n += 1
    return n


def count_fused_gelu(model: nn.Module) -> int:
    """How many feed-forward blocks of ``model`` run GEMM + GELU as one oneDNN call without grad."""
    return sum(_is_bound(m, "forward", _dense_gelu_forward) for m in model.modules())


def restore_feed_forward(model: nn.Module) -> int:
    """Undo :func:`recompute_feed_forward_gelu` (the layers' own ``feed_forward_chunk``); returns how many."""
    return _unbind(model, "feed_forward_chunk", _feed_forward_chunk)


def unfuse_dense_gelu(model: nn.Module) -> int:
    """Undo :func:`fuse_dense_gelu` and :func:`recompute_feed_forward_gelu`; returns how many blocks."""
    restore_feed_forward(model)
    return _unbind(model, "forward", _dense_gelu_forward)


def use_onednn_linears(model: nn.Module, trainable: bool = False) -> int:
    """Switch the plain ``nn.Linear`` layers of a CPU fp32 model to oneDNN; returns how many.

    Without ``trainable`` only a frozen model is switched (no parameter requires a gradient):
    the teacher. With it, any CPU fp32 model (the engine's student or task model). Does nothing
    (returns 0) where :func:`onednn_unavailable_reason` gives a reason, or when the model lives
    off the CPU or is not fp32.
    """
    params = list(model.parameters())
    if not params or (not trainable and any(p.requires_grad for p in params)):
        return 0
    if any(p.device.type != "cpu" or p.dtype != torch.float32 for p in params):
        return 0
    if onednn_unavailable_reason() is not None:
        return 0
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = OneDNNLinear
            n += 1
    fuse_dense_gelu(model)
    if trainable:
        recompute_feed_forward_gelu(model)
    return n


def gemm_note(n: int, trained: bool = False, model: Optional[nn.Module] = None) -> str:
    """What runs ``n`` switched layers' GEMMs, for the job log: ``"the CPU kernel from 4096 rows,
    oneDNN below (13 layers, weight gradients on the CPU kernel, GELU output recomputed in the
    backward in 2 layers)"``, ``"oneDNN (6 layers)"``; ``"MKL (why)"`` when n is 0. The
    recomputed feed-forwards are counted in ``model`` when given."""
    if not n:
        return f"MKL ({onednn_unavailable_reason() or 'not fp32'})"
    gemm = (f"the CPU kernel from {cpu_linear.MIN_ROWS} rows, oneDNN below"
            if cpu_linear.unavailable_reason() is None else "oneDNN")
    if not trained:
        return f"{gemm} ({n} layers)"
    wgrad = "the CPU kernel" if cpu_wgrad.unavailable_reason() is None else f"MKL ({cpu_wgrad.unavailable_reason()})"
    ffn = count_recomputed_feed_forward(model) if model is not None else 0
    recompute = f", GELU output recomputed in the backward in {ffn} layers" if ffn else ""
    return f"{gemm} ({n} layers, weight gradients on {wgrad}{recompute})"


def count_onednn_linears(model: nn.Module) -> int:
    """How many of ``model``'s layers :func:`use_onednn_linears` switched."""
    return sum(type(m) is OneDNNLinear for m in model.modules())


def restore_linears(model: nn.Module) -> int:
    """Undo :func:`use_onednn_linears` (MKL's ``nn.Linear`` again); returns how many."""
    unfuse_dense_gelu(model)
    n = 0
    for module in model.modules():
        if type(module) is OneDNNLinear:
            module.__class__ = nn.Linear
            n += 1
    return n
