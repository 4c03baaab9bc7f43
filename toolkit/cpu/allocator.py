"""Host memory allocator for CPU jobs: tcmalloc or jemalloc instead of glibc malloc.

glibc returns freed memory above its (dynamic) mmap/trim thresholds to the kernel, so a training
step that allocates and frees the same large activations every step page-faults them back in
every step; tcmalloc and jemalloc keep them. A library can only be chosen before the process
starts, so with ``cpu_accel: auto`` the job entry points re-execute themselves once with
``LD_PRELOAD`` (every rank does, so it works under ``deepspeed``, ``torchrun``, ``srun`` and
``toolkit ...`` alike): tcmalloc, else jemalloc, when one is installed and the host has no GPU
(on GPU hosts tensors live in the CUDA caching allocator). Otherwise, and with ``cpu_accel: off``,
the system allocator runs. A library the user preloads is kept.

Nothing here imports torch: it runs before the heavy imports.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

#: Set in the re-executed process: the library it preloaded (stops a second re-exec).
ENV_ACTIVE = "TOOLKIT_CPU_ALLOCATOR_ACTIVE"
_LIBS = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
}
_GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd")


def search_dirs(env: Optional[Mapping[str, str]] = None) -> List[Path]:
    """Where shared libraries are looked for: the active environment's lib first, then the system's."""
    env = os.environ if env is None else env
    dirs: List[Path] = []
    for var in ("CONDA_PREFIX", "VIRTUAL_ENV"):
        if env.get(var):
            dirs.append(Path(env[var]) / "lib")
    dirs.append(Path(sys.prefix) / "lib")
    dirs += [Path(p) for p in env.get("LD_LIBRARY_PATH", "").split(":") if p]
    dirs += [Path(p) for p in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                               "/usr/lib", "/usr/local/lib", "/lib/x86_64-linux-gnu", "/lib64")]
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def find_library(name: str, dirs: Sequence[Path]) -> Optional[Path]:
    """First installed file of allocator ``name`` (``tcmalloc`` / ``jemalloc``) in ``dirs``."""
    for d in dirs:
        for lib in _LIBS[name]:
            p = d / lib
            if p.is_file():
                return p
    return None


def has_gpu() -> bool:
    """True when the host has an NVIDIA or AMD GPU device node (checked without importing torch)."""
    return any(os.path.exists(p) for p in _GPU_DEVICE_NODES)


def resolve(dirs: Optional[Sequence[Path]] = None, gpu_host: Optional[bool] = None) -> Optional[Path]:
    """The library to preload: tcmalloc, else jemalloc, on a host without a GPU; None for the
    system allocator (a GPU host, or neither installed)."""
    if has_gpu() if gpu_host is None else gpu_host:
        return None
    dirs = search_dirs() if dirs is None else dirs
    for name in _LIBS:
        lib = find_library(name, dirs)
        if lib is not None:
            return lib
    return None


def preload_env(lib: Path, env: Mapping[str, str]) -> Dict[str, str]:
    """``env`` with ``lib`` first in ``LD_PRELOAD`` and quiet, cache-keeping allocator settings.

    tcmalloc would print a line for every allocation above 1 GiB; jemalloc's defaults return
    dirty pages to the kernel after 10 s, which brings back the page faults we avoid (the
    settings follow the PyTorch CPU performance guide). Values the user already set are kept.
    """
    out = dict(env)
    current = [p for p in out.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    out["LD_PRELOAD"] = ":".join([str(lib)] + [p for p in current if p != str(lib)])
    if "tcmalloc" in lib.name:
        out.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    if "jemalloc" in lib.name:
        out.setdefault("MALLOC_CONF", "oversize_threshold:1,background_thread:true,metadata_thp:auto,"
                                      "dirty_decay_ms:-1,muzzy_decay_ms:-1")
    out[ENV_ACTIVE] = str(lib)
    return out


def in_use() -> str:
    """The allocator this process actually runs with: ``tcmalloc``, ``jemalloc`` or ``system``
    (read from the libraries mapped into the process, so it is true however it got there)."""
    try:
        maps = Path("/proc/self/maps").read_text(errors="replace")
    except OSError:
        maps = os.environ.get("LD_PRELOAD", "")
    for name in _LIBS:
        if f"lib{name}" in maps:
            return name
    return "system"


def reexec_with_allocator(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None) -> None:
    """Re-execute this process once with the allocator of :func:`resolve` preloaded; return if
    nothing is to do.

    Call it first thing in an entry point, before torch is imported. It returns (does not
    exec) when no library is to be preloaded, when this process already is the re-executed one,
    or when an allocator is already preloaded by the user.

    Args:
        argv: the full command line to re-run (default: ``sys.orig_argv`` with this interpreter).
        env: the environment to start from (default: ``os.environ``).
    """
    env = dict(os.environ if env is None else env)
    if env.get(ENV_ACTIVE) or any(k in env.get("LD_PRELOAD", "") for k in _LIBS):
        return
    lib = resolve(search_dirs(env))
    if lib is None:
        return
    if argv is None:
        orig = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
        argv = [sys.executable, *orig[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(argv), preload_env(lib, env))
