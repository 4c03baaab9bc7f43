"""Precision resolution: bf16/fp16 fall back to fp32 on a CPU without native bf16."""
from __future__ import annotations

import pytest
import torch

from toolkit.engine import precision
from toolkit.engine.precision import native_bf16_supported, resolve_precision, teacher_dtype


def _cpu_flags() -> set:
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return set()
    return {f for line in text.splitlines() if line.startswith(("flags", "Features")) for f in line.split(":", 1)[1].split()}


def test_native_bf16_agrees_with_the_cpu_instruction_set():
    # An independent look at the hardware (/proc/cpuinfo): AVX512-BF16 or AMX-BF16 run bf16
    # matmuls natively; without any AVX-512 (x86) or BF16/SVE (Arm) they are emulated, whatever
    # DeepSpeed's is_bf16_supported() says. (AVX-512 without BF16 is mkldnn's call: not checked.)
    flags = _cpu_flags()
    if not flags:
        pytest.skip("no /proc/cpuinfo flags to compare with")
    if {"avx512_bf16", "amx_bf16"} & flags:
        assert native_bf16_supported("cpu") is True
    elif any(f.startswith(("avx512", "amx")) for f in flags) or {"bf16", "sve"} & flags:
        pytest.skip("AVX-512 without BF16: mkldnn decides")
    else:
        assert native_bf16_supported("cpu") is False


@pytest.mark.parametrize("answer,expected", [(True, True), (False, False)])
def test_native_bf16_follows_mkldnn_not_deepspeed(monkeypatch, answer, expected):
    import deepspeed.accelerator

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: answer)
    # DeepSpeed's answer (True on such CPUs, which is wrong) must not matter.
    acc = deepspeed.accelerator.get_accelerator()
    monkeypatch.setattr(acc, "is_bf16_supported", lambda: not answer, raising=False)
    assert native_bf16_supported("cpu") is expected


@pytest.mark.parametrize("error", [RuntimeError("no mkldnn"), AttributeError("old torch")])
def test_native_bf16_is_false_when_mkldnn_cannot_say(monkeypatch, error):
    def broken():
        raise error

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", broken)
    assert native_bf16_supported("cpu") is False


@pytest.mark.parametrize("key", ["bf16", "fp16", "bfloat16"])
def test_cpu_without_bf16_falls_back_to_fp32(monkeypatch, key):
    monkeypatch.setattr(precision, "native_bf16_supported", lambda device: False)
    src = {"train_micro_batch_size_per_gpu": 1, key: {"enabled": True}}
    cfg, dtype, note = resolve_precision(src, "cpu")
    assert dtype == torch.float32
    assert "fp32" in note and ("bf16" in note or "fp16" in note)
    assert not cfg.get("bf16", {}).get("enabled") and not cfg.get("fp16", {}).get("enabled")
    assert src[key] == {"enabled": True}  # the caller's dict is untouched


def test_cpu_with_native_bf16_keeps_bf16_and_maps_fp16(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16_supported", lambda device: True)
    cfg, dtype, note = resolve_precision({"bf16": {"enabled": True}}, "cpu")
    assert dtype == torch.bfloat16 and note is None and cfg["bf16"]["enabled"]
    cfg, dtype, note = resolve_precision({"fp16": {"enabled": True}}, "cpu")
    assert dtype == torch.bfloat16 and not cfg["fp16"]["enabled"] and "fp16" in note


def test_this_cpu_shipped_bf16_config_resolves_consistently():
    cfg, dtype, note = resolve_precision({"bf16": {"enabled": True}}, "cpu")
    if native_bf16_supported("cpu"):
        assert dtype == torch.bfloat16 and note is None
    else:
        assert dtype == torch.float32 and note


def test_fp32_config_unchanged():
    cfg, dtype, note = resolve_precision({"zero_optimization": {"stage": 2}}, "cpu")
    assert dtype == torch.float32 and note is None and cfg == {"zero_optimization": {"stage": 2}}


def test_cuda_keeps_half_precision():
    # Pure config logic: no GPU needed to decide what CUDA would run.
    assert resolve_precision({"bf16": {"enabled": True}}, "cuda")[1] == torch.bfloat16
    assert resolve_precision({"fp16": {"enabled": True}}, "cuda")[1] == torch.float16


def test_teacher_dtype_cpu_follows_the_job():
    assert teacher_dtype("cpu") == torch.float32
    assert teacher_dtype("cpu", torch.float32) == torch.float32
    # resolve_precision only yields bf16 on a CPU with native bf16; the teacher then follows.
    assert teacher_dtype("cpu", torch.bfloat16) == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_cuda_bf16_without_native_support_is_named(monkeypatch, native):
    # V100/T4 emulate bf16: the job keeps what the JSON says but tells the user what to use.
    monkeypatch.setattr(precision, "native_bf16_supported", lambda device: native)
    cfg, dtype, note = resolve_precision({"bf16": {"enabled": True}}, "cuda")
    assert dtype == torch.bfloat16 and cfg["bf16"]["enabled"]
    assert (note is None) if native else ("zero2_fp16.json" in note)


@pytest.mark.parametrize("native, expected", [(True, "zero2_bf16.json"), (False, "zero2_fp16.json")])
def test_auto_ds_config_counts_only_native_gpu_bf16(monkeypatch, native, expected):
    from toolkit.recipes.common import auto_ds_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision, "native_bf16_supported", lambda device: native)
    assert auto_ds_config() == expected
