"""Ulysses attention (DeepSpeed-Ulysses: all-to-all over heads) and the Ulysses x ring hybrid.

Pure Ulysses: each of the u ranks holds a slice of the tokens with all heads; one all-to-all
gives every rank all tokens for H/u heads, attention runs locally, a second all-to-all returns
the output to the token layout. Needs u | num_heads (ValueError otherwise). When u does not
divide num_kv_heads, K/V heads are first repeated to lcm(num_kv_heads, u) heads (GQA stays exact).

Hybrid (Ulysses inside groups of u ranks, ring across the r = cp / u groups): the all-to-all runs
inside each Ulysses group, and the gathered heads go through `ring_attention_shard` over the
ring group. Group layout over the CP group's ranks g_0 .. g_{cp-1} (in cp-rank order):
    Ulysses group j = {g_{j*u}, ..., g_{j*u+u-1}}  (consecutive ranks: one node)
    ring group i    = {g_i, g_{i+u}, g_{i+2u}, ...}  (one rank per Ulysses group)
so cp rank c has ulysses_rank c % u and ring_rank c // u, matching `make_shard_plan(...,
ulysses_size=u)`. u = cp is pure Ulysses, u = 1 pure ring.

Communication per call (per rank): forward 4 all-to-alls (q, k and v together, out, lse), each
sending (u-1)/u of the tensor; backward the same 4 in reverse; plus the ring's exchanges over the
H/u gathered heads (`ring_comm_formula`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from shardwright.parallel.attention.counters import CommStats
from shardwright.parallel.attention.plan import ShardPlan
from shardwright.parallel.attention.reference import DEFAULT_BLOCK_SIZE, check_qkv, default_scale
from shardwright.parallel.attention.ring import ring_attention_shard
from shardwright.parallel.context import ParallelContext, axis_groups

Group = dist.ProcessGroup | None


@dataclass(frozen=True)
class HybridGroups:
    """This rank's Ulysses group (size u) and ring group (size cp / u); None where size is 1."""

    ulysses_group: Group
    ring_group: Group
    ulysses_size: int
    ring_size: int
    ulysses_rank: int
    ring_rank: int


def hybrid_groups_from_context(ctx: ParallelContext, ulysses_size: int) -> HybridGroups:
    """Hybrid groups for every CP group of `ctx.layout` (collective: every rank calls it)."""
    cp_groups = axis_groups(ctx.layout, "cp")
    return _build_groups(cp_groups, ctx.rank if ctx.cp > 1 else None, ulysses_size)


