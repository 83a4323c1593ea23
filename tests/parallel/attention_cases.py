"""Rank functions and helpers for the distributed attention tests (module level for `spawn`).

`run_attention_world(world)` starts ONE gloo world of `world` ranks that runs every case (ring,
zigzag, Ulysses, hybrid, split-KV, communication and work counting) and returns each rank's
errors and counts (the tests take the worst rank), so that each launch (several seconds here) is
paid once per world size. Errors are measured against `reference_attention` on the whole packed
batch (in fp64), computed on every rank from the same seeded inputs.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from shardwright.config import ParallelLayout
from shardwright.parallel.attention import (
    CommStats,
    hybrid_groups_from_context,
    make_hybrid_groups,
    make_shard_plan,
    reference_attention,
    ring_attention,
    shard_tokens,
    splitkv_attention,
    ulysses_attention,
)
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.launch import run_ranks

LENGTHS = (13, 3, 22)  # packed, unequal, none divisible by 2*cp for cp in {2, 4}; 3 < 2*cp
HEADS, KV_HEADS, DIM = 4, 2, 8  # GQA; at cp=4 Ulysses must repeat the 2 kv heads to 4
BLOCK = 4  # distributed runs: small tiles, so every case crosses tile edges and partially masked
# tiles; the reference runs with its default (256: one tile per sequence here), so the two never
# share a rounding order by construction.
ATOL32, RTOL32 = 2e-6, 1e-5  # issue 6 acceptance for fp32 with inputs in [0, 1)
COMM_CHUNK = 4  # K/V chunk of the chunked communication count: no chunk of LENGTHS' shards empty
BALANCE_LENGTHS = (16, 16)  # equal lengths divisible by 2P for P in {2, 4}


def cu_seqlens(lengths) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def naive_attention(q, k, v, cu_q, cu_k, causal: bool, scale: float | None = None):
    """Materialised softmax(q k^T) v per sequence, bottom-right causal: (out [T,H,D], lse [H,T])."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    group = q.shape[1] // k.shape[1]
    outs, lses = [], []
    for b in range(len(cu_q) - 1):
        qb = q[cu_q[b] : cu_q[b + 1]]
        kb = k[cu_k[b] : cu_k[b + 1]].repeat_interleave(group, 1)
        vb = v[cu_k[b] : cu_k[b + 1]].repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", qb, kb) * scale
        if causal:
            qi = torch.arange(qb.shape[0]).unsqueeze(1) + kb.shape[0] - qb.shape[0]
            scores = scores.masked_fill(torch.arange(kb.shape[0]).unsqueeze(0) > qi, float("-inf"))
        lse = torch.logsumexp(scores, -1)
        probs = torch.exp(scores - torch.where(lse.isinf(), 0, lse).unsqueeze(-1))
        outs.append(torch.einsum("hqk,khd->qhd", probs, vb))
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses, 1)


