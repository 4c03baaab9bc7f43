"""Helpers shared by the benchmark scripts: machine facts, memory probes, matmul peak, FLOP counts.

Nothing here runs on import. Memory figures are Linux process figures in bytes: RSS from
``/proc/self/status`` and the peak from ``getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from toolkit.errors import ConfigError


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (falls back to ``platform.processor()``)."""
    info = Path("/proc/cpuinfo")
    if info.is_file():
        for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_flags() -> List[str]:
    """The SIMD flags that decide fp32 matmul speed (AVX2, FMA, AVX-512), as listed in cpuinfo."""
    info = Path("/proc/cpuinfo")
    if not info.is_file():
        return []
    for line in info.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return []


def load_average() -> List[float]:
    """1-, 5- and 15-minute load averages (``/proc/loadavg``)."""
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def machine_info(threads: int) -> Dict[str, Any]:
    """Facts that make a timing reproducible: CPU, cores, library versions, date, load."""
    import transformers

    return {
        "cpu": cpu_model(), "cpu_flags": cpu_flags(), "logical_cpus": os.cpu_count(),
        "threads": threads, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg": load_average(),
    }


#: Host allocators a benchmark worker can be started under (``LD_PRELOAD``), and their libraries.
ALLOCATOR_LIBS = {"tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4"), "jemalloc": ("libjemalloc.so.2",)}
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def allocator_library(name: str) -> Optional[Path]:
    """The installed library of allocator ``name`` (``tcmalloc`` / ``jemalloc``), or None."""
    dirs = [Path(sys.prefix) / "lib", *(Path(d) for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d),
            *(Path(d) for d in _LIB_DIRS)]
    for d in dirs:
        for lib in ALLOCATOR_LIBS[name]:
            if (d / lib).is_file():
                return d / lib
    return None


def allocator_env(name: str, env: Mapping[str, str]) -> Dict[str, str]:
    """``env`` for a worker process under host allocator ``name`` (``system``, ``tcmalloc`` or
    ``jemalloc``); ConfigError when that library is not installed."""
    out = {k: v for k, v in env.items() if k != "LD_PRELOAD"}
    if name == "system":
        return out
    if name not in ALLOCATOR_LIBS:
        raise ConfigError("--allocators", f"unknown allocator {name!r}; choose system, tcmalloc or jemalloc")
    lib = allocator_library(name)
    if lib is None:
        raise ConfigError("--allocators", f"{name} is not installed here (Debian: apt-get install "
                                          f"{'libtcmalloc-minimal4' if name == 'tcmalloc' else 'libjemalloc2'})")
    out["LD_PRELOAD"] = str(lib)
    if name == "tcmalloc":
        out.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
    else:
        out.setdefault("MALLOC_CONF", "background_thread:true,dirty_decay_ms:-1,muzzy_decay_ms:-1")
    return out


def allocator_in_use() -> str:
    """The allocator this process runs with (``tcmalloc``, ``jemalloc`` or ``system``), read from
    the libraries mapped into it."""
    try:
        maps = Path("/proc/self/maps").read_text(errors="replace")
    except OSError:
        maps = os.environ.get("LD_PRELOAD", "")
    return next((name for name in ALLOCATOR_LIBS if f"lib{name}" in maps), "system")


