"""The teacher and the distillation recipes at ZeRO stages 0-3, one after the other, in one job.

Run as ``python zero_agreement_job.py --out D --world 1`` (one process) or under
``deepspeed --num_gpus 2 zero_agreement_job.py --out D --world 2``. Both see the same data in
every optimizer step: the teacher's task sampler splits one global batch over the ranks (micro
batch 8 on one process, 4 on each of 2 ranks); the distillation corpus has two loader workers in
all (2 on one process with 2 accumulation steps, 1 on each of 2 ranks), so the two micro batches
of a step are the same either way. Dropout is off. test_zero_agreement.py compares the weights.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import yaml

from toolkit.config import load_config
from toolkit.engine import dist


def write_atomic(path: Path, text: str) -> None:
    """Every rank writes the same file: a rank must never read another's half-written copy."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def ds_config(path: Path, stage: int, micro: int, accum: int) -> Path:
    write_atomic(path, json.dumps({"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
                                "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
                                "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}))
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--teacher_model", required=True, help="encoder for the teacher job (dropout off)")
    ap.add_argument("--tasks", required=True, help="comma-separated task YAMLs")
    ap.add_argument("--distill_teacher", required=True)
    ap.add_argument("--corpus", required=True)
    ap.add_argument("--steps", type=int, default=4)
    a, _ = ap.parse_known_args()   # the deepspeed launcher adds --local_rank
    from toolkit.recipes.distill import DistillConfig, run_distill
    from toolkit.recipes.teacher import TeacherConfig, run_teacher

    out = Path(a.out)
    for stage in (0, 1, 2, 3):
        d = out / f"teacher_z{stage}"
        d.mkdir(parents=True, exist_ok=True)
        ds = ds_config(d / "ds.json", stage, 8 // a.world, 1)
        run_teacher(load_config(TeacherConfig, None, [
            f"model={a.teacher_model}", f"tasks={a.tasks}", f"output_dir={d}", f"max_steps={a.steps}",
            "optim.lr=1e-3", "optim.warmup_ratio=0.0", "dropout=0.0", "eval_every=0", "log_every=1",
            f"ds_config={ds}"]))
        d = out / f"distill_z{stage}"
        d.mkdir(parents=True, exist_ok=True)
        ds = ds_config(d / "ds.json", stage, 4, 2 // a.world)
        job = d / "job.yaml"
        write_atomic(job, yaml.safe_dump({
            "teacher": a.distill_teacher, "output_dir": str(d), "max_steps": a.steps, "log_every": 1,
            "corpus": {"sources": [a.corpus], "seq_length": 32, "shuffle_buffer": 8, "num_workers": 2 // a.world},
            "student": {"num_layers": 2, "hidden_size": 32, "num_heads": 4, "intermediate_size": 64,
                        "hidden_dropout": 0.0, "attention_dropout": 0.0},
            "loss": {"options": {"minilmv2": {"num_relation_heads": 8}}},
            "optim": {"lr": 1e-3, "warmup_ratio": 0.0}, "ds_config": str(ds)}))
        run_distill(load_config(DistillConfig, job))
    dist.finalize_and_exit(0)


if __name__ == "__main__":
    main()
