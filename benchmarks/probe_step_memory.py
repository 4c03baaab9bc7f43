"""Where a distillation step's memory goes: live tensors vs what glibc malloc holds vs RSS.

Runs one implementation of ``bench_distill_step.py`` (same models, batch and set-up, weights
read before the baseline) for a few steps while a thread samples, every 0.5 ms:

* **live**: bytes malloc has handed out and not taken back (``mallinfo2``: in-use arena
  chunks + mmapped chunks), i.e. the tensors alive right now;
* **malloc held**: the arenas' size + mmapped chunks, i.e. what the allocator keeps,
  free chunks included (the difference to *live* is fragmentation);
* **RSS**: the process's resident memory (``/proc/self/statm``).

Each is printed as the peak above its value right after set-up, per phase of each step
(teacher forward, student forward + loss, backward, optimizer). glibc only (Linux).

Usage::

    python benchmarks/probe_step_memory.py --impl toolkit --seq 512 --batch 4
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

import torch

import bench_distill_step as bench
from _common import rss_bytes

MIB = float(1 << 20)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _mallinfo():
    try:
        libc = ctypes.CDLL("libc.so.6")
        fn = libc.mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2

    def read():
        m = fn()
        return m.uordblks + m.hblkhd, m.arena + m.hblkhd
    return read


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", default="toolkit", choices=sorted(bench.IMPLS), help="row of bench_distill_step.py")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3, help="steps to run (the last shows the steady state)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny random models (plumbing check, seconds)")
    args = ap.parse_args(argv)
    read = _mallinfo()
    if read is None:
        print("error: this probe needs glibc's mallinfo2 (Linux, glibc >= 2.33)", file=sys.stderr)
        return 2
    if bench.allocator_in_use() != "system":
        print(f"error: this process runs on {bench.allocator_in_use()} (LD_PRELOAD), whose memory glibc's "
              "mallinfo2 cannot see; run the probe without LD_PRELOAD (it measures glibc malloc)", file=sys.stderr)
        return 2
    if min(args.seq, args.batch, args.steps) < 1:
        print("error: --seq, --batch and --steps must be >= 1", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    models = bench.bench_models(args.smoke)
    step = bench.IMPLS[args.impl](models)
    data = bench.make_batch(models, args.batch, args.seq)
    bench._fault_in(*bench.step_models(step))
    gc.collect()
    live0, held0 = read()
    rss0 = rss_bytes()
    phase = ["setup"]
    peaks: Dict[str, List[float]] = {}
    stop = threading.Event()

    lock = threading.Lock()

    def take(name: str) -> None:
        live, held = read()
        vals = (live - live0, held - held0, rss_bytes() - rss0)
        with lock:
            p = peaks.setdefault(name, [0.0, 0.0, 0.0])
            for i, v in enumerate(vals):
                p[i] = max(p[i], v)

    def sample() -> None:
        while not stop.is_set():
            take(phase[0])
            time.sleep(0.0005)

    def enter(name: str) -> None:
        # Every phase gets at least the sample at its end, even one too short for the thread.
        take(phase[0])
        phase[0] = name

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    for i in range(args.steps):
        enter(f"step {i + 1}: teacher forward")
        t_qkv = step.teacher_qkv(data)
        enter(f"step {i + 1}: student forward + loss")
        loss = step.student_loss(data, t_qkv)
        del t_qkv
        enter(f"step {i + 1}: backward")
        loss.backward()
        enter(f"step {i + 1}: optimizer")
        step.optimizer.step()
        step.optimizer.zero_grad(set_to_none=True)
    enter("done")
    time.sleep(0.01)
    stop.set()
    thread.join()
    print(f"{args.impl}, seq {args.seq}, batch {args.batch}, {args.threads} threads: peak growth above set-up, MiB\n")
    print("| phase | live tensors | malloc held | RSS |")
    print("|---|---|---|---|")
    for name, (live, held, rss) in peaks.items():
        if name not in ("setup", "done"):
            print(f"| {name} | {live / MIB:.0f} | {held / MIB:.0f} | {rss / MIB:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
