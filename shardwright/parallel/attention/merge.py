"""The exact (output, log-sum-exp) merge of partial attention results.

Attention over a key set K that is split into disjoint parts K_1 .. K_S can be computed part by
part: each part gives a partial output O_s = softmax(S_s) V_s and its log-sum-exp
lse_s = log sum_j exp(S_s[:, j]). The full result is

    lse = log sum_s exp(lse_s)        O = sum_s exp(lse_s - lse) O_s

(the rescaling step of flash-attention's online softmax, used across devices by ring attention and
by flash-decoding / LeanAttention). This module holds the one implementation of that step,
`merge_attention_`, which merges one partial into a running (out, lse) accumulator in place: ring
attention merges each query tile of each step into its running output with it (so no step builds a
second full-size output), and `merge_attention`, used by split-KV decode for all ranks' partials,
folds its S splits with it.

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
        (out [T, H, D], lse [H, T]), new tensors. A split whose lse is -inf for a row (it saw no
        key) does not contribute to that row, whatever its output holds: merging with an empty
        split is the identity. A row with lse -inf in every split gets out 0 and lse -inf, never
        NaN. The order of the splits does not matter (up to rounding).

    The splits are folded one by one into an empty accumulator with `merge_attention_`, the one
    implementation of the rescaling step (nothing [S, T, H, D]-sized is built).
    """
    out_list = list(outs.unbind(0)) if isinstance(outs, torch.Tensor) else list(outs)
    lse_list = list(lses.unbind(0)) if isinstance(lses, torch.Tensor) else list(lses)
    _check_shapes(out_list, lse_list)
    first = out_list[0]
    out = torch.zeros(first.shape, dtype=first.dtype, device=first.device)
    lse = torch.full(lse_list[0].shape, float("-inf"), dtype=lse_list[0].dtype, device=first.device)
    for part_out, part_lse in zip(out_list, lse_list):
        merge_attention_(out, lse, part_out, part_lse)
    return out, lse


def merge_attention_(
    out: torch.Tensor,
    lse: torch.Tensor,
    part_out: torch.Tensor,
    part_lse: torch.Tensor,
    *,
    part_finite: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one partial result into a running accumulator, in place: the online-softmax step.

    out [T, H, D] and lse [H, T] hold the result over the keys seen so far (views such as
    `out[rows]`, `lse[:, rows]` are fine: ring attention merges tile by tile); part_out, part_lse
    are the partial result over a disjoint key set. Afterwards (out, lse) is the result over both
    key sets; returns them. Temporaries are [H, T]-sized (plus a [T, H, D]-sized product when
    the part has rows it does not reach), so a running merge never holds more than the
    accumulator and the part.

        top = max(lse, lse_p)    w = exp(lse - top), w_p = exp(lse_p - top)
        lse <- top + log(w + w_p)    out <- out * w / (w + w_p) + out_p * w_p / (w + w_p)

    A side whose weight is exactly 0 (lse -inf) contributes exactly 0, even if its output holds
    NaN; a row empty on both sides stays (0, -inf). `part_finite=True` is the caller's promise
    that part_out holds no NaN or inf (the tiled kernels give 0 for a row without keys), which
    lets the part be added without a [T, H, D] temporary.
    """
    _check_pair(out, lse, part_out, part_lse)
    top = torch.maximum(lse, part_lse)
    top = top.masked_fill_(top == float("-inf"), 0.0)
    weight = torch.exp(lse - top)  # exactly 0 where lse is -inf
    part_weight = torch.exp(part_lse - top)
    total = weight + part_weight
    seen = total > 0
    total = total.masked_fill_(~seen, 1.0)
    lse.copy_(torch.where(seen, top + torch.log(total), float("-inf")))
    scale = (weight / total).transpose(0, 1).unsqueeze(-1)  # [T, H, 1]
    part_scale = (part_weight / total).transpose(0, 1).unsqueeze(-1)
    out.mul_(scale).masked_fill_(scale == 0, 0.0)
    if part_finite or bool((part_scale > 0).all()):
        out.addcmul_(part_out, part_scale)  # no [T, H, D] temporary
    else:  # rows the part does not reach: keep a NaN or inf there from entering as 0 * NaN
        zero = torch.zeros((), dtype=part_out.dtype, device=part_out.device)
        out.add_(torch.where(part_scale > 0, part_out * part_scale, zero))
    return out, lse


def _check_shapes(outs: list[torch.Tensor], lses: list[torch.Tensor]) -> None:
    if not outs or len(outs) != len(lses) or outs[0].dim() != 3 or lses[0].dim() != 2:
        raise ValueError(
            f"merge_attention wants outs [S, T, H, D] and lses [S, H, T] (or S tensors each), "
            f"S >= 1, got {len(outs)} outs of shape "
            f"{tuple(outs[0].shape) if outs else None} and {len(lses)} lses of shape "
            f"{tuple(lses[0].shape) if lses else None}"
        )
    t, h, _ = outs[0].shape
    for out, lse in zip(outs, lses):
        if out.shape != outs[0].shape or tuple(lse.shape) != (h, t):
            raise ValueError(
                f"lses must be [S, H, T] = {(len(outs), h, t)} to match outs "
                f"{(len(outs), *outs[0].shape)}, got an out {tuple(out.shape)} and an lse "
                f"{tuple(lse.shape)}"
            )


def _check_pair(out, lse, part_out, part_lse) -> None:
    t, h = out.shape[0], out.shape[1]
    if out.dim() != 3 or part_out.shape != out.shape or lse.shape != part_lse.shape or (
        tuple(lse.shape) != (h, t)
    ):
        raise ValueError(
            f"merge_attention_ wants out, part_out [T, H, D] and lse, part_lse [H, T] of matching "
            f"shapes, got {tuple(out.shape)}, {tuple(part_out.shape)}, {tuple(lse.shape)}, "
            f"{tuple(part_lse.shape)}"
        )