def make_hybrid_groups(group: Group, ulysses_size: int) -> HybridGroups:
    """Hybrid groups splitting `group` (a CP group; None for one rank). Collective over the world.

    Every rank of the default group must call it, each with its own CP group; the groups of all
    ranks are exchanged (one all_gather_object) so that every rank creates every sub-group in the
    same order, as `dist.new_group` requires.
    """
    if group is None:
        return _build_groups([], None, ulysses_size)
    mine = tuple(dist.get_process_group_ranks(group))
    everyone: list[tuple[int, ...] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return _build_groups(sorted(set(everyone)), dist.get_rank(), ulysses_size)


def _build_groups(cp_groups: Sequence[Sequence[int]], rank: int | None, u: int) -> HybridGroups:
    """Create every Ulysses and ring sub-group of every CP group (same order on all ranks)."""
    cp = len(cp_groups[0]) if cp_groups else 1
    if u < 1 or cp % u:
        raise ValueError(f"ulysses_size={u} must divide cp={cp}; choose one of {_divisors(cp)}")
    ulysses = ring = None
    position = 0
    for ranks in cp_groups:
        for j in range(0, cp, u):  # Ulysses groups: runs of u consecutive cp ranks
            ulysses = _new_group(ranks[j : j + u], rank, ulysses)
        for i in range(u):  # ring groups: one rank from each Ulysses group
            ring = _new_group(ranks[i::u], rank, ring)
        if rank in ranks:
            position = list(ranks).index(rank)
    return HybridGroups(ulysses, ring, u, cp // u, position % u, position // u)


def _new_group(ranks: Sequence[int], rank: int | None, current: Group) -> Group:
    """Create the group over `ranks` (collective); return it if `rank` is in it, else `current`."""
    if len(ranks) == 1:
        return current
    group = dist.new_group(list(ranks))
    return group if rank in ranks else current


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: ShardPlan,
    groups: HybridGroups,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    stats: CommStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (out [T_c, H, D], lse [H, T_c]) of Ulysses (or hybrid) attention.

    q [T_c, H, D], k, v [T_c, Hkv, D] are this CP rank's shard (`shard_tokens(x, plan, cp_rank)`)
    of a plan made with `ulysses_size=groups.ulysses_size`. Collective over the CP group.
    Differentiable in q, k, v (and through lse). `stats` records the ring part.
    """
    check_qkv(q, k, v)
    _check_layout(q, plan, groups)
    sizes, me = plan.ulysses_sizes(groups.ring_rank), groups.ulysses_rank
    group = groups.ulysses_group
    if q.shape[0] != sizes[me] or k.shape[0] != sizes[me]:
        raise ValueError(
            f"cp rank (ring {groups.ring_rank}, ulysses {me}) should hold {sizes[me]} tokens, "
            f"q has {q.shape[0]} and k {k.shape[0]}: shard with shard_tokens(x, plan, cp_rank)"
        )
    k, v = _expand_kv_heads(k, v, groups.ulysses_size)
    dim, scale = q.shape[-1], default_scale(q, softmax_scale)
    q_heads = _Reshard.apply(q, sizes, me, group, True)
    kv_heads = _Reshard.apply(torch.cat([k, v], dim=-1), sizes, me, group, True)
    del k, v  # the head-sharded copies are all the attention needs (autograd keeps what it must)
    out, lse = ring_attention_shard(
        q_heads, kv_heads[..., :dim], kv_heads[..., dim:], plan, groups.ring_group,
        causal, scale, block_size, stats,
    )
    del q_heads, kv_heads  # freed before the output all-to-all unless autograd saved them
    out = _Reshard.apply(out, sizes, me, group, False)
    lse = _Reshard.apply(lse.transpose(0, 1).unsqueeze(-1), sizes, me, group, False)
    return out, lse.squeeze(-1).transpose(0, 1)


def _check_layout(q: torch.Tensor, plan: ShardPlan, groups: HybridGroups) -> None:
    u, heads = groups.ulysses_size, q.shape[1]
    if heads % u:
        raise ValueError(
            f"Ulysses needs ulysses_size={u} to divide num_heads={heads}; choose ulysses_size in "
            f"{[d for d in _divisors(heads) if (plan.cp % d) == 0]} or use ring attention"
        )
    if (plan.ulysses_size, plan.ring_size) != (u, groups.ring_size):
        raise ValueError(
            f"plan has ulysses_size={plan.ulysses_size}, ring_size={plan.ring_size} but the groups "
            f"have {u}, {groups.ring_size}: make the plan with "
            f"make_shard_plan(..., ulysses_size={u})"
        )


def _expand_kv_heads(k: torch.Tensor, v: torch.Tensor, u: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Repeat kv heads to lcm(num_kv_heads, u) so that u ranks can each take a whole number."""
    repeat = math.lcm(k.shape[1], u) // k.shape[1]
    if repeat == 1:
        return k, v
    return k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)


class _Reshard(torch.autograd.Function):
    """All-to-all between token shards [T_me, X, E] and head shards [sum T_j, X/u, E].

    to_heads=True: tokens -> heads (the inverse is its gradient), False: heads -> tokens.
    """

    @staticmethod
    def forward(ctx, x, sizes, me, group, to_heads):
        ctx.args = (sizes, me, group, to_heads)
        return _reshard(x, sizes, me, group, to_heads)

    @staticmethod
    def backward(ctx, grad):
        sizes, me, group, to_heads = ctx.args
        return _reshard(grad, sizes, me, group, not to_heads), None, None, None, None


def _reshard(
    x: torch.Tensor, sizes: list[int], me: int, group: Group, to_heads: bool
) -> torch.Tensor:
    if group is None:
        return x
    u = len(sizes)
    if to_heads:  # send head slice j of my tokens to rank j; receive my head slice of theirs
        tokens, width, rest = x.shape[0], x.shape[1] // u, x.shape[2]
        send = x.reshape(tokens, u, width, rest).transpose(0, 1).contiguous()
        send_splits = [tokens * width * rest] * u
        recv_splits = [n * width * rest for n in sizes]
        return _all_to_all(send, send_splits, recv_splits, group).reshape(sum(sizes), width, rest)
    width, rest = x.shape[1], x.shape[2]
    send_splits = [n * width * rest for n in sizes]
    recv_splits = [sizes[me] * width * rest] * u
    recv = _all_to_all(x.contiguous(), send_splits, recv_splits, group)
    recv = recv.reshape(u, sizes[me], width, rest).transpose(0, 1)
    return recv.reshape(sizes[me], u * width, rest)


def _all_to_all(
    send: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: dist.ProcessGroup
) -> torch.Tensor:
    """Flat all_to_all_single with uneven splits (element counts)."""
    recv = send.new_empty(sum(recv_splits))
    dist.all_to_all_single(recv, send.reshape(-1), recv_splits, send_splits, group=group)
    return recv
