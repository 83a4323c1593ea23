"""Expert parallelism: the all-to-all dispatch and combine of routed tokens (GShard, DeepSpeed-MoE).

The ranks of an EP group hold the same tokens (everything before a mixture-of-experts layer is
replicated over EP). At the layer each rank takes its share of the rows (`split_rows`: rank r of P
gets rows [r*T//P, (r+1)*T//P)), routes them, and sends exactly its routed (token, expert) pairs to
the ranks owning those experts:

    dispatch:  counts first (one all_to_all of the per-expert pair counts), then the payload (one
               all_to_all_single of the pair rows, split by owner), received grouped by source rank
               and, within a source, by expert;
    combine:   the reverse all_to_all_single of the experts' outputs, back in the sender's order;

then weighs and sums its rows' outputs and all-gathers the rows (`gather_rows`) so the layer's
output is replicated again. Ownership is contiguous: rank o owns experts
[o*E/P, (o+1)*E/P) (`expert_range`). No token is dropped: buffers are sized by the exchanged counts.

Gradients: `split_rows`' is the all-gather of the row gradients, `gather_rows`' keeps this rank's
rows (the consumer is replicated, so every rank holds the same full gradient), and each payload
all-to-all's is the reverse all-to-all. With `group=None` (ep = 1) nothing is communicated and the
same code groups the pairs by expert in one process: the reference.

`ExpertCommStats` counts what the all-to-alls carry (pair rows, bytes, seconds), as the ring
attention's `CommStats` does for CP; a layer records into it when one is attached.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

Group = dist.ProcessGroup | None


@dataclass
class ExpertCommStats:
    """Counters one rank adds to (summed over MoE layers and calls).

    `pairs_dispatched`: (token, expert) pairs this rank put into dispatch (its rows * top-k);
    `pairs_sent_remote`: of those, the ones whose expert lives on another rank (the rows that
    travel); `pairs_received`: rows this rank's experts computed; `bytes_sent`: payload bytes sent
    to other ranks by dispatch and combine, forward and backward; `all_to_all_s`: wall seconds in the
    payload and count all-to-alls (CPU clock: on CUDA it measures launch unless synchronised).
    """

    calls: int = 0
    pairs_dispatched: int = 0
    pairs_sent_remote: int = 0
    pairs_received: int = 0
    bytes_sent: int = 0
    all_to_all_s: float = 0.0


def expert_range(num_experts: int, ep_rank: int, ep: int) -> range:
    """The experts ep rank `ep_rank` owns: a contiguous num_experts / ep of them."""
    per = num_experts // ep
    return range(ep_rank * per, (ep_rank + 1) * per)


def row_range(num_rows: int, rank: int, world: int) -> range:
    """Rows of `num_rows` that rank `rank` of `world` routes (the first ranks get no more than one
    fewer than the last)."""
    return range(rank * num_rows // world, (rank + 1) * num_rows // world)


def _world(group: Group) -> tuple[int, int]:
    return (1, 0) if group is None else (dist.get_world_size(group), dist.get_rank(group))


def _all_gather_rows(x: torch.Tensor, total: int, group: Group) -> torch.Tensor:
    """Concatenate every rank's `row_range` share of `total` rows (shares padded to one size)."""
    world, _ = _world(group)
    width = -(-total // world)
    padded = x.new_zeros((width, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[: len(row_range(total, r, world))] for r, p in enumerate(parts)])


class _SplitRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        world, rank = _world(group)
        ctx.group, ctx.total = group, x.shape[0]
        rows = row_range(x.shape[0], rank, world)
        return x[rows.start : rows.stop].clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _all_gather_rows(grad.contiguous(), ctx.total, ctx.group), None


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, total: int, group: Group) -> torch.Tensor:
        ctx.group = group
        return _all_gather_rows(x, total, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        world, rank = _world(ctx.group)
        rows = row_range(grad.shape[0], rank, world)
        return grad[rows.start : rows.stop].contiguous(), None, None


def split_rows(x: torch.Tensor, group: Group) -> torch.Tensor:
    """This rank's `row_range` share of the replicated rows x [T, ...]; backward all-gathers."""
    return x if group is None else _SplitRows.apply(x, group)


def gather_rows(x: torch.Tensor, total: int, group: Group) -> torch.Tensor:
    """Every rank's share (x [rows of this rank, ...]) concatenated to [total, ...] on every rank;
    backward keeps this rank's rows."""
    return x if group is None else _GatherRows.apply(x, total, group)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows: send `send_splits[j]` rows to rank j, receive `recv_splits[j]`."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group, stats):
        ctx.args = (send_splits, recv_splits, group, stats)
        return _exchange(x, send_splits, recv_splits, group, stats)

    @staticmethod
    def backward(ctx, grad):
        send_splits, recv_splits, group, stats = ctx.args
        return _exchange(grad.contiguous(), recv_splits, send_splits, group, stats), None, None, None, None


def _exchange(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Group,
              stats: ExpertCommStats | None) -> torch.Tensor:
    out = x.new_empty((sum(recv_splits), *x.shape[1:]))
    start = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
    if stats is not None:
        _, rank = _world(group)
        row_bytes = x[:1].numel() * x.element_size() if x.shape[0] else 0
        stats.bytes_sent += (sum(send_splits) - send_splits[rank]) * row_bytes
        stats.all_to_all_s += time.perf_counter() - start
    return out


@dataclass(frozen=True)
class Dispatched:
    """What `combine` needs to send the experts' outputs back: the sender's pair order (flat pair
    indices token * k + slot, sorted by expert), the splits of both directions, and for each
    received row the local index of its expert."""

    order: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_experts: torch.Tensor


def dispatch(x: torch.Tensor, chosen: torch.Tensor, num_experts: int, group: Group,
             stats: ExpertCommStats | None = None) -> tuple[torch.Tensor, Dispatched]:
    """Send each routed pair's row of x [n, hidden] (chosen [n, k] global expert ids) to the owner
    of its expert. Returns the received rows [m, hidden] and the `Dispatched` record."""
    world, rank = _world(group)
    flat = chosen.reshape(-1)
    order = torch.argsort(flat, stable=True)
    send_counts = torch.bincount(flat, minlength=num_experts)  # pairs per expert, grouped by owner
    rows = x.index_select(0, order // chosen.shape[1])
    local = num_experts // world
    if group is None:
        recv_counts = send_counts
    else:
        recv_counts = torch.empty_like(send_counts)  # counts first: [source, local expert]
        start = time.perf_counter()
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        if stats is not None:
            stats.all_to_all_s += time.perf_counter() - start
    send_splits = send_counts.view(world, local).sum(1).tolist()
    recv_splits = recv_counts.view(world, local).sum(1).tolist()
    recv_experts = torch.arange(local, device=x.device).repeat(world).repeat_interleave(recv_counts)
    if stats is not None:
        stats.calls += 1
        stats.pairs_dispatched += flat.numel()
        stats.pairs_sent_remote += flat.numel() - send_splits[rank]
        stats.pairs_received += sum(recv_splits)
    if group is not None:
        rows = _AllToAll.apply(rows, send_splits, recv_splits, group, stats)
    return rows, Dispatched(order, send_splits, recv_splits, recv_experts)


def combine(y: torch.Tensor, sent: Dispatched, group: Group, stats: ExpertCommStats | None = None) -> torch.Tensor:
    """The experts' outputs y [m, ...] (rows as `dispatch` received them) back to their senders:
    [pairs, ...] in the order `sent.order` (the i-th row is pair sent.order[i])."""
    if group is None:
        return y
    return _AllToAll.apply(y, sent.recv_splits, sent.send_splits, group, stats)
