"""Relation-KL kernels: the portable chunked torch path (and an optional Triton one)."""
from toolkit.kernels.relation_kl_chunked import (DEFAULT_BLOCK_BUDGET_BYTES, auto_chunk_size,
                                                 check_relation_heads, relation_kl, relation_kl_qk)

__all__ = ["DEFAULT_BLOCK_BUDGET_BYTES", "auto_chunk_size", "check_relation_heads", "relation_kl",
           "relation_kl_qk"]
