"""Load an optional C kernel: build it on first use, check it, or say once why not.

:mod:`toolkit.kernels.cpu_attention` and :mod:`toolkit.models.dropout` use this (the relation
KL's row kernel, :mod:`toolkit.kernels.cpu_rows`, predates it and does the same by hand). A
:class:`CompiledKernel` builds its C file with :func:`toolkit.kernels.cpu_rows.build_shared`
(system compiler, OpenMP, ``-march=native``, cached per CPU in a per-user folder of mode 0700
that is refused when another user owns it: :func:`toolkit.utils.cache.private_cache_dir`), binds it with ``ctypes``, runs a
self-check against a torch or float64 reference, and keeps the result for the process. Anything
that goes wrong (not Linux, no compiler, a failed build or check) is one ``RuntimeWarning`` with
the reason, and :meth:`CompiledKernel.load` returns None so the caller runs its torch path. An
environment variable (``0``/``false``/``off``/``no``) turns the kernel off.
"""
from __future__ import annotations

import ctypes
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import torch

from toolkit.kernels import cpu_rows
from toolkit.utils.env import switched_off


class CompiledKernel:
    """One optional C kernel.

    Args:
        source: the C file.
        abi: the calling-convention version; the library's ``<prefix>_abi_version()`` must return it.
        prefix: the C symbols' prefix (``attn`` -> ``attn_abi_version``).
        env_var: the variable that turns the kernel off.
        bind: sets ``argtypes``/``restype`` on the loaded library.
        wrap: makes the object :meth:`load` returns from ``(lib, path, built_s)``.
        self_check: raises when the wrapped kernel computes wrong numbers.
        what: the kernel in the warning (``"the compiled CPU attention kernel"``).
        fallback: what runs instead, in the warning (``"torch's sdpa runs instead"``).
    """

    def __init__(self, source: Path, abi: int, prefix: str, env_var: str, bind: Callable[[ctypes.CDLL], None],
                 wrap: Callable[[ctypes.CDLL, Path, float], Any], self_check: Callable[[Any], None], what: str,
                 fallback: str):
        self.source, self.abi, self.prefix, self.env_var = source, abi, prefix, env_var
        self._bind, self._wrap, self._self_check = bind, wrap, self_check
        self.what, self.fallback = what, fallback
        self._lock = threading.Lock()
        self._state: dict = {}
        self._forced_off: List[bool] = []

    def load(self) -> Optional[Any]:
        """The kernel, built and checked on the first call; None (see :meth:`unavailable_reason`)
        where it cannot run. Thread-safe; raises only a ConfigError for a malformed switch."""
        if self._forced_off or switched_off(self.env_var):
            return None
        if "reason" in self._state:     # the hot path (every attention call, every dropout site): no lock
            return self._state["kernel"]
        with self._lock:
            if "reason" in self._state:
                return self._state["kernel"]
            kernel, reason = None, ""
            try:
                kernel = self._build_and_check()
            except Exception as e:  # noqa: BLE001 - an optional accelerator: any failure means fallback
                kernel, reason = None, f"{type(e).__name__}: {e}"
                warnings.warn(f"{self.what} is not used ({reason}); {self.fallback} (same numbers, slower on "
                              f"CPUs). {self.env_var}=0 silences this.", RuntimeWarning, stacklevel=4)
            self._state.update(kernel=kernel, reason=reason)
            return kernel

    def _build_and_check(self) -> Any:
        if not sys.platform.startswith("linux"):
            raise RuntimeError(f"built only on Linux (this is {sys.platform})")
        cc = cpu_rows.find_compiler()
        if cc is None:
            raise RuntimeError("no C compiler (set $CC, or install gcc)")
        t0 = time.perf_counter()
        path = cpu_rows.build_shared(self.source, cc, cpu_rows.cache_dir(), self.abi)
        lib = ctypes.CDLL(str(path))
        version = getattr(lib, f"{self.prefix}_abi_version")()
        if version != self.abi:
            raise RuntimeError(f"{path} has calling convention {version}, expected {self.abi}")
        self._bind(lib)
        kernel = self._wrap(lib, path, time.perf_counter() - t0)
        # The first use may come under no_grad / inference_mode, or inside an autograd
        # Function's forward; the self-checks take float64 gradients by autograd.
        with torch.inference_mode(False), torch.enable_grad():
            self._self_check(kernel)
        return kernel

    def unavailable_reason(self) -> Optional[str]:
        """Why :meth:`load` returns None, or None when the kernel runs."""
        if self._forced_off:
            return "turned off in this process (disabled())"
        env_off = switched_off(self.env_var)
        if env_off:
            return f"turned off by {env_off}"
        if "reason" not in self._state:
            self.load()
        return self._state["reason"] or None

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Run the torch path inside this block (tests, comparisons)."""
        self._forced_off.append(True)
        try:
            yield
        finally:
            self._forced_off.pop()

    def reset(self) -> None:
        """Forget the loaded kernel and its failure reason (tests)."""
        with self._lock:
            self._state.clear()

    def entry_points(self) -> tuple:
        """``(load, unavailable_reason, disabled, reset)``: what a kernel module exports, as
        ``load, unavailable_reason, disabled, reset = _KERNEL.entry_points()``."""
        return self.load, self.unavailable_reason, self.disabled, self.reset


def max_rel_error(got: "torch.Tensor", want: "torch.Tensor") -> float:
    """``max |got - want| / max |want|``: how the kernels' self-checks compare with float64."""
    return float((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))
