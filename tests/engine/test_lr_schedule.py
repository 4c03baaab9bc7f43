"""Warmup + decay LR multipliers."""
from __future__ import annotations

import math

import pytest
import torch

from toolkit.engine.schedule import WarmupDecay, build_scheduler
from toolkit.errors import ConfigError


def test_warmup_then_linear_to_floor():
    f = WarmupDecay(total_steps=10, warmup_steps=2, decay="linear", min_lr_ratio=0.1)
    assert f(0) == pytest.approx(0.5) and f(1) == pytest.approx(1.0)
    assert f(2) == pytest.approx(1.0)
    assert f(10) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    vals = [f(s) for s in range(2, 11)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


def test_cosine_midpoint_and_constant():
    f = WarmupDecay(total_steps=10, warmup_steps=0, decay="cosine")
    assert f(5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert WarmupDecay(10, 0, "constant")(7) == 1.0


def _stepped(sch, opt, n):
    lrs = []
    for _ in range(n):
        opt.step()
        sch.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_scheduler_state_roundtrip_and_ratio(tmp_path):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1.0)
    sch = build_scheduler(opt, total_steps=100, warmup_ratio=0.1, decay="linear")
    assert sch.lr_lambdas[0].warmup_steps == 10
    _stepped(sch, opt, 7)                       # stopped inside the warmup
    torch.save(sch.state_dict(), tmp_path / "sched.pt")
    uninterrupted = _stepped(sch, opt, 20)      # through the end of warmup into the decay

    # A fresh scheduler built with other settings, then given the saved state, continues exactly.
    q = torch.nn.Parameter(torch.zeros(1))
    opt2 = torch.optim.SGD([q], lr=1.0)
    resumed = build_scheduler(opt2, total_steps=5, warmup_ratio=0.0, decay="cosine")
    resumed.load_state_dict(torch.load(tmp_path / "sched.pt", weights_only=True))
    lam = resumed.lr_lambdas[0]
    assert (lam.total_steps, lam.warmup_steps, lam.decay) == (100, 10, "linear")
    assert resumed.last_epoch == 7
    assert _stepped(resumed, opt2, 20) == pytest.approx(uninterrupted)
    # The continued values are the schedule's: warmup to 1.0 at step 9, then linear decay.
    assert uninterrupted[2] == pytest.approx(1.0) and uninterrupted[3] == pytest.approx(1 - 1 / 90)


def test_unknown_decay():
    with pytest.raises(ConfigError, match="decay"):
        WarmupDecay(10, 0, "exp")
