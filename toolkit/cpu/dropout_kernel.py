"""A compiled CPU generator of dropout keep masks (optional, with fallback to torch's RNG).

:mod:`toolkit.models.dropout` keeps an element when a 15-bit uniform is at least
``k = round(p * 2^15)``. torch's CPU ``random_()`` draws those bits from one MT19937 stream on
one thread (~2 ms per ``[32, 128, 384]`` dropout site on the hosts here, five sites per
distillation step). ``csrc/dropout.c`` draws them from a counter-based generator instead: the
splitmix64 sequence started at a seed, four 15-bit uniforms per 64-bit word, computed by any
thread for any word, so the loop runs on every thread and vectorises. The seed is drawn from
torch's default generator, so ``torch.manual_seed``, checkpointed RNG states and activation
checkpointing (which replays torch's RNG state) reproduce the masks exactly, as before.

The masks differ from the torch path's (another generator) but follow the same keep rule with
the same rate. The same library applies a mask (``x * keep * scale``, the dropout's forward and
backward) in one pass on every thread, where torch's ``native_dropout_backward`` takes three
(the bool mask to floats, the product, the scale): ~1.1 ms per ``[32, 128, 384]`` site, ten per
distillation step at seq 128 batch 32. Built, checked (the words against a Python splitmix64) and loaded like the other
kernels (:mod:`toolkit.kernels.compiled`); ``TOOLKIT_CPU_DROPOUT=0`` keeps torch's generator.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from toolkit.cpu.compiled import CompiledKernel

SOURCE = Path(__file__).resolve().parent / "csrc" / "dropout.c"
ABI_VERSION = 2
_GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


@dataclass
class DropoutKernel:
    """A loaded build of ``dropout.c``."""

    lib: ctypes.CDLL
    path: Path
    built_s: float

    def keep_mask(self, n: int, threshold: int, seed: int) -> Tensor:
        """``[n]`` bool: element ``i`` kept when its 15-bit uniform is ``>= threshold``."""
        if not 0 <= threshold <= 1 << 15 or n < 0:
            raise ValueError(f"cpu_dropout: threshold must be in [0, 2^15] and n >= 0, got {threshold}, {n}")
        keep = torch.empty(n, dtype=torch.bool)
        self.lib.drop_keep_mask(keep.data_ptr(), n, seed & _M64, threshold, torch.get_num_threads())
        return keep

    def masked_scale(self, x: Tensor, keep: Tensor, scale: float) -> Tensor:
        """``x * keep * scale`` (a new tensor) for a contiguous fp32 CPU ``x`` and a bool ``keep`` of its shape."""
        if (x.dtype != torch.float32 or x.device.type != "cpu" or keep.dtype != torch.bool or keep.shape != x.shape
                or not x.is_contiguous() or not keep.is_contiguous()):
            raise ValueError(f"cpu_dropout: masked_scale needs a contiguous fp32 CPU x and a bool keep of its shape, "
                             f"got {x.dtype} {tuple(x.shape)} on {x.device} and {keep.dtype} {tuple(keep.shape)}")
        out = torch.empty_like(x)
        self.lib.drop_masked_scale(x.data_ptr(), keep.data_ptr(), out.data_ptr(), x.numel(), scale,
                                   torch.get_num_threads())
        return out

    def words(self, n: int, seed: int) -> list:
        """The generator's first ``n`` 64-bit words (for the tests and the self-check)."""
        out = (ctypes.c_uint64 * n)()
        self.lib.drop_words(out, n, seed & _M64)
        return list(out)


def splitmix64(seed: int, n: int) -> list:
    """The first ``n`` outputs of splitmix64 started at ``seed``, in Python (the reference)."""
    out, state = [], seed & _M64
    for _ in range(n):
        state = (state + _GOLDEN) & _M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        out.append(z ^ (z >> 31))
    return out


def reference_mask(n: int, threshold: int, seed: int) -> Tensor:
    """What :meth:`DropoutKernel.keep_mask` must return, in Python."""
    bits = []
    for z in splitmix64(seed, (n + 3) // 4):
        bits.extend(((z >> (16 * t)) & 0x7FFF) >= threshold for t in range(4))
    return torch.tensor(bits[:n], dtype=torch.bool)


def _bind(lib: ctypes.CDLL) -> None:
    lib.drop_keep_mask.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int32, ctypes.c_int]
    lib.drop_keep_mask.restype = None
    lib.drop_words.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64]
    lib.drop_words.restype = None
    lib.drop_masked_scale.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                      ctypes.c_float, ctypes.c_int]
    lib.drop_masked_scale.restype = None


def _self_check(kernel: DropoutKernel) -> None:
    seed = 0xDEADBEEF12345678
    if kernel.words(9, seed) != splitmix64(seed, 9):
        raise RuntimeError(f"{kernel.path}: the generator's words differ from splitmix64")
    for n, k in ((1, 3277), (23, 3277), (4099, 16384), (64, 0), (64, 1 << 15)):
        if not torch.equal(kernel.keep_mask(n, k, seed + n), reference_mask(n, k, seed + n)):
            raise RuntimeError(f"{kernel.path}: the keep mask (n={n}, threshold={k}) differs from the reference")
    x = torch.randn(4099, generator=torch.Generator().manual_seed(0))
    x[7] = float("nan")
    keep = reference_mask(4099, 16384, seed)
    keep[7] = False
    want = torch.ops.aten.native_dropout_backward(x, keep, 1.25)
    if not torch.equal(kernel.masked_scale(x, keep, 1.25).nan_to_num(7.0), want.nan_to_num(7.0)):
        raise RuntimeError(f"{kernel.path}: the masked scale differs from torch's x * keep * scale")


_KERNEL = CompiledKernel(SOURCE, ABI_VERSION, "drop", _bind, DropoutKernel, _self_check,
                         "dropout: the compiled CPU mask generator and masked scale",
                         "torch's random_() makes the masks and ATen applies them instead")


# load() builds and checks the kernel on first use (None where it cannot run), unavailable_reason()
# says why, disabled() turns it off in a block (tests, comparisons), reset() forgets it.
load, unavailable_reason, disabled, reset = _KERNEL.entry_points()
