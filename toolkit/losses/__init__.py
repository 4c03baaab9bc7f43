"""Distillation losses: small modules with explicit arguments; weights are mixed by recipes.

``LOSSES`` maps a config name to the loss class.
"""
from toolkit.losses.logit_kd import LogitKDLoss
from toolkit.losses.minilm_v1 import MiniLMv1Loss
from toolkit.losses.reference import minilm_v2_reference, relation_kl_reference
from toolkit.losses.relations import RELATION_KL_IMPLS, MiniLMv2RelationLoss, relation_kl_naive
from toolkit.losses.tinybert import TinyBERTLoss

#: Loss registry: config name -> class.
LOSSES = {
    "minilm_v2": MiniLMv2RelationLoss,
    "minilm_v1": MiniLMv1Loss,
    "tinybert": TinyBERTLoss,
    "logit_kd": LogitKDLoss,
}

__all__ = ["LOSSES", "LogitKDLoss", "MiniLMv1Loss", "MiniLMv2RelationLoss", "RELATION_KL_IMPLS",
           "TinyBERTLoss", "minilm_v2_reference", "relation_kl_naive", "relation_kl_reference"]
