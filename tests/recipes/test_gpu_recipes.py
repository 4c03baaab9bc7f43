"""The three recipes on a CUDA GPU, one process: bf16 and fp16 DeepSpeed engines, ZeRO 2 and 3,
ZeRO-Offload, the Triton relation KL inside the distillation step, and an exact resume.

Marked ``gpu`` (deselected by default). On a GPU host: ``pytest -m gpu tests/recipes``, or
``scripts/gpu_acceptance.sh tests``.
"""
from __future__ import annotations

import json

import pytest

from toolkit.engine import OptimConfig
import torch

from test_distill import _cfg as _distill_cfg
from test_distill import _losses, check_resume_matches_uninterrupted

pytestmark = pytest.mark.gpu

HALF = {"ds_configs/zero2_bf16.json": torch.bfloat16, "ds_configs/zero3_bf16.json": torch.bfloat16,
        "ds_configs/zero2_fp16.json": torch.float16}


@pytest.fixture(autouse=True)
def _needs_cuda():
    if not torch.cuda.is_available():
        pytest.fail("the gpu marker was selected on a host where torch sees no GPU")
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("these tests expect native bf16 (compute capability 8.0 or newer)")


def _job_log(out) -> str:
    return "\n".join(p.read_text() for p in (out / "logs").glob("rank*.log"))


@pytest.mark.parametrize("ds_config", sorted(HALF))
def test_distill_half_precision_engines(ds_config, tiny_bert4_dir, fixture_corpus, tmp_path):
    from toolkit.recipes.distill import DistillRecipe

    out = tmp_path / "d"
    rec = DistillRecipe(_distill_cfg(tiny_bert4_dir, fixture_corpus, out, ds_config=ds_config))
    try:
        rec.setup()
        assert rec.device.type == "cuda"
        assert rec.engine.compute_dtype == HALF[ds_config]
        # The frozen teacher runs in bf16 on a GPU that has it, whatever the job's precision
        # (toolkit.engine.precision.teacher_dtype); the student trains in the config's dtype.
        assert next(rec.teachers[0].model.parameters()).dtype == torch.bfloat16
        assert next(rec.module.student.parameters()).dtype == HALF[ds_config]
        assert next(rec.teachers[0].model.parameters()).is_cuda
        res = rec.train()
    finally:
        rec.cleanup()
    assert res["steps"] == 6 and res["nonfinite_losses"] == 0
    losses = _losses(out)
    assert len(losses) == 6 and all(0 <= v < 10 for v in losses.values())
    assert res["throughput"]["memory_kind"] == "cuda_max_allocated" and res["throughput"]["peak_mem_mb"] > 0
    assert res["throughput"]["tokens_per_s"] > 0
    # impl auto: the Triton kernel, not a silent fallback to the chunked path.
    log_text = _job_log(out)
    assert "relation KL triton" in log_text, log_text[-3000:]
    assert "Triton kernel failed" not in log_text
    # The saved student is fp32 (DeepSpeed's fp32 master weights), loadable as any HF model.
    from transformers import AutoModel

    student = AutoModel.from_pretrained(out / "student")
    assert next(student.parameters()).dtype == torch.float32


def test_distill_triton_and_chunked_losses_agree(tiny_bert4_dir, fixture_corpus, tmp_path):
    # fp32 engine, dropout off: the two relation-KL codes see the same inputs at every step.
    from toolkit.recipes.distill import run_distill

    runs = {}
    for impl in ("triton", "chunked"):
        out = tmp_path / impl
        run_distill(_distill_cfg(tiny_bert4_dir, fixture_corpus, out, max_steps=3, ds_config="ds_configs/cpu_fp32.json",
                                 loss={"options": {"minilmv2": {"num_relation_heads": 8, "impl": impl}}}, student={"hidden_dropout": 0.0, "attention_dropout": 0.0}))
        runs[impl] = _losses(out)
        if impl == "triton":
            assert "relation KL triton" in _job_log(out)
    for step in (1, 2, 3):
        assert runs["triton"][step] == pytest.approx(runs["chunked"][step], rel=1e-4, abs=1e-6), step


def test_distill_resume_on_gpu(tiny_bert4_dir, fixture_corpus, tmp_path):
    # fp32 so the comparison is tight: the Triton kernel has no atomics, so only the GPU's
    # attention backward can make two runs differ.
    check_resume_matches_uninterrupted(tiny_bert4_dir, fixture_corpus, tmp_path, stop_after=3, rel=1e-4, abs_=1e-6,
                                       ds_config="ds_configs/cpu_fp32.json")


def test_distill_zero3_offload(tiny_bert4_dir, fixture_corpus, tmp_path):
    # ZeRO-3 with the optimizer state on the host (DeepSpeedCPUAdam, compiled on first use).
    from toolkit.recipes.distill import run_distill

    out = tmp_path / "off"
    res = run_distill(_distill_cfg(tiny_bert4_dir, fixture_corpus, out, max_steps=3,
                                   ds_config="ds_configs/zero3_offload_bf16.json"))
    assert res["steps"] == 3 and res["nonfinite_losses"] == 0
    assert all(v == v for v in _losses(out).values())


def test_teacher_bf16_zero2(tiny_bert_dir, fixture_tasks, tmp_path):
    from toolkit.recipes.teacher import TeacherConfig, run_teacher

    out = tmp_path / "t"
    res = run_teacher(TeacherConfig(model=str(tiny_bert_dir), tasks=[str(p) for p in fixture_tasks.values()],
                                    output_dir=str(out), max_steps=8, optim=OptimConfig(lr=3e-4, warmup_ratio=0.1), log_every=1, eval_every=4,
                                    ds_config="ds_configs/zero2_bf16.json"))
    assert res["steps"] == 8 and res["nonfinite_losses"] == 0
    assert res["best_average"] == res["best_average"]   # finite
    assert res["throughput"]["tokens_per_s"] > 0
    from transformers import AutoModel

    # Saved from the fp32 master weights, so a later fp32 job reloads fp32.
    assert next(AutoModel.from_pretrained(out / "model").parameters()).dtype == torch.float32


def test_finetune_bf16(tiny_bert_dir, fixture_tasks, tmp_path):
    from toolkit.recipes.finetune import FinetuneConfig, run_finetune

    out = tmp_path / "ft"
    res = run_finetune(FinetuneConfig(model=str(tiny_bert_dir), task=str(fixture_tasks["senti"]), output_dir=str(out),
                                      epochs=2, optim=OptimConfig(lr=5e-4, warmup_ratio=0.1), log_every=1, ds_config="ds_configs/zero2_bf16.json"))
    assert 0.0 <= res["metrics"]["accuracy"] <= 100.0 and res["steps"] > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["metrics"] == res["metrics"]
