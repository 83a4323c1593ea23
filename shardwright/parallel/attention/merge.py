"""The exact (output, log-sum-exp) merge of partial attention results.

Attention over a key set K that is split into disjoint parts K_1 .. K_S can be computed part by
part: each part gives a partial output O_s = softmax(S_s) V_s and its log-sum-exp
lse_s = log sum_j exp(S_s[:, j]). The full result is

    lse = log sum_s exp(lse_s)        O = sum_s exp(lse_s - lse) O_s

(the rescaling step of flash-attention's online softmax, used across devices by ring attention and
by flash-decoding / LeanAttention). This module holds the one implementation of that step; ring
attention merges step by step and split-KV decode merges all ranks' partials at once.

Layout, shared by every function in `shardwright.parallel.attention`:
    out [T, H, D]  (tokens, query heads, head dim)     lse [H, T]  (heads first, as flash-attn's
    varlen kernels return it). A row that sees no key has out 0 and lse -inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def merge_attention(
    outs: Sequence[torch.Tensor] | torch.Tensor, lses: Sequence[torch.Tensor] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge S partial attention results over disjoint key sets into the exact full result.

    Args:
        outs: S tensors [T, H, D] or one stacked tensor [S, T, H, D].
        lses: S tensors [H, T] or one stacked tensor [S, H, T] (natural log).

    Returns:
        (out [T, H, D], lse [H, T]). A split whose lse is -inf for a row (it saw no key) does
        not contribute to that row, whatever its output holds: merging with an empty split is
        the identity. A row with lse -inf in every split gets out 0 and lse -inf, never NaN.
        The order of the splits does not matter (up to rounding).
    """
    out = outs if isinstance(outs, torch.Tensor) else torch.stack(list(outs))
    lse = lses if isinstance(lses, torch.Tensor) else torch.stack(list(lses))
    _check_shapes(out, lse)
    top = lse.amax(dim=0)
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top)
    weight = torch.exp(lse - top)  # [S, H, T]; exactly 0 where lse is -inf
    total = weight.sum(dim=0)
    seen = total > 0
    merged_lse = torch.where(seen, top + torch.log(torch.where(seen, total, 1.0)), float("-inf"))
    scale = (weight / torch.where(seen, total, 1.0)).transpose(-1, -2).unsqueeze(-1)
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    contribution = torch.where(scale > 0, out * scale, zero)
    return contribution.sum(dim=0), merged_lse


def _check_shapes(out: torch.Tensor, lse: torch.Tensor) -> None:
    if out.dim() != 4 or lse.dim() != 3:
        raise ValueError(
            f"merge_attention wants outs [S, T, H, D] and lses [S, H, T], got shapes "
            f"{tuple(out.shape)} and {tuple(lse.shape)}"
        )
    s, t, h, _ = out.shape
    if tuple(lse.shape) != (s, h, t):
        raise ValueError(
            f"lses must be [S, H, T] = {(s, h, t)} to match outs {tuple(out.shape)}, "
            f"got {tuple(lse.shape)}"
        )
