"""Split-KV decode (flash-decoding, LeanAttention) over a KV cache sharded across CP ranks.

Each sequence's KV cache is cut into contiguous runs of positions, one per CP rank, of any sizes
(empty allowed). Every rank holds the same new query tokens, computes the partial (out, lse) of
those queries over its own run of the cache, and one all-gather of the partials followed by
`merge_attention` (the merge ring attention uses) gives every rank the exact full result.

Communication per call: one all-gather of a [Tq, H, D+1] tensor (out with lse as an extra
channel) in the accumulation dtype (float32 for 16-bit inputs, else the input dtype). Each rank
sends Tq * H * (D+1) * itemsize bytes and receives (P-1) times that (`splitkv_comm_bytes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from shardwright.parallel.attention.blocks import forward_pieces
from shardwright.parallel.attention.counters import accumulation_dtype
from shardwright.parallel.attention.merge import merge_attention
from shardwright.parallel.attention.plan import Piece, seqlen_bounds
from shardwright.parallel.attention.reference import DEFAULT_BLOCK_SIZE, check_qkv, default_scale

Group = dist.ProcessGroup | None


def splitkv_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    cu_seqlens_q: torch.Tensor | Sequence[int],
    cu_seqlens_k: torch.Tensor | Sequence[int],
    kv_positions: Sequence[int],
    q_positions: Sequence[int] | None,
    group: Group,
    softmax_scale: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of the new tokens over the whole sharded cache: (out [Tq, H, D], lse [H, Tq]).

    q [Tq, H, D]: the new query tokens, packed by `cu_seqlens_q`, identical on every rank.
    k, v [Tk_r, Hkv, D]: this rank's cache shard, packed by `cu_seqlens_k` (local lengths, one
    per sequence, possibly 0). kv_positions[b]: position in sequence b of this rank's first cached
    token. q_positions[b]: position of sequence b's first new token; queries see cached keys at
    positions <= their own (causal). None: every query sees every cached key.
    Collective over `group` (None: one rank). Forward only (decode), out in q's dtype.
    """
    check_qkv(q, k, v)
    bounds_q, bounds_k = seqlen_bounds(cu_seqlens_q), seqlen_bounds(cu_seqlens_k)
    q_pieces, k_pieces = _pieces(
        bounds_q, bounds_k, kv_positions, q_positions, q.shape[0], k.shape[0]
    )
    out, lse = forward_pieces(
        q, k, v, q_pieces, k_pieces, causal=q_positions is not None,
        scale=default_scale(q, softmax_scale), block_size=block_size,
    )
    out, lse = gather_and_merge(out, lse, group)
    return out.to(q.dtype), lse


def _pieces(bounds_q, bounds_k, kv_positions, q_positions, tokens_q, tokens_k):
    """One query piece and one key piece per sequence (positions as documented above)."""
    num_seqs = len(bounds_q) - 1
    if len(bounds_k) - 1 != num_seqs or len(kv_positions) != num_seqs or (
        q_positions is not None and len(q_positions) != num_seqs
    ):
        raise ValueError(
            f"cu_seqlens_q has {num_seqs} sequences; cu_seqlens_k ({len(bounds_k) - 1}), "
            f"kv_positions ({len(kv_positions)}) and q_positions "
            f"({None if q_positions is None else len(q_positions)}) must describe the same "
            "sequences"
        )
    if bounds_q[-1] != tokens_q or bounds_k[-1] != tokens_k:
        raise ValueError(
            f"cu_seqlens end at {bounds_q[-1]} (q) and {bounds_k[-1]} (k) but q has {tokens_q} and "
            f"the cache shard {tokens_k} tokens"
        )
    q_pos = q_positions if q_positions is not None else [0] * num_seqs
    q_pieces = [_piece(bounds_q, b, q_pos[b]) for b in range(num_seqs)]
    k_pieces = [_piece(bounds_k, b, kv_positions[b]) for b in range(num_seqs)]
    return q_pieces, k_pieces


def _piece(bounds: list[int], seq: int, pos: int) -> Piece:
    return Piece(seq, bounds[seq], bounds[seq + 1] - bounds[seq], int(pos))


def gather_and_merge(
    out: torch.Tensor, lse: torch.Tensor, group: Group
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's partial (out [T, H, D], lse [H, T]) over its own keys -> the exact full
    result on every rank: one all-gather, then `merge_attention` (the identity for one rank)."""
    if group is None or dist.get_world_size(group) == 1:
        return out, lse
    return merge_attention(*_gather_partials(out, lse, group))


def _gather_partials(
    out: torch.Tensor, lse: torch.Tensor, group: dist.ProcessGroup
) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather (out [Tq, H, D], lse [H, Tq]) from every rank: ([P, Tq, H, D], [P, H, Tq])."""
    world = dist.get_world_size(group)
    packed = torch.cat([out, lse.transpose(0, 1).unsqueeze(-1)], dim=-1).contiguous()
    gathered = packed.new_empty(world * packed.numel())
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(gathered, packed.reshape(-1), group=group)
    gathered = gathered.reshape(world, *packed.shape)
    return gathered[..., :-1], gathered[..., -1].transpose(1, 2)


def splitkv_comm_bytes(
    num_q_tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype, world: int
) -> dict[str, int]:
    """Bytes one rank sends and receives in one `splitkv_attention` call (see the module doc)."""
    itemsize = torch.empty((), dtype=accumulation_dtype(dtype)).element_size()
    per_rank = num_q_tokens * num_heads * (head_dim + 1) * itemsize if world > 1 else 0
    return {
        "all_gathers": int(world > 1),
        "bytes_sent": per_rank,
        "bytes_received": (world - 1) * per_rank,
    }
