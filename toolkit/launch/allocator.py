"""Host memory allocator for CPU jobs: tcmalloc or jemalloc instead of glibc malloc.

Why: glibc returns freed memory above its (dynamic) mmap/trim thresholds to the kernel, so a
training step that allocates and frees the same large activations every step page-faults
them back in every step. On the distillation benchmark (2 cores, seq 128, batch 32) that is
~28,000 minor faults and 134 ms of kernel time per step, against ~800 and 22 ms on tcmalloc,
which also fragments less, so peak RSS drops as well (``benchmarks/RESULTS.md``, "Page faults"). A library can only be chosen before
the process starts, so the job entry points re-execute themselves once with ``LD_PRELOAD``.

Chosen by the environment variable ``TOOLKIT_CPU_ALLOCATOR`` (read by every rank, so it works
under ``deepspeed``, ``torchrun``, ``srun`` and ``toolkit ...`` alike):

- ``auto`` (default): tcmalloc, else jemalloc, when the library is installed and the host has no
  GPU (on GPU hosts tensors live in the CUDA caching allocator; opt in explicitly there);
  otherwise the system allocator, silently.
- ``system``: never preload.
- ``tcmalloc`` / ``jemalloc``: preload it on any host; an error if it is not installed.
- a path to a shared library: preload exactly that file.

Nothing here imports torch: it runs before the heavy imports.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

from toolkit.errors import ToolkitError

ENV_CHOICE = "TOOLKIT_CPU_ALLOCATOR"
#: Set in the re-executed process: the library it preloaded (stops a second re-exec).
ENV_ACTIVE = "TOOLKIT_CPU_ALLOCATOR_ACTIVE"
CHOICES = ("auto", "system", "tcmalloc", "jemalloc")
_LIBS = {
    "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so"),
    "jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
}
_INSTALL_HINT = {
    "tcmalloc": "apt-get install libtcmalloc-minimal4 (Debian/Ubuntu), dnf install gperftools-libs, "
                "or conda install -c conda-forge gperftools",
    "jemalloc": "apt-get install libjemalloc2 (Debian/Ubuntu), dnf install jemalloc, "
                "or conda install -c conda-forge jemalloc",
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


def resolve(choice: Optional[str], dirs: Optional[Sequence[Path]] = None,
            gpu_host: Optional[bool] = None) -> Optional[Path]:
    """The library to preload for ``choice`` (see the module docstring), or None for the system one.

    Raises:
        ToolkitError: an unknown choice, a named allocator that is not installed, or a path that
            is not a file. The message names ``TOOLKIT_CPU_ALLOCATOR`` and how to fix it.
    """
    choice = (choice or "auto").strip()
    dirs = search_dirs() if dirs is None else dirs
    if choice == "system":
        return None
    if choice == "auto":
        if has_gpu() if gpu_host is None else gpu_host:
            return None
        for name in ("tcmalloc", "jemalloc"):
            lib = find_library(name, dirs)
            if lib is not None:
                return lib
        return None
    if choice in _LIBS:
        lib = find_library(choice, dirs)
        if lib is None:
            raise ToolkitError(f"{ENV_CHOICE}={choice}: it was asked for but none of {', '.join(_LIBS[choice])} is in "
                              f"{', '.join(str(d) for d in dirs)}; install it ({_INSTALL_HINT[choice]}) or set "
                              f"{ENV_CHOICE}=system")
        return lib
    if "/" in choice or choice.endswith(".so") or ".so." in choice:
        p = Path(choice).expanduser()
        if not p.is_file():
            raise ToolkitError(f"{ENV_CHOICE}={choice}: not a file; give the path of a malloc shared library "
                              f"or one of {', '.join(CHOICES)}")
        return p.resolve()
    raise ToolkitError(f"{ENV_CHOICE}={choice}: unknown value; use one of {', '.join(CHOICES)} or the path of a "
                      "malloc shared library")


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
    for name in ("tcmalloc", "jemalloc"):
        if f"lib{name}" in maps:
            return name
    return "system"


def reexec_with_allocator(argv: Optional[Sequence[str]] = None, env: Optional[Mapping[str, str]] = None) -> None:
    """Re-execute this process once with the chosen allocator preloaded; return if nothing to do.

    Call it first thing in an entry point, before torch is imported. It returns (does not
    exec) when the choice resolves to the system allocator, when this process already is the
    re-executed one, or when an allocator is already preloaded by the user.

    Args:
        argv: the full command line to re-run (default: ``sys.orig_argv`` with this interpreter).
        env: the environment to start from (default: ``os.environ``).
    """
    env = dict(os.environ if env is None else env)
    if env.get(ENV_ACTIVE) or any(k in env.get("LD_PRELOAD", "") for k in ("tcmalloc", "jemalloc")):
        return
    lib = resolve(env.get(ENV_CHOICE))
    if lib is None:
        return
    if argv is None:
        orig = list(getattr(sys, "orig_argv", []) or [sys.executable, *sys.argv])
        argv = [sys.executable, *orig[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, list(argv), preload_env(lib, env))
