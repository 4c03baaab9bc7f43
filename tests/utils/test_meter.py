"""Throughput meter and peak memory."""
from __future__ import annotations

import time

import pytest

from toolkit.utils.meter import Throughput, memory_kind, peak_memory_mb, reset_peak_memory


def test_rates_and_data_wait_fraction():
    m = Throughput("cpu", window=10)
    for _ in range(3):
        with m.data_wait():
            time.sleep(0.02)
        time.sleep(0.02)
        m.step(samples=4, tokens=64)
    s = m.summary()
    assert s["step_time_s"] == pytest.approx(0.04, abs=0.03)
    assert 0.2 < s["data_wait_frac"] < 0.8
    assert s["tokens_per_s"] == pytest.approx(16 * s["samples_per_s"])
    assert s["overall_samples_per_s"] == pytest.approx(s["samples_per_s"])
    assert s["peak_mem_mb"] > 10


def test_sliding_window_forgets_old_steps():
    m = Throughput("cpu", window=2)
    time.sleep(0.1)
    m.step(samples=1)  # slow step, pushed out of the window below
    for _ in range(2):
        m.step(samples=100)
    s = m.summary()
    assert s["samples_per_s"] > s["overall_samples_per_s"]
    assert m.steps == 3


def test_empty_summary_is_zero():
    s = Throughput().summary()
    assert s["samples_per_s"] == 0.0 and s["step_time_s"] == 0.0


def test_cpu_peak_memory_tracks_allocation():
    reset_peak_memory("cpu")
    before = peak_memory_mb("cpu")
    block = bytearray(64 * 2 ** 20)
    block[::4096] = b"x" * len(block[::4096])  # touch pages so they count as resident
    assert peak_memory_mb("cpu") >= before + 50
    del block
    assert memory_kind("cpu") == "cpu_peak_rss"


def test_peak_memory_counts_from_the_meter_start():
    # Set-up spikes (loading, DeepSpeed's fp32 copies) before training must not be the job's peak.
    import numpy as np

    spike = np.ones(80 * 2 ** 20 // 8)   # 80 MiB touched, then freed
    del spike
    before = peak_memory_mb("cpu")
    m = Throughput("cpu")
    after = m.summary()["peak_mem_mb"]
    assert after <= before - 40   # VmHWM was reset to the current RSS (Linux's /proc/self/clear_refs)
