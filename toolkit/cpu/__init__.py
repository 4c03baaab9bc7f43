"""Optional CPU speed-ups, switched by the ``cpu_accel`` field of every job config.

Nothing in the core (engine, models, losses, recipes, data, tasks) needs this package: with
``cpu_accel: off`` it is never imported, and every job runs plain PyTorch. With ``auto`` (the
default) a recipe calls :func:`accelerate` once for each model it runs. Each speed-up applies
only to fp32 models on the CPU and only where it works and passes its self-check on the
machine; everything else is left as it is, so a GPU or bf16 run is unchanged.
"""
from __future__ import annotations

from typing import Any, Dict

#: The values of ``cpu_accel``.
CHOICES = ("auto", "off")


def accelerate(model: Any, *, trained: bool, cfg_value: str) -> Dict[str, Any]:
    """Apply the CPU speed-ups that fit ``model``; returns a record of what was switched.

    Args:
        model: a model the recipe runs (``torch.nn.Module``), on its final device and dtype.
        trained: whether it is trained (dropout and the backward matter) or frozen (the teacher).
        cfg_value: the job's ``cpu_accel`` value: ``auto`` applies what fits, ``off`` nothing.

    Returns:
        A JSON-able record: ``{"cpu_accel", "model", "trained", "applied": {speed-up: what it
        switched}, "skipped": {speed-up: why not}}``. Recipes log it and save it with their
        metrics.
    """
    from toolkit.cpu.accel import accelerate as _accelerate

    return _accelerate(model, trained=trained, cfg_value=cfg_value)
