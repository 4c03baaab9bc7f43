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


# -- keys checked against the installed DeepSpeed -------------------------------------------------
def _write(tmp_path, cfg, name="ds.json"):
    p = tmp_path / name
    p.write_text(json.dumps(cfg, indent=2))
    return p


def _zero2():
    return json.loads((DS_DIR / "zero2_bf16.json").read_text())


@pytest.mark.parametrize("mutate,field,suggestion", [
    (lambda c: c.update(gradient_acumulation_steps=2), "gradient_acumulation_steps", "gradient_accumulation_steps"),
    (lambda c: c.update(zero_optimisation=c.pop("zero_optimization")), "zero_optimisation", "zero_optimization"),
    (lambda c: c["zero_optimization"].update(overlap_com=True), "zero_optimization.overlap_com", "overlap_comm"),
    (lambda c: c["zero_optimization"].update(offload_param={"device": "cpu", "pin_memry": True}, stage=3),
     "zero_optimization.offload_param.pin_memry", "pin_memory"),
    (lambda c: c["bf16"].update(immediate_grad_updat=True), "bf16.immediate_grad_updat", "immediate_grad_update"),
    (lambda c: c.update(checkpoint={"tag_validaton": "warn"}), "checkpoint.tag_validaton", "tag_validation"),
    (lambda c: c.update(tensorboard={"enabled": True, "output_pat": "tb"}), "tensorboard.output_pat", "output_path"),
])
def test_unknown_keys_name_key_file_and_nearest(tmp_path, mutate, field, suggestion):
    cfg = _zero2()
    mutate(cfg)
    p = _write(tmp_path, cfg)
    with pytest.raises(ConfigError) as e:
        load_ds_config(p, world_size=2)
    msg = str(e.value)
    assert e.value.field == field and msg.startswith(f"{p}: config field '{field}'")
    assert f"did you mean '{suggestion}'" in msg and "\n" not in msg


def test_wrong_type_in_a_deepspeed_model_names_the_key(tmp_path):
    cfg = _zero2()
    cfg["zero_optimization"]["reduce_bucket_size"] = "big"
    p = _write(tmp_path, cfg)
    with pytest.raises(ConfigError) as e:
        load_ds_config(p, world_size=1)
    assert e.value.field == "zero_optimization.reduce_bucket_size" and "'big'" in str(e.value)
    cfg = _zero2()
    cfg["zero_optimization"]["offload_optimizer"] = {"device": "gpu"}
    with pytest.raises(ConfigError) as e:
        load_ds_config(cfg, world_size=1)
    assert e.value.field == "zero_optimization.offload_optimizer.device" and "'gpu'" in str(e.value)


def test_a_block_deepspeed_refuses_is_one_line(tmp_path):
    """DeepSpeed's own refusal (here: a block it removed) is one line naming the key and file."""
    cfg = {**_zero2(), "elasticity": {"enabled": True}}
    p = _write(tmp_path, cfg)
    try:
        load_ds_config(p, world_size=1)
    except ConfigError as e:
        assert e.field == "elasticity" and str(p) in str(e) and "\n" not in str(e)
    else:
        pytest.skip("this DeepSpeed version still accepts the elasticity block")


def test_keys_deepspeed_reads_only_in_some_set_ups_are_accepted():
    """fp16's dynamic loss-scale keys are read only when one of them is present (DeepSpeed
    0.16); the check takes them from what DeepSpeed reads of this config and its constants."""
    cfg = json.loads((DS_DIR / "zero2_fp16.json").read_text())
    cfg["fp16"]["consecutive_hysteresis"] = False
    load_ds_config(cfg, world_size=1)
    cfg["fp16"]["loss_scale_windw"] = 1000
    with pytest.raises(ConfigError, match="did you mean 'loss_scale_window'"):
        load_ds_config(cfg, world_size=1)


def test_accepted_keys_come_from_the_installed_deepspeed():
    """The accepted top-level keys are what DeepSpeed's parser reads: every key constant of
    deepspeed.runtime.constants that names a top-level block is in, and a made-up key is not."""
    from deepspeed.runtime import constants as C

    from toolkit.engine.ds_config import accepted_top_keys

    keys = accepted_top_keys()
    for name in ("TRAIN_BATCH_SIZE", "TRAIN_MICRO_BATCH_SIZE_PER_GPU", "GRADIENT_ACCUMULATION_STEPS",
                 "GRADIENT_CLIPPING", "STEPS_PER_PRINT", "WALL_CLOCK_BREAKDOWN", "PRESCALE_GRADIENTS"):
        assert getattr(C, name) in keys, name
    assert {"zero_optimization", "bf16", "fp16", "activation_checkpointing", "flops_profiler"} <= keys
    assert "zero_optimisation" not in keys and "stage" not in keys


def test_every_shipped_ds_config_passes_the_key_check():
    for f in sorted(DS_DIR.glob("*.json")):
        load_ds_config(f, world_size=4)
