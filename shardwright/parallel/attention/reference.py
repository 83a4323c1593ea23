"""Single-process attention over packed variable-length sequences: the reference for CP attention.

Memory-sane like flash-attention: keys are visited in tiles with an online softmax, the backward
pass recomputes each tile from the saved log-sum-exp, and no score matrix larger than
block_size x block_size per head is ever materialised (`blocks.py`).

Layout: q [Tq, H, D]; k, v [Tk, Hkv, D] with Hkv dividing H (GQA); sequences packed back to back
and described by int cu_seqlens [B+1] (flash-attn's varlen API). Returns out [Tq, H, D] in q's
dtype and lse [H, Tq] (natural log; float32 for 16-bit inputs, else q's dtype). Both are
differentiable (the lse gradient enters as dS += P * dlse).

Causal masks are aligned bottom-right when a sequence has fewer queries than keys (flash-attn
>= 2.1): query i of a sequence with Lq queries and Lk keys sits at position Lk - Lq + i, as when
new tokens are appended to a KV cache.
"""

from __future__ import annotations

import math

import torch

from shardwright.parallel.attention.blocks import backward_pieces, forward_pieces
from shardwright.parallel.attention.plan import Piece, seqlen_bounds

DEFAULT_BLOCK_SIZE = 256
# Ring attention's forward K/V message size (ring.py): a rank holds two chunks of another rank's
# K/V, 1 MiB each at 8 kv heads of dim 64 in bf16, instead of whole shards.
DEFAULT_KV_CHUNK_TOKENS = 512


def reference_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor | None = None,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale [+ causal mask]) v per packed sequence: (out [Tq, H, D], lse [H, Tq]).

    `cu_seqlens_k` defaults to `cu_seqlens_q` (self-attention); `softmax_scale` to 1/sqrt(D).
    """
    check_qkv(q, k, v)
    bounds_q = seqlen_bounds(cu_seqlens_q)
    bounds_k = bounds_q if cu_seqlens_k is None else seqlen_bounds(cu_seqlens_k)
    _check_bounds(bounds_q, bounds_k, q.shape[0], k.shape[0])
    q_pieces, k_pieces = [], []
    for seq in range(len(bounds_q) - 1):
        len_q, len_k = bounds_q[seq + 1] - bounds_q[seq], bounds_k[seq + 1] - bounds_k[seq]
        q_pieces.append(Piece(seq, bounds_q[seq], len_q, len_k - len_q))
        k_pieces.append(Piece(seq, bounds_k[seq], len_k, 0))
    scale = default_scale(q, softmax_scale)
    return PiecewiseAttention.apply(
        q, k, v, tuple(q_pieces), tuple(k_pieces), causal, scale, block_size
    )


class PiecewiseAttention(torch.autograd.Function):
    """Autograd wrapper of the tiled kernels for one process (no communication)."""

    @staticmethod
    def forward(ctx, q, k, v, q_pieces, k_pieces, causal, scale, block_size):
        out, lse = forward_pieces(
            q, k, v, q_pieces, k_pieces, causal=causal, scale=scale, block_size=block_size
        )
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (q_pieces, k_pieces, causal, scale, block_size)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        q_pieces, k_pieces, causal, scale, block_size = ctx.args
        delta = softmax_delta(out, dout, dlse, lse.dtype)
        dq, dk, dv = backward_pieces(
            q, k, v, dout, lse, delta, q_pieces, k_pieces,
            causal=causal, scale=scale, block_size=block_size,
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def softmax_delta(
    out: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """delta [H, T] = rowsum(dout * out) - dlse: the softmax backward's per-row correction."""
    delta = (dout.to(dtype) * out.to(dtype)).sum(dim=-1).transpose(0, 1)
    return delta if dlse is None else delta - dlse.to(dtype)


def default_scale(q: torch.Tensor, softmax_scale: float | None) -> float:
    """`softmax_scale`, or 1 / sqrt(head_dim) when None."""
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q [Tq, H, D], k and v [Tk, Hkv, D] with Hkv dividing H."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"want q [Tq, H, D] and k, v [Tk, Hkv, D] of equal shape, got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"head_dim of q ({q.shape[2]}) and k ({k.shape[2]}) must match and num_kv_heads="
            f"{k.shape[1]} must divide num_heads={q.shape[1]}"
        )
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(
            f"q, k, v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
            f"{q.device}/{k.device}/{v.device}"
        )


def _check_bounds(bounds_q: list[int], bounds_k: list[int], tokens_q: int, tokens_k: int) -> None:
    if len(bounds_q) != len(bounds_k):
        raise ValueError(
            f"cu_seqlens_q has {len(bounds_q) - 1} sequences but cu_seqlens_k has "
            f"{len(bounds_k) - 1}"
        )
    if bounds_q[-1] != tokens_q or bounds_k[-1] != tokens_k:
        raise ValueError(
            f"cu_seqlens end at {bounds_q[-1]} (q) and {bounds_k[-1]} (k) but q has {tokens_q} and "
            f"k has {tokens_k} tokens"
        )
