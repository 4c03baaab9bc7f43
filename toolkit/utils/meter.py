"""Throughput and peak-memory meters.

On CUDA the memory figure is ``torch.cuda.max_memory_allocated`` (tensors only). On CPU it
is the peak resident set size of the whole process (``VmHWM`` from ``/proc/self/status``,
else ``getrusage``), which includes the Python interpreter and libraries: compare CPU
figures only with other CPU figures. :func:`memory_kind` names which one a number is.
"""
from __future__ import annotations

import collections
import contextlib
import resource
import time
from pathlib import Path
from typing import Callable, Deque, Dict, Iterator, Tuple, Union

import torch

Device = Union[str, torch.device, None]

_PROC_STATUS = Path("/proc/self/status")
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def _as_device(device: Device) -> torch.device:
    return torch.device(device) if device is not None else torch.device("cpu")


def memory_kind(device: Device) -> str:
    """``"cuda_max_allocated"`` or ``"cpu_peak_rss"``: what :func:`peak_memory_mb` measures."""
    return "cuda_max_allocated" if _as_device(device).type == "cuda" else "cpu_peak_rss"


def _cpu_peak_rss_mb() -> float:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    # ru_maxrss is in kB on Linux; it cannot be reset, hence the /proc path first.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def peak_memory_mb(device: Device) -> float:
    """Peak memory in MiB since the last :func:`reset_peak_memory` (see module docstring)."""
    dev = _as_device(device)
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2 ** 20
    return _cpu_peak_rss_mb()


def reset_peak_memory(device: Device) -> None:
    """Reset the peak counter (CUDA allocator stats; on Linux CPU the process's VmHWM)."""
    dev = _as_device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        return
    try:
        # Writing "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
        _PROC_CLEAR_REFS.write_text("5")
    except OSError:
        pass


class Throughput:
    """Samples/s, tokens/s and data-wait fraction over a sliding window and the whole run.

    Usage::

        meter = Throughput(device)
        for ...:
            with meter.data_wait():
                batch = next(it)
            ...train...
            meter.step(samples=B, tokens=B * L)
        meter.summary()

    A step's time runs from the end of the previous ``step()`` (or construction/``reset``)
    to this one, so data loading inside ``data_wait`` counts as part of the step.

    Data-parallel jobs pass ``world_size`` and this rank's counts to ``step()``; all ranks'
    counts are estimated as this rank's times ``world_size`` (no collective per step) until
    :meth:`sync_ranks` sums the real ones into the run totals (ranks' batches can hold different
    numbers of real tokens: padding, tasks of different lengths).
    """

    def __init__(self, device: Device = None, window: int = 50, world_size: int = 1):
        self.device = _as_device(device)
        self.window = int(window)
        self.world_size = max(int(world_size), 1)
        self.reset()

    def reset(self) -> None:
        """Forget all history, restart the clock and the peak-memory counter (so ``peak_mem_mb``
        covers training, not the set-up before it: model loading, DeepSpeed's fp32 copies)."""
        reset_peak_memory(self.device)
        self._win: Deque[Tuple[float, float, int, int]] = collections.deque(maxlen=self.window)
        self._last = time.perf_counter()
        self._wait = 0.0
        self._tot_time = 0.0
        self._tot_wait = 0.0
        self._tot_samples = 0
        self._tot_tokens = 0
        self._pending_local = [0, 0]   # this rank's (samples, tokens) since the last sync_ranks
        self.steps = 0

    @contextlib.contextmanager
    def data_wait(self) -> Iterator[None]:
        """Time the block as waiting for input data (added to the current step)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._wait += time.perf_counter() - t0

    def step(self, samples: int, tokens: int = 0) -> float:
        """Close the current step (``samples``/``tokens``: this rank's); returns its duration in
        seconds."""
        now = time.perf_counter()
        dt = max(now - self._last, 1e-9)
        self._pending_local[0] += int(samples)
        self._pending_local[1] += int(tokens)
        samples, tokens = int(samples) * self.world_size, int(tokens) * self.world_size
        self._win.append((dt, self._wait, samples, tokens))
        self._tot_time += dt
        self._tot_wait += self._wait
        self._tot_samples += samples
        self._tot_tokens += tokens
        self.steps += 1
        self._last = now
        self._wait = 0.0
        return dt

    def sync_ranks(self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> Tuple[int, int]:
        """Replace the estimated counts since the last call by every rank's real ones, summed with
        ``all_reduce_sum`` (a collective when ``world_size > 1``: call it on every rank at the same
        point). Returns the ``(samples, tokens)`` correction added to the run totals, for callers
        that keep their own totals. The window rates keep the estimates."""
        local, self._pending_local = self._pending_local, [0, 0]
        if self.world_size == 1:
            return 0, 0
        exact = all_reduce_sum(torch.tensor(local, dtype=torch.float64)).tolist()
        d_samples = int(round(exact[0])) - local[0] * self.world_size
        d_tokens = int(round(exact[1])) - local[1] * self.world_size
        self._tot_samples += d_samples
        self._tot_tokens += d_tokens
        return d_samples, d_tokens

    def summary(self) -> Dict[str, float]:
        """Window rates plus ``overall_*`` rates since reset, and ``peak_mem_mb``.

        Keys: samples_per_s, tokens_per_s, data_wait_frac, step_time_s, peak_mem_mb,
        overall_samples_per_s, overall_tokens_per_s, overall_data_wait_frac.
        """
        wt = sum(w[0] for w in self._win)
        n = len(self._win)
        out = {
            "samples_per_s": sum(w[2] for w in self._win) / wt if wt else 0.0,
            "tokens_per_s": sum(w[3] for w in self._win) / wt if wt else 0.0,
            "data_wait_frac": sum(w[1] for w in self._win) / wt if wt else 0.0,
            "step_time_s": wt / n if n else 0.0,
            "peak_mem_mb": peak_memory_mb(self.device),
            "overall_samples_per_s": self._tot_samples / self._tot_time if self._tot_time else 0.0,
            "overall_tokens_per_s": self._tot_tokens / self._tot_time if self._tot_time else 0.0,
            "overall_data_wait_frac": self._tot_wait / self._tot_time if self._tot_time else 0.0,
        }
        return out