def rss_bytes() -> int:
    """Current resident set size of this process."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError("VmRSS not found in /proc/self/status (the benchmark needs Linux)")


def cpu_seconds() -> float:
    """User + system CPU seconds this process has used (all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``; KiB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


@dataclass
class MatmulPeak:
    """``n x n`` matmul throughput in one dtype on one device (CPU: at the benchmark's thread count)."""

    n: int
    threads: int
    best_flops: float     # FLOP/s of the fastest repetition of the fastest GEMM: the peak MFU divides by
    median_flops: float   # median repetition of that GEMM
    dtype: str = "fp32"
    device: str = "cpu"
    #: best GFLOP/s per GEMM library timed: ``torch.matmul`` (MKL on x86 CPUs, cuBLAS on GPUs)
    by_backend: Optional[Dict[str, float]] = None

    def as_dict(self) -> Dict[str, Any]:
        return {"n": self.n, "threads": self.threads, "best_gflops": self.best_flops / 1e9,
                "median_gflops": self.median_flops / 1e9, "dtype": self.dtype, "device": self.device,
                "by_backend_gflops": self.by_backend}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def sync(device: Any) -> None:
    """Wait for queued GPU work (a no-op on CPU), so wall-clock timings are the work's."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Any, device: Any, reps: int, warmup: int) -> List[float]:
    """Seconds of each of ``reps`` calls of ``fn()`` after ``warmup`` untimed ones (GPU synchronized)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times


class MatmulProbe:
    """Two ``[n, n]`` matrices of ``dtype`` on ``device`` and an output, made once, so the peak
    can be timed again and again (``--paired-peak``: after every step) without allocating."""

    def __init__(self, n: int = 2048, dtype: str = "fp32", device: Any = "cpu"):
        dt = DTYPES[dtype]
        self.n, self.dtype, self.device = n, dtype, device
        self.a = torch.randn(n, n, device=device).to(dt)
        self.b = torch.randn(n, n, device=device).to(dt)
        self.out = torch.empty(n, n, device=device, dtype=dt)
        # The GEMM libraries timed (the peak is the fastest one's): torch.matmul, the one the
        # step's linears use.
        self.products: Dict[str, Any] = {"torch.matmul": lambda: torch.matmul(self.a, self.b, out=self.out)}

    def measure(self, reps: int = 7, warmup: int = 2) -> MatmulPeak:
        """Time each GEMM library's ``a @ b`` (``2 n^3`` FLOPs) ``reps`` times, interleaved, after
        ``warmup`` untimed products; the peak is the fastest library's best repetition."""
        for _ in range(warmup):
            for product in self.products.values():
                product()
        sync(self.device)
        rates: Dict[str, List[float]] = {name: [] for name in self.products}
        for _ in range(reps):
            for name, product in self.products.items():
                t0 = time.perf_counter()
                product()
                sync(self.device)
                rates[name].append(2.0 * self.n ** 3 / (time.perf_counter() - t0))
        best = max(rates, key=lambda name: max(rates[name]))
        return MatmulPeak(self.n, torch.get_num_threads(), max(rates[best]), statistics.median(rates[best]),
                          self.dtype, torch.device(self.device).type,
                          {name: max(r) / 1e9 for name, r in rates.items()})


class MatmulProbeProcess:
    """A :class:`MatmulProbe` in a child process, timed on request.

    A benchmark worker reads its memory growth from its own RSS (or CUDA allocations): matrices
    it made for the peak, even freed, stay resident in tcmalloc's caches, where the step then
    reuses them, and the step's growth would read low. Here the matrices live in a sibling process that runs on the same
    cores while the worker waits on the pipe, so the rate is the one the worker's cores give, and
    nothing of it is in the worker's memory, page faults or CPU time. The child exits when its
    stdin closes: :meth:`close`, or the worker's own exit.
    """

    def __init__(self, n: int = 2048, dtype: str = "fp32", device: Any = "cpu", threads: int = 1):
        import subprocess

        code = ("import sys; sys.path.insert(0, sys.argv[1]); from _common import probe_server; "
                "probe_server(int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5]))")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(n), dtype,
                                      str(device), str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.n, self.dtype, self.device = n, dtype, str(device)

    def measure(self, reps: int = 7, warmup: int = 2) -> MatmulPeak:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{reps} {warmup}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the matmul probe process ({self.n}x{self.n} {self.dtype} on {self.device}) exited "
                               f"with code {self.proc.wait()}; its own error is printed above")
        d = json.loads(line)
        return MatmulPeak(d["n"], d["threads"], d["best_gflops"] * 1e9, d["median_gflops"] * 1e9, d["dtype"],
                          d["device"], d.get("by_backend_gflops"))

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=60)

    def __enter__(self) -> "MatmulProbeProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def probe_server(n: int, dtype: str, device: str, threads: int) -> None:
    """The child side of :class:`MatmulProbeProcess`: one line ``reps warmup`` in, one JSON line out."""
    torch.set_num_threads(threads)
    probe = MatmulProbe(n, dtype, device)
    for line in sys.stdin:
        reps, warmup = (int(x) for x in line.split())
        print(json.dumps(probe.measure(reps, warmup).as_dict()), flush=True)


def measure_matmul_peak(n: int = 2048, reps: int = 7, warmup: int = 2, dtype: str = "fp32",
                        device: Any = "cpu") -> MatmulPeak:
    """Time ``a @ b`` for two ``[n, n]`` matrices (``2 n^3`` FLOPs each) of ``dtype`` on ``device``."""
    return MatmulProbe(n, dtype, device).measure(reps, warmup)


@dataclass(frozen=True)
class EncoderShape:
    """What the FLOP count needs of a BERT-style encoder."""

    layers: int        # transformer layers up to and including the one the loss reads
    hidden: int
    intermediate: int
    pooler: bool = False        # the pooler's output feeds no distillation loss
    last_qkv_only: bool = True  # the relation losses need only the last layer's Q/K/V


