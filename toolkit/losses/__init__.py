"""Distillation losses: small modules with explicit arguments; weights are mixed by recipes.

``LOSSES`` maps a config name to the loss class.
"""
from toolkit.losses.logit_kd import LogitKDLoss
from toolkit.losses.minilm_v1 import MiniLMv1Loss
from toolkit.losses.reference import minilm_v2_reference, relation_kl_reference
from toolkit.losses.relation_kl import register_relation_kl, relation_kl_naive
from toolkit.losses.relations import MiniLMv2RelationLoss
from toolkit.losses.tinybert import TinyBERTLoss

#: Loss registry: config name -> class.
LOSSES = {
    "minilm_v2": MiniLMv2RelationLoss,
    "minilm_v1": MiniLMv1Loss,
    "tinybert": TinyBERTLoss,
    "logit_kd": LogitKDLoss,
}

__all__ = ["LOSSES", "LogitKDLoss", "MiniLMv1Loss", "MiniLMv2RelationLoss", "TinyBERTLoss", "minilm_v2_reference",
           "register_relation_kl", "relation_kl_naive", "relation_kl_reference"]
