"""A compiled CPU kernel for the row math of the chunked relation KL (optional, with fallback).

The chunked path (:mod:`toolkit.kernels.relation_kl_chunked`) leaves the logits matmuls to
torch (MKL) and, per query block, needs about ten elementwise passes over ``[b, R, rows, L]``:
two softmaxes, row maxima, differences, a row dot product, ``p_s - p_t``. On CPUs those passes
cost more than the matmuls. ``csrc/relation_kl_rows.c`` does them in one sweep per row that
stays in L1, and with the student's self relation also symmetrises the block gradient so one
gradient matmul replaces two (docs/KERNELS.md has the figures).

The C file is compiled on first use with the system C compiler (``$CC``, else ``cc``/``gcc``/
``clang``) and OpenMP, in well under a second, into a cache directory keyed by the source, the
flags, the compiler and this CPU (``-march=native`` code must not run on another node that
shares the home directory): ``$TOOLKIT_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/mitkd/kernels``,
else ``~/.cache/mitkd/kernels``, created with mode 0700 and refused (so the fallback runs) when
another user owns it or a cached library is writable by others. A fresh build is checked against the torch block math before
it is used. Anything that goes wrong (no compiler, no OpenMP, not Linux, a failed check) is
reported once as a warning with the reason, and the torch block math runs instead: same
numbers to fp32 rounding, only slower. ``TOOLKIT_CPU_KERNEL=0`` turns the kernel off.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch
from torch import Tensor

from toolkit.utils.env import switched_off
from toolkit.utils.cache import check_private_file, private_cache_dir

_CSRC = Path(__file__).resolve().parent / "csrc"
SOURCE = _CSRC / "relation_kl_rows.c"
ABI_VERSION = 1
#: Tried in order when ``-march=native`` is refused (other compilers, other architectures).
_ARCH_FLAGS = (["-march=native"], ["-mcpu=native"], [])
#: ``-ffp-contract=fast``: ISO C mode turns FMA contraction off, and the kernels' polynomials and
#: micro-kernels are chains of multiply-adds (the relation KL ~4% faster with it, the attention
#: micro-kernels twice as fast).
_BASE_FLAGS = ["-O3", "-std=c11", "-ffp-contract=fast", "-fopenmp", "-fno-math-errno", "-fno-trapping-math",
               "-fPIC", "-shared"]


@dataclass
class RowKernel:
    """A loaded build of ``relation_kl_rows.c``."""

    lib: ctypes.CDLL
    path: Path
    built_s: float     # seconds spent compiling in this process (0.0: taken from the cache)

    def block(self, a: Tensor, s: Tensor, heads: int, row0: int, key_valid: Optional[Tensor], want_grad: bool,
              symmetric: bool) -> Tensor:
        """Row KL ``[n, R, rows]`` of one block; ``a`` is clobbered, ``s`` becomes the block's
        gradient ``p_s - p_t`` (``+`` its transpose with ``symmetric``) when ``want_grad``.

        ``a``, ``s``: contiguous fp32 ``[n, R, rows, L]`` logits on the CPU; ``key_valid``: None or
        a contiguous uint8 ``[n, L]``.
        """
        n, r, rows, length = s.shape
        # The C code walks raw pointers: anything but contiguous fp32 CPU blocks of one shape
        # (and a [n, L] byte mask) would read or write the wrong memory.
        ok = (a.shape == s.shape and a.dtype == s.dtype == torch.float32 and a.device.type == s.device.type == "cpu"
              and a.is_contiguous() and s.is_contiguous())
        if key_valid is not None:
            ok = ok and (key_valid.dtype == torch.uint8 and key_valid.is_contiguous()
                         and tuple(key_valid.shape) == (n, length) and n * r > 0 and r == heads)
        if not ok:
            raise ValueError(f"cpu_rows: expected contiguous fp32 CPU logits of one shape and a contiguous uint8 "
                             f"[n, L] mask, got {tuple(a.shape)} {a.dtype}, {tuple(s.shape)} {s.dtype}, mask "
                             f"{None if key_valid is None else (tuple(key_valid.shape), key_valid.dtype)}")
        row_kl = torch.empty(n, r, rows, dtype=torch.float32)
        self.lib.relkl_block(a.data_ptr(), s.data_ptr(), n * r, rows, length, heads, row0,
                             None if key_valid is None else key_valid.data_ptr(), row_kl.data_ptr(),
                             int(want_grad), int(symmetric and rows == length), torch.get_num_threads())
        return row_kl

    def exp_nonpos(self, x: Tensor) -> Tensor:
        """The kernel's own ``exp`` (for the tests): contiguous fp32 in, fp32 out."""
        x = x.to(torch.float32).contiguous()
        y = torch.empty_like(x)
        self.lib.relkl_exp_nonpos(x.data_ptr(), y.data_ptr(), x.numel())
        return y


_LOCK = threading.Lock()
_STATE: dict = {}          # "kernel": RowKernel | None, "reason": str
_FORCED_OFF: List[bool] = []


def _disabled_by_env() -> Optional[str]:
    return switched_off("TOOLKIT_CPU_KERNEL")


def cache_dir() -> Path:
    """Where builds are kept (see the module docstring): a per-user folder with mode 0700;
    ToolkitError (so: the fallback, with the reason) when another user owns it."""
    return private_cache_dir("kernels", override=os.environ.get("TOOLKIT_KERNEL_CACHE"))


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


def _build(cc: str, out_dir: Path) -> Path:
    """Compile SOURCE into ``out_dir`` (atomically: concurrent ranks may build at once)."""
    return build_shared(SOURCE, cc, out_dir, ABI_VERSION)


