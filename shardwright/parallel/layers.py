"""Tensor-parallel layers (Megatron-LM style) and the description of each rank's slice.

A layer's weight is the concatenation of one or more *parts* of a global matrix (a fused QKV
projection has three), and each rank holds a row range of every part: a `RowRange`. The same
ranges drive both the forward pass and checkpoint loading, so a rank never reads more of a
checkpoint tensor than it keeps.

    ColumnParallelLinear  y_local = x W_local^T         (output features split; input replicated)
    RowParallelLinear     y = all_reduce(x_local W_local^T) + b   (input features split)
    VocabParallelEmbedding  rows of the (padded) vocabulary per rank, all-reduced lookup

Every product goes through `linear`, which takes the faster of two equivalent BLAS calls on CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from shardwright.parallel.collectives import Group, copy_to_group, reduce_from_group

# CPU fp32 inference on a few rows (a decode batch, a short prefill): MKL's GEMM of x [M, K] against
# the transposed weight [N, K] runs far below its speed for these shapes, while the same product
# taken as weight @ x^T (the big matrix as BLAS's left operand, no transpose) runs near it.
# Measured on the CI machine (2 threads, the 12 layers of llama-110m, weights cold in cache):
# M=2: 35 -> 15 ms, M=8: 47 -> 27 ms, M=32: 69 -> 45 ms, M=128: 176 -> 135 ms; at M=512 the two
# are even, and past it the plain product wins. One row is a matrix-vector product either way.
WEIGHT_LEFT_MAX_ROWS = 256
# The product comes out as [out_features, rows]; it is computed and transposed into place in blocks
# of this many output features, so each block's transpose happens while it is in cache (LM head
# 32000 x 768 at 32 rows: 19.3 ms in one piece with its transpose, 16.3-16.8 ms in 1024-2048 blocks).
WEIGHT_LEFT_CHUNK = 2048


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); on CPU fp32 inference with 2-256 rows computed as
    (weight @ x^T)^T. Each output is the same dot product over the input features either way (BLAS
    may block that sum differently, as it does between any two shapes). A `weight` that is not a
    tensor (a quantized weight, shardwright.models.quant) computes the product itself."""
    if not isinstance(weight, torch.Tensor):
        return weight.linear(x, bias)
    if not _weight_left(x, weight):
        return F.linear(x, weight, bias)
    rows, out_features = x.numel() // x.shape[-1], weight.shape[0]
    xt = x.reshape(rows, x.shape[-1]).t()
    y = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    for start in range(0, out_features, WEIGHT_LEFT_CHUNK):  # each block's transpose stays in cache
        stop = min(start + WEIGHT_LEFT_CHUNK, out_features)
        y[:, start:stop] = torch.mm(weight[start:stop], xt).t()
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], out_features)


def _weight_left(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if x.device.type != "cpu" or torch.is_grad_enabled() or x.shape[-1] == 0:
        return False
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return False
    return 2 <= x.numel() // x.shape[-1] <= WEIGHT_LEFT_MAX_ROWS


@dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of a global part with `size` rows; rows past `size` are padding."""

    size: int
    start: int
    stop: int

    @property
    def length(self) -> int:
        return self.stop - self.start

    @property
    def valid_stop(self) -> int:
        """End of the rows that exist in the checkpoint (the rest are zero padding)."""
        return min(self.stop, self.size)

    @classmethod
    def even(cls, size: int, rank: int, world: int) -> RowRange:
        """The `rank`-th of `world` equal slices; `size` must be divisible by `world`."""
        if size % world:
            raise ValueError(f"cannot split {size} rows evenly over {world} ranks")
        per = size // world
        return cls(size, rank * per, (rank + 1) * per)

    @classmethod
    def padded(cls, size: int, rank: int, world: int) -> RowRange:
        """Equal slices of `size` rounded up to a multiple of `world` (used for vocabularies)."""
        per = -(-size // world)
        return cls(size, rank * per, (rank + 1) * per)

    @classmethod
    def heads(cls, num_heads: int, head_dim: int, rank: int, world: int) -> RowRange:
        """Rows of this rank's heads; heads are replicated when `world` > `num_heads`.

        With num_heads < world (GQA with fewer kv heads than TP ranks), each head is held by
        world // num_heads consecutive ranks.
        """
        if num_heads % world == 0:
            per = num_heads // world
            return cls(num_heads * head_dim, rank * per * head_dim, (rank + 1) * per * head_dim)
        if world % num_heads:
            raise ValueError(f"{num_heads} heads cannot be split or replicated over {world} ranks")
        head = rank // (world // num_heads)
        return cls(num_heads * head_dim, head * head_dim, (head + 1) * head_dim)


class _SumGradOverReplicas(torch.autograd.Function):
    """Identity forward; backward sums the gradient over ranks holding replicas of this tensor."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return w.view_as(w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad, None


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with the output features split across the TP group.

    weight: [sum(r.length for r in parts), in_features]. The input is replicated on every TP rank;
    its gradient is all-reduced over `group` (Megatron's f operator). Output stays split.
    `replica_group`/`replicated_rows` mark rows held identically by several ranks (replicated kv
    heads): their weight gradient is summed over `replica_group` so it equals the unsharded one.
    """

    def __init__(
        self,
        in_features: int,
        parts: list[RowRange],
        group: Group,
        *,
        bias: bool,
        replicated_rows: tuple[int, int] | None = None,
        replica_group: Group = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.parts = list(parts)
        self.group = group
        self.replicated_rows = replicated_rows if replica_group is not None else None
        self.replica_group = replica_group
        out = sum(p.length for p in self.parts)
        self.weight = nn.Parameter(torch.empty(out, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out, device=device, dtype=dtype)) if bias else None

    def _with_replica_grads(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """`t` whose replicated rows have their gradient summed over the replica group."""
        if t is None or self.replicated_rows is None or not torch.is_grad_enabled():
            return t
        lo, hi = self.replicated_rows
        shared = _SumGradOverReplicas.apply(t[lo:hi], self.replica_group)
        return torch.cat([t[:lo], shared, t[hi:]], dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_group(x, self.group)
        return linear(x, self._with_replica_grads(self.weight), self._with_replica_grads(self.bias))


class RowParallelLinear(nn.Module):
    """y = sum over ranks(x_local W_local^T) + b: input features split, output replicated.

    weight: [out_features, in_range.length]; the bias is added once, after the all-reduce
    (Megatron's g operator).
    """

    def __init__(
        self,
        in_range: RowRange,
        out_features: int,
        group: Group,
        *,
        bias: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_range = in_range
        self.out_features = out_features
        self.group = group
        self.weight = nn.Parameter(
            torch.empty(out_features, in_range.length, device=device, dtype=dtype)
        )
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = reduce_from_group(linear(x, self.weight), self.group)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (token ids) are split across the TP group.

    Each rank looks up the ids in its range [start, stop), zeroes the rest, and the partial
    embeddings are all-reduced. The vocabulary is padded to a multiple of the group size.
    """

    def __init__(
        self,
        rows: RowRange,
        dim: int,
        group: Group,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.rows = rows
        self.group = group
        self.weight = nn.Parameter(torch.empty(rows.length, dim, device=device, dtype=dtype))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group is None:
            return F.embedding(ids, self.weight)
        outside = (ids < self.rows.start) | (ids >= self.rows.stop)
        local = (ids - self.rows.start).masked_fill(outside, 0)
        emb = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_group(emb, self.group)
