"""Device placement of the rank helpers, for GPU launchers this CPU machine can only simulate."""
from __future__ import annotations

import pytest
import torch

from toolkit.engine import dist


@pytest.mark.parametrize("backend, expected", [("nccl", "cuda:3"), ("gloo", "cpu"), ("cpu:gloo,cuda:nccl", "cpu")])
def test_collective_device_follows_the_backend(monkeypatch, backend, expected):
    # An NCCL-only group cannot reduce CPU tensors ("No backend type associated with device type cpu").
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist.tdist, "get_backend", lambda *a: backend)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert str(dist.collective_device()) == expected


def test_all_reduce_sum_reduces_on_the_collective_device_and_returns_home(monkeypatch):
    seen = []

    def fake_all_reduce(t, op=None):
        seen.append(t.device)
        t.mul_(2)   # two ranks holding the same values

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "collective_device", lambda: torch.device("meta"))
    monkeypatch.setattr(dist.tdist, "all_reduce", fake_all_reduce)
    with pytest.raises(NotImplementedError):   # meta -> cpu has no data: proves the hop happened
        dist.all_reduce_sum(torch.ones(3))
    assert seen == [torch.device("meta")]
    monkeypatch.setattr(dist, "collective_device", lambda: torch.device("cpu"))
    out = dist.all_reduce_sum(torch.ones(3, dtype=torch.float64))
    assert out.tolist() == [2.0, 2.0, 2.0] and out.device.type == "cpu"


@pytest.mark.parametrize("local, visible, expected", [(0, 4, 0), (3, 4, 3), (3, 1, 0), (5, 2, 1), (2, 0, 2)])
def test_device_index_wraps_local_rank_onto_visible_gpus(monkeypatch, local, visible, expected):
    # srun --gpus-per-task=1: every task sees one GPU (index 0) while SLURM_LOCALID counts up.
    monkeypatch.setenv("LOCAL_RANK", str(local))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: visible > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert dist.device_index() == expected


def test_ensure_env_rewrites_local_rank_for_deepspeed(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        # setenv first so teardown restores the variable's original state even when it was unset
        # (delenv of an unset variable records nothing, and ensure_env's RANK=3 of 4 would leak
        # into the next test's process group, which then waits for ranks that never come).
        monkeypatch.setenv(var, "unset")
        monkeypatch.delenv(var)
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_LOCALID", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    dist.ensure_env()
    import os

    assert os.environ["RANK"] == "3" and os.environ["LOCAL_RANK"] == "0"


def _any_rank_worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as tdist

    tdist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        seen = [dist.any_rank(rank == 1), dist.any_rank(False), dist.any_rank(True)]
        with open(f"{out_dir}/rank{rank}", "w") as f:
            f.write(",".join(str(int(x)) for x in seen))
    finally:
        tdist.destroy_process_group()


def test_any_rank_agrees_across_two_ranks(tmp_path):
    # A preemption signal seen by one rank only must stop every rank at the same step.
    import torch.multiprocessing as mp

    mp.spawn(_any_rank_worker, args=(dist.free_port(), str(tmp_path)), nprocs=2, join=True)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["1,0,1", "1,0,1"]
    assert dist.any_rank(True) and not dist.any_rank(False)   # a world of one: the flag itself
