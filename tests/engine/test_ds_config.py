"""DeepSpeed JSON validation: batch arithmetic, precision conflicts, owned blocks, JSON errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.engine.ds_config import load_ds_config
from toolkit.errors import ConfigError, DataError

DS_DIR = Path(__file__).resolve().parents[2] / "ds_configs"


def test_derives_global_batch_from_micro_and_accum():
    cfg = load_ds_config({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, world_size=3)
    assert cfg["train_batch_size"] == 24


@pytest.mark.parametrize("given,ws,expected", [
    ({"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4}, 2, (4, 4, 32)),
    ({"train_batch_size": 32, "gradient_accumulation_steps": 2}, 2, (8, 2, 32)),
    ({"train_batch_size": 16}, 4, (4, 1, 16)),
    ({"train_micro_batch_size_per_gpu": 8}, 2, (8, 1, 16)),
    ({"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto"},
     1, (2, 1, 2)),
])
def test_resolves_missing_and_auto(given, ws, expected):
    cfg = load_ds_config(given, world_size=ws)
    got = (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"])
    assert got == expected


def test_inconsistent_batch_names_fields_and_world_size():
    with pytest.raises(ConfigError) as e:
        load_ds_config({"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4,
                        "gradient_accumulation_steps": 2}, world_size=4)
    assert "train_batch_size" in str(e.value) and "world size 4" in str(e.value)


def test_non_dividing_batch():
    with pytest.raises(ConfigError) as e:
        load_ds_config({"train_batch_size": 10, "train_micro_batch_size_per_gpu": 4}, world_size=2)
    msg = str(e.value)
    assert "not divisible" in msg and "world size 2" in msg and "gradient_accumulation_steps" in msg


def test_both_bf16_and_fp16():
    with pytest.raises(ConfigError, match="both bf16 and fp16"):
        load_ds_config({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
                        "fp16": {"enabled": True}}, world_size=1)


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_optimizer_and_scheduler_blocks_rejected(tmp_path, block):
    p = tmp_path / "ds.json"
    p.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, block: {"type": "AdamW", "params": {}}}))
    with pytest.raises(ConfigError) as e:
        load_ds_config(p, world_size=1)
    assert f"'{block}'" in str(e.value) and "job YAML" in str(e.value) and str(p) in str(e.value)


def test_bad_zero_stage():
    with pytest.raises(ConfigError, match="zero_optimization.stage"):
        load_ds_config({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 4}}, world_size=1)


def test_bad_micro_batch_value():
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        load_ds_config({"train_micro_batch_size_per_gpu": 0}, world_size=1)
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu"):
        load_ds_config({"gradient_accumulation_steps": 2}, world_size=1)


def test_invalid_json_names_file_and_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('{\n  "train_micro_batch_size_per_gpu": 8,\n  "gradient_clipping": 1.0,\n}\n')
    with pytest.raises(DataError) as e:
        load_ds_config(p, world_size=1)
    assert e.value.line == 4 and f"{p}:4" in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_ds_config(tmp_path / "nope.json", world_size=1)


def test_input_dict_not_mutated():
    src = {"train_micro_batch_size_per_gpu": 2}
    load_ds_config(src, world_size=2)
    assert src == {"train_micro_batch_size_per_gpu": 2}


@pytest.mark.parametrize("path", sorted(DS_DIR.glob("*.json")), ids=lambda p: p.name)
@pytest.mark.parametrize("ws", [1, 2, 8])
def test_shipped_configs_valid_for_any_world_size(path, ws):
    raw = json.loads(path.read_text())
    assert "train_batch_size" not in raw and "optimizer" not in raw and "scheduler" not in raw
    cfg = load_ds_config(path, world_size=ws)
    assert cfg["train_batch_size"] == raw["train_micro_batch_size_per_gpu"] * raw.get(
        "gradient_accumulation_steps", 1) * ws


def test_expected_configs_shipped():
    names = {p.name for p in DS_DIR.glob("*.json")}
    assert {"cpu_fp32.json", "cpu_zero2_fp32.json", "cpu_zero3_fp32.json", "zero1_bf16.json", "zero2_bf16.json",
            "zero3_bf16.json", "zero3_offload_bf16.json", "zero2_fp16.json"} <= names