def encoder_forward_flops(shape: EncoderShape, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward pass over ``[batch, seq]`` tokens that the loss needs.

    Per full layer and token: Q/K/V/output projections ``8 H^2``, feed-forward ``4 H I``,
    scores ``Q K^T`` and ``P V`` ``4 L H``. With ``last_qkv_only`` the last layer counts only
    its Q/K/V projections ``6 H^2``: the relation losses read nothing after them, so work
    beyond is not useful work. The pooler adds ``2 H^2`` per sample when counted.
    Embedding look-ups, layer norms, softmax and GELU are not matmuls and are not counted.
    """
    h, i = shape.hidden, shape.intermediate
    full_layer = 8 * h * h + 4 * h * i + 4 * seq * h
    if shape.last_qkv_only:
        per_token = (shape.layers - 1) * full_layer + 6 * h * h
    else:
        per_token = shape.layers * full_layer
    flops = batch * seq * per_token
    if shape.pooler:
        flops += batch * 2 * h * h
    return float(flops)


def relation_loss_flops(batch: int, seq: int, teacher_hidden: int, student_hidden: int,
                        relations: int = 3) -> float:
    """Model FLOPs of the MiniLMv2 relation KL (forward and student backward).

    Per relation: teacher logits ``2 B L^2 Ht``, student logits ``2 B L^2 Hs``, and the
    student backward's two matmuls (query side and key side) ``4 B L^2 Hs``. A recomputing
    backward (the chunked kernel) does more work than this; like MFU on GPUs, recomputation
    is not credited, so both implementations are measured against the same useful work.
    """
    l2 = batch * seq * seq
    return float(relations * (2 * l2 * teacher_hidden + 2 * l2 * student_hidden + 4 * l2 * student_hidden))


def step_flops(teacher: EncoderShape, student: EncoderShape, batch: int, seq: int, relations: int = 3) -> float:
    """Model FLOPs of one distillation step: teacher forward + 3x student forward + relation loss.

    The student's backward is counted as twice its forward (input and weight gradients) over
    the work on the loss's gradient path, which :func:`encoder_forward_flops` counts.
    """
    return (encoder_forward_flops(teacher, batch, seq) + 3.0 * encoder_forward_flops(student, batch, seq)
            + relation_loss_flops(batch, seq, teacher.hidden, student.hidden, relations))


def cli_main(parser: Any, body: Any, argv: Any = None) -> int:
    """Parse ``argv`` and run ``body(args)``; a ToolkitError (bad option, missing library) is one
    ``error: ...`` line on stderr and exit code 2, not a traceback."""
    from toolkit.errors import ToolkitError

    args = parser.parse_args(argv)
    try:
        return body(args)
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def check_counts(args: Any, at_least_one: Sequence[str]) -> None:
    """ConfigError naming the option unless each of ``at_least_one`` is >= 1 and ``warmup`` >= 0."""
    for name in at_least_one:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}", f"must be >= 1, got {getattr(args, name)}")
    if getattr(args, "warmup", 0) < 0:
        raise ConfigError("--warmup", f"must be >= 0, got {args.warmup}")


def parse_dims(text: str, field: str, names: Sequence[str], example: str) -> List[tuple]:
    """``"32x128,4x512"`` -> ``[(32, 128), (4, 512)]``: one positive int per name in each item;
    ConfigError naming ``field`` and the bad item otherwise (``names`` only words the message)."""
    out = []
    for part in (p.strip() for p in str(text).split(",")):
        if not part:
            continue
        try:
            dims = tuple(int(x) for x in part.lower().split("x"))
        except ValueError:
            dims = ()
        if len(dims) != len(names):
            raise ConfigError(field, f"expected {'x'.join(n.upper() for n in names)} items such as {example}, "
                                     f"got {part!r}")
        if min(dims) < 1:
            raise ConfigError(field, f"{' and '.join(names)} must be >= 1, got {part!r}")
        out.append(dims)
    if not out:
        raise ConfigError(field, f"name at least one shape, e.g. {example}")
    return out


def parse_int_list(text: str, field: str) -> List[int]:
    """``"128,512"`` -> ``[128, 512]``; ConfigError naming the option otherwise."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise ConfigError(field, f"expected comma-separated positive integers, got {text!r}") from None
        if value < 1:
            raise ConfigError(field, f"values must be >= 1, got {value}")
        values.append(value)
    if not values:
        raise ConfigError(field, "needs at least one value, e.g. 128,512")
    return values


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; floats are formatted by the caller."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str, payload: Mapping[str, Any]) -> None:
    """Write ``payload`` to ``path`` whole (a temporary file, then a rename): a reader, or a run
    stopped by a time limit, never leaves half a file. The benchmarks call it after every row
    with ``partial: true`` and once more at the end, so a stopped run keeps what it finished."""
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    tmp.replace(target)
