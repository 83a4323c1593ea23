"""Ring attention across a context-parallel group (Liu et al., "Ring Attention with Blockwise
Transformers"; zigzag split as in zhuzilin's ring-flash-attention).

Every rank holds its shard of every packed sequence (see `plan.py`: contiguous or zigzag) for q,
k and v. Forward: the K/V shards travel around the ring; at step s rank r holds the shard of rank
r - s, starts sending it on to r + 1 (batch_isend_irecv), computes its queries' attention over it
meanwhile, and merges each query tile's partial (out, lse) into its running result in place with
`merge_attention_`. P-1 exchanges in all. Backward: the K/V shards travel the same way, and the
dK/dV accumulated for each shard travels one step behind it, each rank adding its contribution,
with one last hop back to the owner: P-1 KV exchanges and P dKV exchanges (`ring_comm_formula`
gives the bytes). No collective other than these point-to-point exchanges is issued.

Shapes per rank: q [T_r, H, D], k, v [T_r, Hkv, D], T_r = plan.ring_tokens(r); returns out
[T_r, H, D] in q's dtype and lse [H, T_r] (float32 for 16-bit inputs). Works on any device: buffers
are allocated on the inputs' device, so gloo/CPU and NCCL/CUDA both work.

Memory per rank beyond the inputs, forward: the running out [T_r, H, D] and lse (the result), one
received K/V block at a time (two at P > 2 while the next one arrives) and one tile of
temporaries; K and V travel as two tensors in one exchange, so nothing is stacked or copied, and
no step builds a second full-size partial output. Backward: dq, the dK/dV of the block in hand and
the one in flight, the received K/V, one tile.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardwright.parallel.attention.blocks import backward_pieces, forward_pieces
from shardwright.parallel.attention.counters import CommStats
from shardwright.parallel.attention.plan import ShardPlan
from shardwright.parallel.attention.reference import (
    DEFAULT_BLOCK_SIZE,
    check_qkv,
    default_scale,
    softmax_delta,
)

Group = dist.ProcessGroup | None


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: ShardPlan,
    group: Group,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    stats: CommStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (out [T_r, H, D], lse [H, T_r]) of attention over the whole packed batch.

    `plan` must be a pure ring plan (ulysses_size 1) for `group`'s size; `group` None means one
    rank. Collective over `group`: every member calls it with the same plan. Differentiable in q,
    k, v (and through lse).
    """
    if plan.ulysses_size != 1:
        raise ValueError(
            f"ring_attention needs a plan with ulysses_size=1, got {plan.ulysses_size}; "
            "use ulysses_attention for Ulysses and hybrid plans"
        )
    return ring_attention_shard(q, k, v, plan, group, causal, softmax_scale, block_size, stats)


