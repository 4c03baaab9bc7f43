"""Kernels: the relation KL (the portable chunked torch path, its compiled CPU row kernel, an optional
Triton one), and compiled CPU attention and dropout masks (cpu_attention, cpu_dropout)."""
from toolkit.kernels.relation_kl_chunked import (DEFAULT_BLOCK_BUDGET_BYTES, auto_chunk_size,
                                                 check_relation_heads, relation_kl, relation_kl_qk)

__all__ = ["DEFAULT_BLOCK_BUDGET_BYTES", "auto_chunk_size", "check_relation_heads", "relation_kl",
           "relation_kl_qk"]
