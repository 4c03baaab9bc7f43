"""Learning-rate schedules: linear warmup, then a named decay (registry)."""
from __future__ import annotations

import math
from typing import Callable, Dict

import torch

from toolkit.errors import ConfigError

# progress in [0, 1] -> multiplier in [0, 1] before min_lr_ratio is applied.
DECAYS: Dict[str, Callable[[float], float]] = {
    "linear": lambda p: 1.0 - p,
    "cosine": lambda p: 0.5 * (1.0 + math.cos(math.pi * p)),
    "constant": lambda p: 1.0,
}


class WarmupDecay:
    """LR multiplier for step ``s`` (0-based): ``(s+1)/warmup`` during warmup, then decay.

    A callable object rather than a closure so ``LambdaLR.state_dict()`` saves its settings
    with the checkpoint.

    Args:
        total_steps: optimizer steps of the whole run.
        warmup_steps: steps of linear warmup.
        decay: a key of :data:`DECAYS`.
        min_lr_ratio: floor of the multiplier at the end of decay.
    """

    def __init__(self, total_steps: int, warmup_steps: int, decay: str = "linear", min_lr_ratio: float = 0.0):
        if decay not in DECAYS:
            raise ConfigError("optim.decay", f"unknown decay {decay!r}; choose one of {sorted(DECAYS)}")
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.min_lr_ratio = float(min_lr_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * DECAYS[self.decay](progress)


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0,
                    warmup_ratio: float = 0.0, decay: str = "linear", min_lr_ratio: float = 0.0
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR with warmup (``warmup_steps``, else ``warmup_ratio * total_steps``) and decay."""
    if total_steps < 1:
        raise ConfigError("total_steps", f"must be >= 1, got {total_steps}")
    if warmup_steps < 0 or not 0.0 <= warmup_ratio < 1.0:
        raise ConfigError("optim.warmup_steps", "must be >= 0 (and warmup_ratio in [0, 1))")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {min_lr_ratio}")
    warm = warmup_steps if warmup_steps > 0 else int(round(warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupDecay(total_steps, warm, decay, min_lr_ratio))