def ring_attention_shard(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    plan: ShardPlan,
    group: Group,
    causal: bool,
    softmax_scale: float | None,
    block_size: int,
    stats: CommStats | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ring_attention` over the ring shards of any plan (Ulysses calls it on gathered heads)."""
    check_qkv(q, k, v)
    ring = RingComm(group)
    _check_shard(q, k, plan, ring)
    scale = default_scale(q, softmax_scale)
    return _RingAttention.apply(q, k, v, plan, ring, causal, scale, block_size, stats)


def _check_shard(q: torch.Tensor, k: torch.Tensor, plan: ShardPlan, ring: RingComm) -> None:
    if ring.size != plan.ring_size:
        raise ValueError(
            f"plan has ring_size={plan.ring_size} but the ring group has {ring.size} ranks: "
            f"make the plan with make_shard_plan(cu_seqlens, cp={ring.size * plan.ulysses_size})"
        )
    want = plan.ring_tokens(ring.rank)
    if q.shape[0] != want or k.shape[0] != want:
        raise ValueError(
            f"ring rank {ring.rank} should hold {want} tokens of the plan, but q has {q.shape[0]} "
            f"and k {k.shape[0]}: shard the batch with shard_tokens(x, plan, cp_rank)"
        )


class RingComm:
    """The ring over `group`: this rank's place and the global ranks of its neighbours."""

    def __init__(self, group: Group):
        self.group = group
        if group is None:
            self.rank, self.size, self.next, self.prev = 0, 1, 0, 0
            return
        ranks = dist.get_process_group_ranks(group)
        self.rank, self.size = dist.get_rank(group), len(ranks)
        self.next = ranks[(self.rank + 1) % self.size]
        self.prev = ranks[(self.rank - 1) % self.size]

    def exchange(self, sends: tuple[torch.Tensor, ...], recv_rows: int, tag: int) -> _Pending:
        """One exchange: send the tensors `sends` (each [T, Hkv, D]; K and V, or dK and dV) to the
        next rank and receive as many [recv_rows, Hkv, D] from the previous one, all in one
        batch_isend_irecv. Tags `tag`, `tag` + 1, ... keep the tensors, and K/V apart from dK/dV,
        on backends that match by tag (gloo).
        """
        sends = tuple(t.contiguous() for t in sends)
        recvs = tuple(t.new_empty((recv_rows, *t.shape[1:])) for t in sends)
        ops = []
        for i, (send, recv) in enumerate(zip(sends, recvs)):
            ops.append(dist.P2POp(dist.isend, send, self.next, self.group, tag + i))
            ops.append(dist.P2POp(dist.irecv, recv, self.prev, self.group, tag + i))
        return _Pending(dist.batch_isend_irecv(ops), sends, recvs)


class _Pending:
    """An exchange in flight (holding its send buffers); `wait()` returns the received tensors."""

    def __init__(self, works: list, sends: tuple, recvs: tuple):
        self.works, self.sends, self.recvs = works, sends, recvs

    def wait(self) -> tuple[torch.Tensor, ...]:
        for work in self.works:
            work.wait()
        self.sends = None
        return self.recvs


def _start(
    ring: RingComm,
    sends: tuple[torch.Tensor, torch.Tensor],
    recv_rows: int,
    stats: CommStats | None,
    phase: str,
    kind: str,
) -> _Pending:
    """Start one exchange of `kind` ('kv' or 'dkv'), recording it in `stats`."""
    if stats is not None:
        stats.add_exchange(phase, kind, sum(t.numel() * t.element_size() for t in sends))
    return ring.exchange(sends, recv_rows, _TAGS[kind])


_TAGS = {"kv": 1, "dkv": 3}  # K/V use tags 1, 2; dK/dV use 3, 4


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, ring, causal, scale, block_size, stats):
        out, lse = _ring_forward(q, k, v, plan, ring, causal, scale, block_size, stats)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (plan, ring, causal, scale, block_size, stats)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        plan, ring, causal, scale, block_size, stats = ctx.args
        delta = softmax_delta(out, dout, dlse, lse.dtype)
        dq, dk, dv = _ring_backward(
            q, k, v, dout, lse, delta, plan, ring, causal, scale, block_size, stats
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 6)


def _ring_forward(q, k, v, plan, ring, causal, scale, block_size, stats):
    """Circulate K/V (P-1 exchanges, each overlapped with one block's compute); merge partials."""
    me, world = ring.rank, ring.size
    kv = (k, v)
    running = None
    for step in range(world):
        src = (me - step) % world
        pending = None
        if step < world - 1:
            pending = _start(ring, kv, plan.ring_tokens((src - 1) % world), stats, "forward", "kv")
        running = forward_pieces(
            q, kv[0], kv[1], plan.ring_pieces[me], plan.ring_pieces[src],
            causal=causal, scale=scale, block_size=block_size, stats=stats, into=running,
        )
        if pending is not None:
            kv = None  # drop the block just used (unless it is the input) before the next lands
            kv = pending.wait()
    out, lse = running
    if stats is not None:
        stats.forward_calls += 1
    return out, lse


def _ring_backward(q, k, v, dout, lse, delta, plan, ring, causal, scale, block_size, stats):
    """Circulate K/V (P-1 exchanges) with their dK/dV one step behind (P exchanges)."""
    me, world = ring.rank, ring.size
    kv, dq, dkv_pending = (k, v), None, None
    for step in range(world):
        src = (me - step) % world
        next_rows, kv_pending = plan.ring_tokens((src - 1) % world), None
        if step < world - 1:
            kv_pending = _start(ring, kv, next_rows, stats, "backward", "kv")
        dq, dk_s, dv_s = backward_pieces(
            q, kv[0], kv[1], dout, lse, delta, plan.ring_pieces[me], plan.ring_pieces[src],
            causal=causal, scale=scale, block_size=block_size, stats=stats, dq_into=dq,
        )
        if dkv_pending is not None:
            dk_in, dv_in = dkv_pending.wait()
            dk_s += dk_in
            dv_s += dv_in
            del dk_in, dv_in
        dkv = (dk_s, dv_s)
        del dk_s, dv_s
        if world > 1:
            dkv_pending = _start(ring, dkv, next_rows, stats, "backward", "dkv")
            dkv = None  # the pending exchange holds it until sent
        if kv_pending is not None:
            kv = None
            kv = kv_pending.wait()
    if dkv_pending is not None:
        dkv = dkv_pending.wait()  # the last hop brings this rank's own block's gradient home
    if stats is not None:
        stats.backward_calls += 1
    return dq, dkv[0], dkv[1]

