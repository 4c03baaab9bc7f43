"""Build, check and load the CPU package's C kernels.

A :class:`CompiledKernel` compiles its C file on first use with the system C compiler (``$CC``,
else ``cc``/``gcc``/``clang``), OpenMP and ``-march=native``, into a cache directory keyed by
the source, the shared headers, the flags, the compiler and this CPU (``-march=native`` code
must not run on another node that shares the home directory): ``$XDG_CACHE_HOME/mitkd/kernels``,
else ``~/.cache/mitkd/kernels``, created with mode 0700 and refused (so the fallback runs) when
another user owns it or a cached library is writable by others. It binds the library with ``ctypes``, runs a self-check against
a torch or float64 reference, and keeps the result for the process. Anything that goes wrong
(not Linux, no compiler, a failed build or check) is one ``RuntimeWarning`` with the reason, and
:meth:`CompiledKernel.load` returns None so the caller runs its torch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence

import torch

from toolkit.utils.cache import check_private_file, private_cache_dir

CSRC = Path(__file__).resolve().parent / "csrc"
#: Tried in order when ``-march=native`` is refused (other compilers, other architectures).
_ARCH_FLAGS = (["-march=native"], ["-mcpu=native"], [])
#: ``-ffp-contract=fast``: ISO C mode turns FMA contraction off, and the kernels' polynomials and
#: micro-kernels are chains of multiply-adds.
_BASE_FLAGS = ["-O3", "-std=c11", "-ffp-contract=fast", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
               "-fPIC", "-shared"]


def cache_dir() -> Path:
    """Where builds are kept (see the module docstring): a per-user folder with mode 0700;
    ToolkitError (so: the fallback, with the reason) when another user owns it."""
    return private_cache_dir("kernels")


def find_compiler() -> Optional[str]:
    """``$CC`` if set (even if it does not work: the user chose it), else the first of cc/gcc/clang."""
    if os.environ.get("CC"):
        return os.environ["CC"]
    for name in ("cc", "gcc", "clang"):
        if shutil.which(name):
            return name
    return None


def _cpu_id() -> str:
    """This CPU's model and instruction-set flags (what ``-march=native`` depends on)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in text.splitlines()
            if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part", "vendor_id")]
    return "\n".join(sorted(set(keep)))


def _compiler_version(cc: str) -> str:
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"
    return out.stdout.splitlines()[0] if out.returncode == 0 and out.stdout else f"exit {out.returncode}"


def build_shared(source: Path, cc: str, out_dir: Path, abi: int, extra_flags: Sequence[str] = ()) -> Path:
    """Compile the C file ``source`` into a shared library in ``out_dir``, cached by the source,
    the shared headers, flags, compiler, this CPU and ``abi`` (atomically: concurrent ranks may
    build at once). ``-march=native`` first, then the fallbacks of ``_ARCH_FLAGS``; RuntimeError
    with the compiler's messages if none builds."""
    # The kernels share headers in csrc/: on the include path for any copy of a source (tests
    # build edited copies elsewhere), and in the cache key with the source.
    src = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
    version = _compiler_version(cc)
    errors = []
    for arch in _ARCH_FLAGS:
        flags = _BASE_FLAGS + [f"-I{CSRC}"] + list(extra_flags) + arch
        key = hashlib.sha256(b"\0".join([src, " ".join(flags).encode(), version.encode(), cc.encode(),
                                         _cpu_id().encode(), str(abi).encode()])).hexdigest()[:16]
        target = out_dir / f"{source.stem}-{key}.so"
        if target.exists():
            # Loaded as code: only a file of ours that nobody else can write (else RuntimeError
            # through ToolkitError, and the caller's fallback).
            return check_private_file(target)
        out_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=out_dir)
        os.close(fd)
        try:
            proc = subprocess.run([cc, *flags, str(source), "-o", tmp], capture_output=True, text=True,
                                  timeout=300)
            if proc.returncode == 0:
                os.chmod(tmp, 0o700)
                os.replace(tmp, target)
                return target
            errors.append(f"{cc} {' '.join(flags)}: {(proc.stderr or proc.stdout).strip()[-400:]}")
        except (OSError, subprocess.SubprocessError) as e:
            errors.append(f"{cc} {' '.join(flags)}: {e}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("could not compile " + str(source) + ": " + " | ".join(errors))


class CompiledKernel:
    """One optional C kernel.

    Args:
        source: the C file.
        abi: the calling-convention version; the library's ``<prefix>_abi_version()`` must return it.
        prefix: the C symbols' prefix (``attn`` -> ``attn_abi_version``).
        bind: sets ``argtypes``/``restype`` on the loaded library.
        wrap: makes the object :meth:`load` returns from ``(lib, path, built_s)``.
        self_check: raises when the wrapped kernel computes wrong numbers.
        what: the kernel in the warning (``"the compiled CPU attention kernel"``).
        fallback: what runs instead, in the warning (``"torch's sdpa runs instead"``).
    """

    def __init__(self, source: Path, abi: int, prefix: str, bind: Callable[[ctypes.CDLL], None],
                 wrap: Callable[[ctypes.CDLL, Path, float], Any], self_check: Callable[[Any], None], what: str,
                 fallback: str):
        self.source, self.abi, self.prefix = source, abi, prefix
        self._bind, self._wrap, self._self_check = bind, wrap, self_check
        self.what, self.fallback = what, fallback
        self._lock = threading.Lock()
        self._state: dict = {}
        self._forced_off: List[bool] = []

    def load(self) -> Optional[Any]:
        """The kernel, built and checked on the first call; None (see :meth:`unavailable_reason`)
        where it cannot run. Thread-safe."""
        if self._forced_off:
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
                warnings.warn(f"{self.what} is not used ({reason}); {self.fallback} (same numbers, slower). "
                              f"cpu_accel: off silences this.", RuntimeWarning, stacklevel=4)
            self._state.update(kernel=kernel, reason=reason)
            return kernel

    def _build_and_check(self) -> Any:
        if not sys.platform.startswith("linux"):
            raise RuntimeError(f"built only on Linux (this is {sys.platform})")
        cc = find_compiler()
        if cc is None:
            raise RuntimeError("no C compiler (set $CC, or install gcc)")
        t0 = time.perf_counter()
        path = build_shared(self.source, cc, cache_dir(), self.abi)
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