def build_shared(source: Path, cc: str, out_dir: Path, abi: int, extra_flags: Sequence[str] = ()) -> Path:
    """Compile the C file ``source`` into a shared library in ``out_dir``, cached by the source,
    flags, compiler, this CPU and ``abi`` (atomically: concurrent ranks may build at once).
    ``-march=native`` first, then the fallbacks of ``_ARCH_FLAGS``; RuntimeError with the
    compiler's messages if none builds."""
    # The kernels share headers in csrc/ (exp_nonpos.h): on the include path for any copy of a
    # source (tests build edited copies elsewhere), and in the cache key with the source.
    src = source.read_bytes() + b"".join(h.read_bytes() for h in sorted(_CSRC.glob("*.h")))
    version = _compiler_version(cc)
    errors = []
    for arch in _ARCH_FLAGS:
        flags = _BASE_FLAGS + [f"-I{_CSRC}"] + list(extra_flags) + arch
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


def _bind(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    if lib.relkl_abi_version() != ABI_VERSION:
        raise RuntimeError(f"{path} has calling convention {lib.relkl_abi_version()}, expected {ABI_VERSION}")
    i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.relkl_block.argtypes = [ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, cint, cint, cint]
    lib.relkl_block.restype = None
    lib.relkl_exp_nonpos.argtypes = [ptr, ptr, i64]
    lib.relkl_exp_nonpos.restype = None
    return lib


def _self_check(kernel: RowKernel) -> None:
    """The build against the torch block math on a padded block, both gradient forms."""
    from toolkit.kernels.relation_kl_chunked import _block_kl

    gen = torch.Generator().manual_seed(0)
    n, heads, length, d = 2, 3, 37, 8
    q = torch.randn(n, heads, length, d, generator=gen) * 2.0
    k = torch.randn(n, heads, length, d, generator=gen) * 2.0
    valid = torch.ones(n, length, dtype=torch.bool)
    valid[1, 29:] = False
    key_pad = ~valid[:, None, None, :]
    ref_kl, ref_g = _block_kl(q, k.transpose(-1, -2), k, q.transpose(-1, -2), key_pad, True)
    ref_kl = ref_kl.masked_fill(~valid[:, None, :], 0.0)
    ref_g = ref_g.masked_fill(~valid[:, None, :, None], 0.0)
    a, s = q @ k.transpose(-1, -2), k @ q.transpose(-1, -2)
    kv = valid.to(torch.uint8).contiguous()
    for symmetric in (False, True):
        a_c, s_c = a.clone(), s.clone()
        got_kl = kernel.block(a_c, s_c, heads, 0, kv, True, symmetric)
        want_g = ref_g + ref_g.transpose(-1, -2) if symmetric else ref_g
        for what, got, want in (("row KL", got_kl, ref_kl), ("gradient", s_c, want_g)):
            err = float((got - want).abs().max())
            if not err <= 1e-5 * (1.0 + float(want.abs().max())):
                raise RuntimeError(f"{kernel.path}: {what} differs from the torch block math by {err:.2e}")


def load() -> Optional[RowKernel]:
    """The kernel, built and checked on the first call; None (and :func:`unavailable_reason`)
    where it cannot run. Thread-safe; raises only a ConfigError for a malformed
    ``TOOLKIT_CPU_KERNEL`` value."""
    if _FORCED_OFF:
        return None
    env_off = _disabled_by_env()
    if env_off:
        return None
    with _LOCK:
        if "reason" in _STATE:
            return _STATE["kernel"]
        kernel, reason = None, ""
        try:
            if not sys.platform.startswith("linux"):
                raise RuntimeError(f"built only on Linux (this is {sys.platform})")
            cc = find_compiler()
            if cc is None:
                raise RuntimeError("no C compiler (set $CC, or install gcc)")
            t0 = time.perf_counter()
            path = _build(cc, cache_dir())
            built = time.perf_counter() - t0
            kernel = RowKernel(_bind(path), path, built)
            _self_check(kernel)
        except Exception as e:  # noqa: BLE001 - an optional accelerator: any failure means fallback
            kernel, reason = None, f"{type(e).__name__}: {e}"
            warnings.warn(f"relation KL: the compiled CPU row kernel is not used ({reason}); the chunked path "
                          f"runs its torch block math instead (same numbers, slower on CPUs). "
                          f"TOOLKIT_CPU_KERNEL=0 silences this.", RuntimeWarning, stacklevel=3)
        _STATE.update(kernel=kernel, reason=reason)
        return kernel


def unavailable_reason() -> Optional[str]:
    """Why :func:`load` returns None (after it was called), or None when the kernel runs."""
    if _FORCED_OFF:
        return "turned off in this process (cpu_rows.disabled())"
    env_off = _disabled_by_env()
    if env_off:
        return f"turned off by {env_off}"
    if "reason" not in _STATE:
        load()
    return _STATE["reason"] or None


def describe() -> str:
    """One phrase for the job log: which block math the chunked path runs on CPUs."""
    kernel = load()
    if kernel is not None:
        return f"compiled CPU row kernel ({kernel.path.name})"
    return f"torch block math ({unavailable_reason()})"


@contextmanager
def disabled() -> Iterator[None]:
    """Run the chunked path's torch block math inside this block (tests, comparisons)."""
    _FORCED_OFF.append(True)
    try:
        yield
    finally:
        _FORCED_OFF.pop()


def reset() -> None:
    """Forget the loaded kernel and its failure reason (tests)."""
    with _LOCK:
        _STATE.clear()
