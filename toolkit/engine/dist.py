"""Rank helpers that work with and without a launcher.

Under ``deepspeed``/``torchrun``/``srun`` the launcher sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT. A plain ``python`` process has none of them and DeepSpeed
would then go looking for MPI; :func:`ensure_env` fills in a world of one. All helpers
below work, trivially, before :func:`init_distributed` and at world size 1.
"""
from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any, List, Union

import torch
import torch.distributed as tdist

from toolkit.errors import SharedFolderError
from toolkit.utils.logging import env_rank

_SLURM_FALLBACKS = {"RANK": "SLURM_PROCID", "WORLD_SIZE": "SLURM_NTASKS", "LOCAL_RANK": "SLURM_LOCALID"}


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_env() -> None:
    """Set a one-process world in the environment when no launcher did.

    ``srun`` without a wrapper only sets SLURM_* variables; those are mapped over so a
    Slurm step started with plain ``srun python ...`` works too.
    """
    for var, slurm in _SLURM_FALLBACKS.items():
        if var not in os.environ and slurm in os.environ:
            os.environ[var] = os.environ[slurm]
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    index = device_index()
    if str(index) != os.environ["LOCAL_RANK"]:
        # srun --gpus-per-task=1 / --gpu-bind: each task sees its own GPU as device 0 while
        # SLURM_LOCALID counts 0..n-1. DeepSpeed reads LOCAL_RANK as the device index.
        os.environ["LOCAL_RANK"] = str(index)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def init_distributed() -> None:
    """Create the process group once (gloo on CPU, nccl on CUDA) through DeepSpeed."""
    if is_initialized():
        return
    ensure_env()
    import deepspeed

    if torch.cuda.is_available():
        torch.cuda.set_device(device_index())
        backend = "nccl"
    else:
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)


def rank() -> int:
    """Global rank (from the process group, else the launcher's environment)."""
    return tdist.get_rank() if is_initialized() else env_rank()


def world_size() -> int:
    """Number of ranks; 1 before the process group exists."""
    return tdist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    """Rank within this node (device index)."""
    for var in ("LOCAL_RANK", "SLURM_LOCALID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


def device_index() -> int:
    """The CUDA device this rank uses: its local rank, modulo the GPUs this process can see.

    A launcher that binds one GPU per task (``srun --gpus-per-task=1``) leaves each task a single
    visible device 0 while its local rank runs 0..n-1; 0 on hosts without CUDA.
    """
    lr = local_rank()
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return lr % count if count and lr >= count else lr


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized() and world_size() > 1:
        tdist.barrier()


def collective_device() -> torch.device:
    """Where a tensor collective's operands must live: the current GPU under an NCCL-only group
    (NCCL has no CPU backend: a CPU tensor fails with "No backend type associated with device
    type cpu"), else the CPU."""
    backend = str(tdist.get_backend()) if is_initialized() else "gloo"
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks; returns a new tensor on ``t``'s device (the input is unchanged).

    ``t`` may live anywhere: it is moved to :func:`collective_device` for the reduction and back.
    """
    out = t.detach().clone()
    if is_initialized() and world_size() > 1:
        dev = collective_device()
        work = out if out.device == dev else out.to(dev)
        tdist.all_reduce(work, op=tdist.ReduceOp.SUM)
        out = work if work.device == t.device else work.to(t.device)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (a collective: call it on all ranks
    at the same point). Used for stop decisions, e.g. a preemption signal that reached some
    ranks only: ranks that decided differently would enter different collectives and hang."""
    if not (is_initialized() and world_size() > 1):
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0])).item() > 0)


def all_ranks(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on all of them (a collective, like :func:`any_rank`).

    Used where one rank alone can run out of something, e.g. a finite corpus whose shards
    differ in length: every rank stops at the first micro step where any rank has no batch.
    """
    return not any_rank(not flag)


def all_gather_object(obj: Any) -> List[Any]:
    """Picklable ``obj`` from every rank, indexed by rank."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out: List[Any] = [None] * world_size()
    tdist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` as given on rank ``src``, on every rank."""
    if not (is_initialized() and world_size() > 1):
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


def check_shared_folder(path: Union[str, Path], field: str = "output_dir", wait_s: float = 10.0) -> None:
    """Check that every rank sees the same folder ``path``; a collective, call it on all ranks.

    Rank 0 writes a file with a fresh token into ``path``; after a barrier every rank reads it
    back (retrying for up to ``wait_s`` seconds: a network filesystem may show a new file on
    another node a moment later). Checkpoints rely on it: each rank writes its own part into one
    folder and rank 0 alone renames and marks it complete.

    Raises:
        SharedFolderError: naming the ranks and hosts that do not see rank 0's file.
    """
    if not (is_initialized() and world_size() > 1):
        return
    root = Path(path)
    token, named = broadcast_object((uuid.uuid4().hex, str(root)) if is_main() else None)
    probe = root / f".shared-check-{token}"
    problem = None
    if is_main():
        try:
            root.mkdir(parents=True, exist_ok=True)
            with open(probe, "w", encoding="utf-8") as fh:
                fh.write(token)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as e:
            problem = f"rank 0 cannot write to it ({e})"
    problem = broadcast_object(problem)
    if problem:
        raise SharedFolderError(named, field, problem)
    barrier()
    deadline = time.monotonic() + wait_s
    while True:
        try:
            ok = probe.read_text(encoding="utf-8") == token
        except OSError:
            ok = False
        if ok or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    seen = all_gather_object((ok, socket.gethostname()))
    barrier()
    if is_main():
        probe.unlink(missing_ok=True)
    missing = [f"rank {r} on {host}" for r, (good, host) in enumerate(seen) if not good]
    if missing:
        raise SharedFolderError(named, field, f"{', '.join(missing)} cannot see the file rank 0 "
                                f"(on {seen[0][1]}) wrote there")


def shutdown() -> None:
    """Destroy the process group (call once at the end of a job).

    Leaving gloo groups to interpreter teardown can abort a rank at exit with
    "terminate called without an active exception" after all work is done.
    """
    if is_initialized():
        barrier()
        rank = tdist.get_rank()
        tdist.destroy_process_group()
        release_shm_workspace(rank)


def shm_workspace_path(rank: int) -> str:
    """The ``/dev/shm`` file DeepSpeed's CPU shared-memory all-reduce creates for ``rank``.

    DeepSpeed (0.19.8, ``ops/csrc/cpu/comm/shm.cpp``) names it
    ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` and never unlinks it:
    every multi-rank CPU job leaves ~68 MB per rank in ``/dev/shm`` (RAM) until reboot.
    """
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_workspace(rank: int) -> None:
    """Unlink this rank's DeepSpeed shm all-reduce segment, if any (after the last collective;
    a peer that still has it mapped keeps its mapping)."""
    try:
        os.unlink(shm_workspace_path(rank))
    except FileNotFoundError:
        pass
    except OSError:  # pragma: no cover - permissions: leave it, the job's result is unaffected
        pass


def finalize_and_exit(code: int = 0) -> None:
    """End a launched job: destroy the process group, flush logs and stdio, ``os._exit(code)``.

    Measured with DeepSpeed 0.19.8 on CPU: when output goes to a file (not a TTY), rank 1
    regularly aborts during interpreter teardown ("terminate called without an active
    exception", exit -6) after all work is done, which makes the launcher report failure.
    Skipping teardown avoids that. Close RunLoggers / files before calling this: atexit
    handlers do not run.
    """
    import logging
    import sys

    try:
        shutdown()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
