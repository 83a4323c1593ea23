"""Ring attention across a context-parallel group (Liu et al., "Ring Attention with Blockwise
Transformers"; zigzag split as in zhuzilin's ring-flash-attention).

Every rank holds its shard of every packed sequence (see `plan.py`: contiguous or zigzag) for q,
k and v. Forward: the K/V shards travel around the ring; at hop s rank r holds the shard of rank
r - s, sends it on to r + 1 (batch_isend_irecv), computes its queries' attention over it, and
merges each query tile's partial (out, lse) into its running result in place with
`merge_attention_`. P-1 exchanges (hops) in all. Each shard travels in C chunks of at most
`kv_chunk_tokens` tokens (C the same for every shard: ceil(largest shard / kv_chunk_tokens)), one
message per chunk and hop, chunk-major: a rank attends over its own shard whole while chunk 0 of
its neighbour's arrives, then takes chunk 0 of every other shard around the ring, then chunk 1,
..., always receiving the next chunk while computing on the one in hand. A rank therefore holds
two K/V chunks, never a whole shard of another rank. Backward: the K/V shards travel the same way, and the
dK/dV accumulated for each shard travels one step behind it, each rank adding its contribution,
with one last hop back to the owner: P-1 KV exchanges and P dKV exchanges (`ring_comm_formula`
gives the bytes). No collective other than these point-to-point exchanges is issued.

Shapes per rank: q [T_r, H, D], k, v [T_r, Hkv, D], T_r = plan.ring_tokens(r); returns out
[T_r, H, D] in q's dtype and lse [H, T_r] (float32 for 16-bit inputs). Works on any device: buffers
are allocated on the inputs' device, so gloo/CPU and NCCL/CUDA both work.

Memory per rank beyond the inputs, forward: the running out [T_r, H, D] and lse (the result), two
received K/V chunks (the one in hand and the next, arriving) and the tile workspace of
`blocks.py`; K and V travel as two tensors in one message, so nothing is stacked or copied, and
no step builds a second full-size partial output. (kv_chunk_tokens=None sends whole shards: one
message per hop, two received shards at P > 2.) Backward: dq, the dK/dV of the block in hand and
the one in flight, the received K/V, one tile.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardwright.parallel.attention.blocks import ForwardWorkspace, backward_pieces, forward_pieces
from shardwright.parallel.attention.counters import CommStats, accumulation_dtype
from shardwright.parallel.attention.plan import Piece, ShardPlan
from shardwright.parallel.attention.reference import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_KV_CHUNK_TOKENS,
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
    kv_chunk_tokens: int | None = DEFAULT_KV_CHUNK_TOKENS,
    stats: CommStats | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's (out [T_r, H, D], lse [H, T_r]) of attention over the whole packed batch.

    `plan` must be a pure ring plan (ulysses_size 1) for `group`'s size; `group` None means one
    rank. Collective over `group`: every member calls it with the same plan (and the same
    `kv_chunk_tokens`: the forward's K/V message size, see the module docstring; None sends whole
    shards). Differentiable in q, k, v (and through lse).
    """
    if plan.ulysses_size != 1:
        raise ValueError(
            f"ring_attention needs a plan with ulysses_size=1, got {plan.ulysses_size}; "
            "use ulysses_attention for Ulysses and hybrid plans"
        )
    return ring_attention_shard(
        q, k, v, plan, group, causal, softmax_scale, block_size, stats, kv_chunk_tokens
    )


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
    kv_chunk_tokens: int | None = DEFAULT_KV_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`ring_attention` over the ring shards of any plan (Ulysses calls it on gathered heads)."""
    check_qkv(q, k, v)
    ring = RingComm(group)
    _check_shard(q, k, plan, ring)
    scale = default_scale(q, softmax_scale)
    chunks = kv_chunks([plan.ring_tokens(j) for j in range(plan.ring_size)], kv_chunk_tokens)
    return _RingAttention.apply(q, k, v, plan, ring, causal, scale, block_size, stats, chunks)


def kv_chunks(shard_tokens: list[int], kv_chunk_tokens: int | None) -> list[list[tuple[int, int]]]:
    """Row ranges [lo, hi) of the C chunks of every shard: C = ceil(max tokens / kv_chunk_tokens)
    (1 for None), chunk c of a shard of T tokens = [c*T // C, (c+1)*T // C) (possibly empty)."""
    if kv_chunk_tokens is not None and kv_chunk_tokens < 1:
        raise ValueError(f"kv_chunk_tokens={kv_chunk_tokens} must be >= 1 token, or None for "
                         "whole shards")
    largest = max(shard_tokens, default=0)
    count = 1 if kv_chunk_tokens is None else max(1, -(-largest // kv_chunk_tokens))
    return [[(c * t // count, (c + 1) * t // count) for c in range(count)] for t in shard_tokens]


def chunk_pieces(pieces: tuple[Piece, ...], lo: int, hi: int) -> list[Piece]:
    """The parts of a shard's `pieces` in its rows [lo, hi), with rows counted from lo."""
    out = []
    for p in pieces:
        a, b = max(lo, p.start), min(hi, p.start + p.length)
        if a < b:
            out.append(Piece(p.seq, a - lo, b - a, p.pos + a - p.start))
    return out


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
        return self.post([sends], sends, recv_rows, tag)

    def post(
        self,
        messages: list[tuple[torch.Tensor, ...]],
        like: tuple[torch.Tensor, ...],
        recv_rows: int | None,
        tag: int,
        into: tuple[torch.Tensor, ...] | None = None,
    ) -> _Pending:
        """Send every message of `messages` (tuples of tensors, such as a K and a V chunk) to the
        next rank, in order, and receive one message of `recv_rows` rows shaped like `like` from
        the previous one (None: receive nothing), in one batch_isend_irecv: into the first rows
        of the buffers `into` if given, else into new tensors. Empty tensors are not sent: their
        receiver knows the size is 0.
        """
        ops, sends, recvs = [], [], ()
        for message in messages:
            message = tuple(t.contiguous() for t in message)
            sends.append(message)
            ops += [dist.P2POp(dist.isend, t, self.next, self.group, tag + i)
                    for i, t in enumerate(message) if t.numel()]
        if recv_rows is not None:
            recvs = tuple(t.new_empty((recv_rows, *t.shape[1:])) if into is None else
                          into_t[:recv_rows] for t, into_t in zip(like, into or like))
            ops += [dist.P2POp(dist.irecv, t, self.prev, self.group, tag + i)
                    for i, t in enumerate(recvs) if t.numel()]
        return _Pending(dist.batch_isend_irecv(ops) if ops else [], sends, recvs)


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
    """Start one exchange of `kind` ('kv' or 'dkv') of whole shards, recording it in `stats`."""
    if stats is not None:
        stats.add_exchange(phase, kind, sum(t.numel() * t.element_size() for t in sends))
    return ring.exchange(sends, recv_rows, _TAGS[kind])


_TAGS = {"kv": 1, "dkv": 3}  # K/V use tags 1, 2; dK/dV use 3, 4


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, ring, causal, scale, block_size, stats, chunks):
        out, lse = _ring_forward(q, k, v, plan, ring, causal, scale, block_size, stats, chunks)
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
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), *([None] * 7)


def _ring_forward(q, k, v, plan, ring, causal, scale, block_size, stats, chunks):
    """Circulate K/V chunk-major (see the module docstring), merging each chunk's partials.

    Messages, in the same order on every rank: (c, s) for chunk c = 0 .. C-1 and hop
    s = 0 .. P-2 sends chunk c of shard r - s to r + 1 and receives chunk c of shard r - s - 1.
    With P > 2 message (c, s) starts when chunk c of shard r - s is in hand (hop s > 0 forwards
    what just arrived), so each overlaps one compute. With P = 2 and several chunks every message
    is a hop-0 message of the rank's own K/V: all of them are posted at once, and only the
    receives, one chunk ahead of the compute, pace the pair (lock-stepping each chunk would make
    each rank wait for the other's slowest chunk, the causal work per chunk being uneven).
    """
    me, world = ring.rank, ring.size
    q_pieces = plan.ring_pieces[me]
    workspace = ForwardWorkspace(q, k.shape[1], block_size, accumulation_dtype(q.dtype))
    kw = {"causal": causal, "scale": scale, "block_size": block_size, "stats": stats,
          "workspace": workspace}
    count = len(chunks[0])

    def own_chunk(c: int) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = chunks[me][c]
        return k[lo:hi], v[lo:hi]

    def rows(c: int, hop: int) -> int:  # of chunk c of shard r - hop - 1, received at hop
        lo, hi = chunks[(me - hop - 1) % world][c]
        return hi - lo

    def record(c: int, message) -> None:
        if stats is not None:
            nbytes = sum(t.numel() * t.element_size() for t in message)
            stats.add_exchange("forward", "kv", nbytes, new_exchange=c == 0)

    # Two receive buffers, used in turn: a message lands in the one not in hand (whose last
    # send, if it was forwarded, completed with the wait that brought the one in hand).
    buffers, turn = [], [1]
    largest = max((hi - lo for shard in chunks for lo, hi in shard), default=0)

    def recv(messages: list, c: int, hop: int) -> _Pending:
        turn[0] = 1 - turn[0]
        if len(buffers) <= turn[0]:
            buffers.append(tuple(t.new_empty((largest, *t.shape[1:])) for t in (k, v)))
        return ring.post(messages, (k, v), rows(c, hop), _TAGS["kv"], into=buffers[turn[0]])

    def send(c: int, hop: int, kv: tuple[torch.Tensor, torch.Tensor]) -> _Pending:
        record(c, kv)
        return recv([kv], c, hop)

    outgoing = pending = None
    if world == 2 and count > 1:
        for c in range(count):
            record(c, own_chunk(c))
        outgoing = ring.post([own_chunk(c) for c in range(count)], (k, v), None, _TAGS["kv"])
        pending = recv([], 0, 0)
    elif world > 1:
        pending = send(0, 0, own_chunk(0))
    running = forward_pieces(q, k, v, q_pieces, plan.ring_pieces[me], **kw)
    for c in range(count if world > 1 else 0):
        for hop in range(1, world):
            kv = pending.wait()  # chunk c of shard r - hop
            if hop < world - 1:
                pending = send(c, hop, kv)
            elif c + 1 == count:
                pending = None
            elif outgoing is not None:
                pending = recv([], c + 1, 0)
            else:
                pending = send(c + 1, 0, own_chunk(c + 1))
            src = (me - hop) % world
            pieces = chunk_pieces(plan.ring_pieces[src], *chunks[src][c])
            running = forward_pieces(q, kv[0], kv[1], q_pieces, pieces, into=running, **kw)
    if outgoing is not None:
        outgoing.wait()
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

