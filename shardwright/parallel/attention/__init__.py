"""Distributed attention: ring (contiguous and zigzag), Ulysses, the hybrid, split-KV decode.

Layout everywhere: packed variable-length sequences described by int cu_seqlens [B+1] (flash-attn's
varlen API); q [T, H, D], k and v [T, Hkv, D] with Hkv dividing H (GQA); out [T, H, D];
lse [H, T] (natural log, float32 for 16-bit inputs). Each module states its algorithm:

    merge.py      merge_attention_, merge_attention: the one exact (out, lse) merge
    reference.py  reference_attention: single-process tiled attention (flash-style fwd/bwd)
    plan.py       make_shard_plan, shard_tokens, unshard_tokens: who holds which tokens
    ring.py       ring_attention: KV circulates point to point, forward and backward
    ulysses.py    ulysses_attention, make_hybrid_groups: all-to-all over heads, Ulysses x ring
    splitkv.py    splitkv_attention: decode over a KV cache sharded across ranks
    counters.py   CommStats, ring_comm_formula, causal_area: communication and work, counted
"""

from shardwright.parallel.attention.counters import CommStats, causal_area, ring_comm_formula
from shardwright.parallel.attention.merge import merge_attention, merge_attention_
from shardwright.parallel.attention.plan import (
    Piece,
    ShardPlan,
    Split,
    make_shard_plan,
    shard_tokens,
    unshard_tokens,
)
from shardwright.parallel.attention.reference import reference_attention
from shardwright.parallel.attention.ring import ring_attention
from shardwright.parallel.attention.splitkv import splitkv_attention, splitkv_comm_bytes
from shardwright.parallel.attention.ulysses import (
    HybridGroups,
    hybrid_groups_from_context,
    make_hybrid_groups,
    ulysses_attention,
)

__all__ = [
    "CommStats",
    "HybridGroups",
    "Piece",
    "ShardPlan",
    "Split",
    "causal_area",
    "hybrid_groups_from_context",
    "make_hybrid_groups",
    "make_shard_plan",
    "merge_attention",
    "merge_attention_",
    "reference_attention",
    "ring_attention",
    "ring_comm_formula",
    "shard_tokens",
    "splitkv_attention",
    "splitkv_comm_bytes",
    "ulysses_attention",
]
