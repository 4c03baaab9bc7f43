"""Distillation losses: small modules with explicit arguments, and the registry the recipe uses.

:data:`LOSSES` maps a config name (``loss.weights`` keys) to a registered
:class:`~toolkit.losses.registry.DistillLoss`; each says what it reads from the teacher and
the student and builds itself from ``loss.options.<name>`` (see ``registry.py`` for how to add
one). The plain modules (``MiniLMv2RelationLoss``, ``MiniLMv1Loss``, ``TinyBERTLoss``,
``LogitKDLoss``) hold the math with explicit tensor arguments.
"""
from toolkit.losses.logit_kd import LogitKDLoss
from toolkit.losses.minilm_v1 import MiniLMv1Loss
from toolkit.losses.reference import minilm_v2_reference, relation_kl_reference
from toolkit.losses.relation_kl import register_relation_kl, relation_kl_naive
from toolkit.losses.relations import MiniLMv2RelationLoss
from toolkit.losses.tinybert import TinyBERTLoss
from toolkit.losses import minilm_v2 as _minilm_v2  # noqa: F401  (registers "minilmv2")
from toolkit.losses.registry import (EMBEDDINGS, LOSSES, DistillInputs, DistillLoss, LossContext, Needs, build_loss,
                                     get_loss, register_loss)

__all__ = ["EMBEDDINGS", "LOSSES", "DistillInputs", "DistillLoss", "LogitKDLoss", "LossContext", "MiniLMv1Loss",
           "MiniLMv2RelationLoss", "Needs", "TinyBERTLoss", "build_loss", "get_loss", "minilm_v2_reference",
           "register_loss", "register_relation_kl", "relation_kl_naive", "relation_kl_reference"]
