"""Run one distillation in this process while a thread samples the heap, and write its peak.

    python tests/plan/mem_probe.py OUT_PREFIX --config job.yaml --ds_config ds.json
    deepspeed --num_gpus 2 tests/plan/mem_probe.py OUT_PREFIX --config job.yaml --ds_config ds.json

Writes ``OUT_PREFIX.rank<R>.json`` with ``peak_bytes``: the highest bytes glibc malloc had handed
out (``mallinfo2``: in-use arena chunks + mmapped chunks, i.e. live tensors and buffers, mapped or
not) above the value after the imports and the process group's set-up, before any model.
Needs glibc >= 2.33 and the system allocator (no tcmalloc preload).
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--config", required=True)
    ap.add_argument("--ds_config", required=True)
    ap.add_argument("--local_rank", type=int, default=0)
    args = ap.parse_args()
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2

    def live() -> int:
        m = libc.mallinfo2()
        return int(m.uordblks + m.hblkhd)

    import torch  # noqa: F401

    from toolkit.engine import dist
    from toolkit.jobs import build_config, run_job

    dist.ensure_env()
    dist.init_distributed()
    cfg = build_config("distill", args.config, [], options={"ds_config": args.ds_config})
    gc.collect()
    base = live()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], live())
            time.sleep(0.0005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    run_job("distill", cfg)
    stop.set()
    thread.join()
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps({"peak_bytes": peak[0] - base, "rank": rank}))
    dist.finalize_and_exit(0)


if __name__ == "__main__":
    main()
