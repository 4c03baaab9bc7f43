"""RunLogger output files and rank-aware logging."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from toolkit.utils.logging import RunLogger, configure_logging, env_rank, get_logger


def test_writes_jsonl_and_tfevents(tmp_path):
    with RunLogger(tmp_path, is_main=True) as rl:
        rl.log(1, {"loss": torch.tensor(2.5), "lr": 1e-4, "tokens": 128})
        rl.log(2, {"loss": float("nan"), "acc": 91.5}, prefix="eval")
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["prefix"] == "train" and rows[0]["loss"] == 2.5
    assert rows[0]["tokens"] == 128 and "time" in rows[0]
    assert rows[1]["prefix"] == "eval" and rows[1]["loss"] == "nan" and rows[1]["acc"] == 91.5
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "eval/acc" in acc.Tags()["scalars"]
    assert acc.Scalars("train/loss")[0].value == pytest.approx(2.5)


def test_non_main_rank_writes_nothing(tmp_path):
    rl = RunLogger(tmp_path / "run", is_main=False)
    rl.log(1, {"loss": 1.0})
    rl.close()
    assert not (tmp_path / "run").exists()


def test_appends_on_resume(tmp_path):
    for step in (1, 2):
        with RunLogger(tmp_path, is_main=True, tensorboard=False) as rl:
            rl.log(step, {"loss": 1.0})
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def test_env_rank_and_console_level(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    assert env_rank() == 3
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert env_rank() == 2
    log = get_logger("x.y")
    assert log.name == "toolkit.x.y"
    console = [h for h in logging.getLogger("toolkit").handlers if getattr(h, "_toolkit_console", False)]
    assert len(console) == 1


def test_per_rank_log_file(tmp_path):
    path = configure_logging(tmp_path, rank=1)
    assert path == (tmp_path / "logs" / "rank1.log").resolve()
    assert configure_logging(tmp_path, rank=1) == path  # idempotent
    get_logger("filetest").warning("hello file")
    for h in logging.getLogger("toolkit").handlers:
        h.flush()
    assert "hello file" in path.read_text()
    root = logging.getLogger("toolkit")
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(h)
        h.close()
