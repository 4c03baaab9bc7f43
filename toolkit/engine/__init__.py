"""Engine layer: the only package that imports ``deepspeed`` / ``torch.distributed``.

``Engine`` wraps ``deepspeed.initialize`` (with or without a launcher); ``dist`` has rank
helpers; ``checkpoint`` writes atomic checkpoints; ``precision`` picks the compute dtype;
``signals`` turns preemption signals into a flag. DeepSpeed itself is imported lazily,
when an ``Engine`` is built.
"""
from toolkit.engine.engine import Engine, OptimConfig, prepare_frozen
from toolkit.engine.signals import REQUEUE_EXIT_CODE, PreemptionHandler

__all__ = ["Engine", "OptimConfig", "prepare_frozen", "PreemptionHandler", "REQUEUE_EXIT_CODE"]