def make_inputs(seed: int, lengths, heads: int, kv_heads: int, dtype: torch.dtype):
    """q, k, v and the output/lse cotangents, uniform in [0, 1), same on every rank."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    shapes = [(total, heads, DIM), (total, kv_heads, DIM), (total, kv_heads, DIM)]
    shapes += [(total, heads, DIM), (heads, total)]
    return [torch.rand(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def error(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> float:
    """fp64: max |got - want|. fp32: max |got - want| / (atol + rtol |want|), which must be <= 1."""
    diff = (got.double() - want.double()).abs()
    if dtype == torch.float64:
        return diff.max().item()
    return (diff / (ATOL32 + RTOL32 * want.double().abs())).max().item()


def case_names(world: int) -> list[tuple[str, str, int, bool, torch.dtype]]:
    """(name, split, ulysses_size, causal, dtype) of every equivalence case at this world size."""
    methods = [("ring", "contiguous", 1), ("zigzag", "zigzag", 1), ("ulysses", "contiguous", world)]
    if world == 4:
        methods.append(("hybrid", "zigzag", 2))
    cases = []
    for method, split, u in methods:
        for causal in (False, True):
            for dtype in (torch.float64, torch.float32):
                name = f"{method}-{'causal' if causal else 'full'}-{str(dtype)[6:]}"
                cases.append((name, split, u, causal, dtype))
    return cases


def _run_case(seed, ctx, groups, split, u, causal, dtype, heads=HEADS, kv_heads=KV_HEADS,
              kv_chunk=None):
    """Errors of one distributed method against the reference, for this rank's shard.
    `kv_chunk`: the ring's forward K/V message size in tokens (None: the library default, which
    is larger than these shards, so one message per hop)."""
    q, k, v, gout, glse = make_inputs(seed, LENGTHS, heads, kv_heads, dtype)
    cu = cu_seqlens(LENGTHS)
    # The reference runs in fp64 on the same (fp32-rounded) inputs, so fp32 cases are held to the
    # truth, not to another fp32 rounding order; its default tile (256) is one tile per sequence.
    full = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*full, cu, causal=causal)
    ref_loss = (ref_out * gout.double()).sum() + (ref_lse * glse.double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, full)
    plan = make_shard_plan(cu, ctx.cp, split=split, ulysses_size=u)
    mine = [shard_tokens(t, plan, ctx.cp_rank).requires_grad_() for t in (q, k, v)]
    if kv_chunk is not None:
        out, lse = ring_attention(*mine, plan, ctx.cp_group, causal=causal, block_size=BLOCK,
                                  kv_chunk_tokens=kv_chunk)
    elif u == 1:
        out, lse = ring_attention(*mine, plan, ctx.cp_group, causal=causal, block_size=BLOCK)
    else:
        out, lse = ulysses_attention(*mine, plan, groups[u], causal=causal, block_size=BLOCK)
    loss = (out * shard_tokens(gout, plan, ctx.cp_rank)).sum()
    loss = loss + (lse * shard_tokens(glse, plan, ctx.cp_rank, dim=1)).sum()
    grads = torch.autograd.grad(loss, mine)
    want = [ref_out, ref_lse, *ref_grads]
    want = [shard_tokens(w, plan, ctx.cp_rank, dim=1 if i == 1 else 0) for i, w in enumerate(want)]
    got = [out, lse, *grads]
    errors = {}
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        errors[name] = error(g, w, dtype)
        errors[f"{name}_abs"] = (g.double() - w.double()).abs().max().item()
    return errors


def _comm_case(ctx, kv_chunk=None) -> dict:
    """Zigzag causal ring, fp64, forward and backward with CommStats and patched collectives."""
    q, k, v, gout, _ = make_inputs(99, LENGTHS, HEADS, KV_HEADS, torch.float64)
    plan = make_shard_plan(cu_seqlens(LENGTHS), ctx.cp, split="zigzag")
    mine = [shard_tokens(t, plan, ctx.cp_rank).requires_grad_() for t in (q, k, v)]
    stats = CommStats()
    seen = {"p2p_batches": 0, "p2p_sends": 0, "p2p_bytes": 0, "other_collectives": 0}
    with _patched_collectives(seen):
        out, _ = ring_attention(
            *mine, plan, ctx.cp_group, causal=True, block_size=BLOCK, stats=stats,
            **({} if kv_chunk is None else {"kv_chunk_tokens": kv_chunk}),
        )
        forward = dict(seen)
        torch.autograd.grad((out * shard_tokens(gout, plan, ctx.cp_rank)).sum(), mine)
    return {"stats": vars(stats), "seen_forward": forward, "seen_total": dict(seen)}


class _patched_collectives:
    """Count every torch.distributed call the ring makes (P2P batches and bytes, and the rest)."""

    OTHERS = (
        "all_gather", "all_gather_into_tensor", "all_gather_single", "all_gather_object",
        "all_reduce", "all_to_all", "all_to_all_single", "broadcast", "reduce_scatter",
        "reduce_scatter_tensor", "barrier", "send", "recv", "gather", "scatter", "reduce",
    )

    def __init__(self, seen: dict):
        self.seen, self.saved = seen, {}

    def __enter__(self):
        for name in (n for n in self.OTHERS if hasattr(dist, n)):
            self.saved[name] = getattr(dist, name)
            setattr(dist, name, self._counting(self.saved[name]))
        self.saved["batch_isend_irecv"] = original = dist.batch_isend_irecv

        def batch(ops):
            self.seen["p2p_batches"] += 1
            sends = [op.tensor for op in ops if op.op is dist.isend]
            self.seen["p2p_sends"] += len(sends)
            self.seen["p2p_bytes"] += sum(t.numel() * t.element_size() for t in sends)
            return original(ops)

        dist.batch_isend_irecv = batch
        return self

    def _counting(self, fn):
        def wrapper(*args, **kwargs):
            self.seen["other_collectives"] += 1
            return fn(*args, **kwargs)

        return wrapper

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def _work_case(ctx) -> dict[str, float]:
    """Forward score work of this rank, causal, equal lengths divisible by 2P, both splits."""
    q, k, v, _, _ = make_inputs(7, BALANCE_LENGTHS, HEADS, KV_HEADS, torch.float64)
    work = {}
    for split in ("contiguous", "zigzag"):
        plan = make_shard_plan(cu_seqlens(BALANCE_LENGTHS), ctx.cp, split=split)
        stats = CommStats()
        mine = [shard_tokens(t, plan, ctx.cp_rank) for t in (q, k, v)]
        ring_attention(*mine, plan, ctx.cp_group, causal=True, block_size=BLOCK, stats=stats)
        work[split] = stats.work_forward
    return work


# Split-KV cache cuts per world size: for each cached sequence (37 and 50 tokens), the positions
# where each rank's shard starts; uneven, and at cp=4 rank 1 holds nothing of sequence 0.
SPLITKV_CACHE, SPLITKV_NEW = (37, 50), (1, 3)
SPLITKV_CUTS = {2: ([0, 5, 37], [0, 31, 50]), 4: ([0, 3, 3, 20, 37], [0, 17, 40, 44, 50])}


def _splitkv_case(ctx, causal: bool, dtype: torch.dtype) -> dict[str, float]:
    """Split-KV decode of new tokens over caches cut unevenly across ranks vs full attention."""
    cache, new = SPLITKV_CACHE, SPLITKV_NEW  # cache lengths include the appended new tokens
    gen = torch.Generator().manual_seed(5)
    q = torch.rand(sum(new), HEADS, DIM, generator=gen, dtype=torch.float64).to(dtype)
    k, v = torch.rand(2, sum(cache), KV_HEADS, DIM, generator=gen, dtype=torch.float64).to(dtype)
    want_out, want_lse = reference_attention(
        q, k, v, cu_seqlens(new), cu_seqlens(cache), causal=causal
    )
    starts = cu_seqlens(cache).tolist()
    cuts = SPLITKV_CUTS[ctx.cp]
    r = ctx.cp_rank
    mine = [(starts[b] + c[r], starts[b] + c[r + 1]) for b, c in enumerate(cuts)]
    rows = torch.cat([torch.arange(a, b) for a, b in mine]).long()
    out, lse = splitkv_attention(
        q, k[rows], v[rows],
        cu_seqlens_q=cu_seqlens(new),
        cu_seqlens_k=cu_seqlens([b - a for a, b in mine]),
        kv_positions=[c[ctx.cp_rank] for c in cuts],
        q_positions=[n - m for n, m in zip(cache, new)] if causal else None,
        group=ctx.cp_group, block_size=BLOCK,
    )
    return {"out": (out - want_out).abs().max().item(), "lse": (lse - want_lse).abs().max().item()}


def attention_world_main(rank: int, world: int) -> dict:
    """Every distributed attention case on this rank (see the module docstring)."""
    torch.manual_seed(0)
    ctx = ParallelContext.from_initialized(ParallelLayout(cp=world), device="cpu")
    groups = {world: make_hybrid_groups(ctx.cp_group, world)}
    if world == 4:
        groups[2] = hybrid_groups_from_context(ctx, 2)
    cases = {
        name: _run_case(seed, ctx, groups, split, u, causal, dtype)
        for seed, (name, split, u, causal, dtype) in enumerate(case_names(world))
    }
    cases["zigzag-causal-float64-mha"] = _run_case(
        50, ctx, groups, "zigzag", 1, True, torch.float64, HEADS, HEADS
    )
    # K/V in chunks: 1 token (some chunks of the smaller shards are empty, so not sent) and 5
    for name, seed, split, causal, dtype, chunk in (
        ("zigzag-causal-float64-chunk1", 60, "zigzag", True, torch.float64, 1),
        ("ring-causal-float32-chunk5", 61, "contiguous", True, torch.float32, 5),
        ("zigzag-full-float64-chunk5", 62, "zigzag", False, torch.float64, 5),
    ):
        cases[name] = _run_case(seed, ctx, groups, split, 1, causal, dtype, kv_chunk=chunk)
    splitkv = {
        f"{'causal' if c else 'full'}-{str(d)[6:]}": _splitkv_case(ctx, c, d)
        for c in (False, True)
        for d in (torch.float32, torch.float64)
    }
    return {"cases": cases, "comm": _comm_case(ctx), "comm_chunked": _comm_case(ctx, COMM_CHUNK),
            "work": _work_case(ctx), "splitkv": splitkv}


def run_attention_world(world: int) -> list[dict]:
    """Launch `world` gloo ranks running `attention_world_main`; one result dict per rank."""
    return run_ranks(attention_world_main, world)
