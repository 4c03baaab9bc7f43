"""Throughput meter and peak memory."""
from __future__ import annotations

import pytest
import torch

from toolkit.utils.meter import Throughput, memory_kind, peak_memory_mb, reset_peak_memory


class FakeClock:
    """perf_counter under the test's control: the meter's arithmetic, not the machine's timing."""

    def __init__(self) -> None:
        self.now = 100.0

    def perf_counter(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s


@pytest.fixture
def clock(monkeypatch):
    from toolkit.utils import meter

    fake = FakeClock()
    monkeypatch.setattr(meter, "time", fake)
    return fake


def test_rates_and_data_wait_fraction(clock):
    m = Throughput("cpu", window=10)
    for _ in range(3):
        with m.data_wait():
            clock.sleep(0.02)
        clock.sleep(0.03)
        m.step(samples=4, tokens=64)
    s = m.summary()
    assert s["step_time_s"] == pytest.approx(0.05)
    assert s["data_wait_frac"] == pytest.approx(0.4)
    assert s["samples_per_s"] == pytest.approx(4 / 0.05) and s["tokens_per_s"] == pytest.approx(64 / 0.05)
    assert s["overall_samples_per_s"] == pytest.approx(s["samples_per_s"])
    assert s["overall_data_wait_frac"] == pytest.approx(0.4)
    assert s["peak_mem_mb"] > 10


def test_sliding_window_forgets_old_steps(clock):
    m = Throughput("cpu", window=2)
    clock.sleep(1.0)
    m.step(samples=1)  # slow step, pushed out of the window below
    for _ in range(2):
        clock.sleep(0.1)
        m.step(samples=100)
    s = m.summary()
    assert s["samples_per_s"] == pytest.approx(200 / 0.2)
    assert s["overall_samples_per_s"] == pytest.approx(201 / 1.2)
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
    """Set-up spikes (loading, DeepSpeed's fp32 copies) before training must not be the job's
    peak. In a fresh process: in a long one the spike may reuse heap pages already resident."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import numpy as np
        from toolkit.utils.meter import Throughput, peak_memory_mb
        spike = np.ones(80 * 2 ** 20 // 8)   # 80 MiB touched, then freed
        del spike
        before = peak_memory_mb("cpu")
        after = Throughput("cpu").summary()["peak_mem_mb"]
        print(before, after)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    before, after = map(float, out.stdout.split())
    assert after <= before - 40   # VmHWM was reset to the current RSS (Linux's /proc/self/clear_refs)


def test_sync_ranks_replaces_the_per_step_estimate_with_every_ranks_counts():
    # Rank 0 of 2 saw 3 + 2 samples and 40 + 25 tokens; rank 1 (through the fake all-reduce) 3 + 2
    # samples and 48 + 31 tokens. Per step the meter estimates rank 1 as a copy of rank 0.
    other_rank = torch.tensor([5.0, 79.0], dtype=torch.float64)
    seen = []

    def fake_all_reduce_sum(t):
        seen.append(t.clone())
        return t + other_rank

    m = Throughput("cpu", world_size=2)
    m.step(3, 40)
    m.step(2, 25)
    assert m._tot_tokens == 130 and m._tot_samples == 10     # the estimate: 2 x this rank
    assert m.sync_ranks(fake_all_reduce_sum) == (0, 79 - 65)
    assert seen[0].tolist() == [5.0, 65.0]                    # this rank's own counts go in
    assert m._tot_tokens == 65 + 79 and m._tot_samples == 10
    s = m.summary()
    assert s["overall_tokens_per_s"] == pytest.approx(144 / m._tot_time)
    # Only the counts since the last sync are sent again.
    m.step(1, 10)
    assert m.sync_ranks(lambda t: t + torch.tensor([1.0, 7.0], dtype=torch.float64)) == (0, 7 - 10)
    assert m._tot_tokens == 144 + 17 and m._tot_samples == 12


def test_sync_ranks_is_free_for_one_process():
    m = Throughput("cpu")
    m.step(4, 100)

    def no_collective(t):
        raise AssertionError("a one-process meter must not reduce")

    assert m.sync_ranks(no_collective) == (0, 0)
    assert m._tot_tokens == 100 and m._tot_samples == 4
