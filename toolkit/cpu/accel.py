"""What :func:`toolkit.cpu.accelerate` switches, one speed-up at a time.

Each entry of :data:`SPEEDUPS` applies one speed-up to a model (returning what it switched, or
raising :class:`Skip` with the reason it does not apply) and removes it again; ``accelerate``
applies them all and the benchmarks take them off one at a time.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict

import torch
from torch import nn


class Skip(Exception):
    """A speed-up that does not apply here; the message says why."""


@dataclass(frozen=True)
class SpeedUp:
    """One speed-up: ``apply(model, trained)`` returns what it switched, ``remove(model)`` undoes it;
    ``concerns(model, trained)`` says whether the model has anything it could switch."""

    apply: Callable[[nn.Module, bool], Any]
    remove: Callable[[nn.Module], Any]
    concerns: Callable[[nn.Module, bool], bool] = lambda model, trained: True


def _onednn_apply(model: nn.Module, trained: bool) -> int:
    from toolkit.cpu import onednn

    reason = onednn.onednn_unavailable_reason()
    if reason is not None:
        raise Skip(reason)
    return onednn.use_onednn_linears(model, trainable=trained)


def _onednn_remove(model: nn.Module) -> int:
    from toolkit.cpu import onednn

    return onednn.restore_linears(model)


def _has_relation_loss(model: nn.Module, trained: bool) -> bool:
    from toolkit.losses.relations import MiniLMv2RelationLoss

    return any(isinstance(m, MiniLMv2RelationLoss) for m in model.modules())


def _relation_apply(model: nn.Module, trained: bool) -> str:
    from toolkit.cpu import relation

    if not relation.register():
        raise Skip(relation.unavailable_reason() or "the kernel does not build here")
    return relation.NAME


def _relation_remove(model: nn.Module) -> None:
    from toolkit.cpu import relation
    from toolkit.losses.relation_kl import unregister_relation_kl

    unregister_relation_kl(relation.NAME)


#: The speed-ups, in the order they are applied.
SPEEDUPS: Dict[str, SpeedUp] = {
    "onednn_linears": SpeedUp(_onednn_apply, _onednn_remove),
    "relation_kl": SpeedUp(_relation_apply, _relation_remove, _has_relation_loss),
}


def _not_fp32_cpu(model: nn.Module) -> str:
    params = list(model.parameters())
    if not params:
        return "the model has no parameters"
    bad = {(p.device.type, str(p.dtype).replace("torch.", "")) for p in params
           if p.device.type != "cpu" or p.dtype != torch.float32}
    if bad:
        return "not an fp32 CPU model (" + ", ".join(f"{d} {t}" for d, t in sorted(bad)) + ")"
    return ""


def accelerate(model: nn.Module, *, trained: bool, cfg_value: str) -> Dict[str, Any]:
    """See :func:`toolkit.cpu.accelerate`."""
    record: Dict[str, Any] = {"cpu_accel": cfg_value, "model": type(model).__name__, "trained": bool(trained),
                              "applied": {}, "skipped": {}}
    if cfg_value == "off":
        return record
    why = _not_fp32_cpu(model)
    for name, speedup in SPEEDUPS.items():
        if not speedup.concerns(model, trained):
            continue
        if why:
            record["skipped"][name] = why
            continue
        try:
            record["applied"][name] = speedup.apply(model, trained)
        except Skip as e:
            record["skipped"][name] = str(e)
    return record
