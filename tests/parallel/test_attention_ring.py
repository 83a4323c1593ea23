"""Ring attention (contiguous and zigzag) and its foundations: the tiled reference, the shard plan,
communication counts and the zigzag work balance.

The multi-process results come from ONE gloo launch per world size (`attention_world` fixture in
conftest.py, shared with the Ulysses and split-KV tests).
"""

from __future__ import annotations

import pytest
import torch
from attention_cases import (
    BALANCE_LENGTHS,
    COMM_CHUNK,
    DIM,
    KV_HEADS,
    LENGTHS,
    case_names,
    cu_seqlens,
    naive_attention,
)

from shardwright.parallel.attention import (
    make_shard_plan,
    reference_attention,
    ring_comm_formula,
    shard_tokens,
    unshard_tokens,
)

EXACT_REF = 1e-12  # tiled vs materialised softmax in fp64: same math, different summation order
EXACT_FP64 = 1e-10  # issue 6 acceptance for fp64; observed ~4e-15
WITHIN_FP32 = 1.0  # fp32 errors are reported as |err| / (2e-6 + 1e-5 |want|) (issue 6 acceptance)
WORLDS = (2, 4)

REFERENCE_CASES = {  # name: (cu_seqlens_q lengths, cu_seqlens_k lengths, heads, kv_heads)
    "self-varlen-gqa": ((13, 3, 22), None, 4, 2),
    "self-mha": ((9, 17), None, 3, 3),
    "cache-suffix-gqa": ((4, 1, 7), (10, 6, 7), 4, 1),  # fewer queries than keys: bottom-right
}


def _reference_vs_naive(lengths_q, lengths_k, heads, kv_heads, causal, block_size):
    gen = torch.Generator().manual_seed(len(lengths_q) + heads)
    lengths_k = lengths_k or lengths_q
    q = torch.rand(sum(lengths_q), heads, DIM, generator=gen, dtype=torch.float64)
    k, v = torch.rand(2, sum(lengths_k), kv_heads, DIM, generator=gen, dtype=torch.float64)
    gout = torch.rand(q.shape, generator=gen, dtype=torch.float64)
    glse = torch.rand(heads, q.shape[0], generator=gen, dtype=torch.float64)
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    results = []
    for fn in (reference_attention, naive_attention):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        if fn is reference_attention:
            out, lse = fn(*leaves, cu_q, cu_k, causal=causal, block_size=block_size)
        else:
            out, lse = fn(*leaves, cu_q.tolist(), cu_k.tolist(), causal)
        grads = torch.autograd.grad((out * gout).sum() + (lse * glse).sum(), leaves)
        results.append([out, lse, *grads])
    return results


@pytest.mark.parametrize("block_size", [3, 256])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_tiled_reference_equals_materialised_softmax(case, causal, block_size):
    tiled, naive = _reference_vs_naive(*REFERENCE_CASES[case], causal, block_size)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), tiled, naive):
        assert (got - want).abs().max().item() < EXACT_REF, name


def test_reference_rows_without_keys_are_defined():
    # 5 queries over 2 keys, causal bottom-right: the first 3 queries see nothing.
    q = torch.rand(5, 2, DIM, dtype=torch.float64, requires_grad=True)
    k = torch.rand(2, 1, DIM, dtype=torch.float64, requires_grad=True)
    v = torch.rand(2, 1, DIM, dtype=torch.float64, requires_grad=True)
    out, lse = reference_attention(q, k, v, [0, 5], [0, 2], causal=True, block_size=2)
    (out.sum() + lse[:, 3:].sum()).backward()
    assert torch.equal(out[:3], torch.zeros(3, 2, DIM, dtype=torch.float64))
    assert torch.isinf(lse[:, :3]).all() and torch.isfinite(lse[:, 3:]).all()
    assert all(not t.grad.isnan().any() for t in (q, k, v))
    assert torch.equal(q.grad[:3], torch.zeros(3, 2, DIM, dtype=torch.float64))


def test_reference_never_builds_a_full_score_matrix(monkeypatch):
    tokens, heads, block = 512, 2, 64
    q = torch.rand(tokens, heads, 4, requires_grad=True)
    k = torch.rand(tokens, 1, 4, requires_grad=True)
    largest = []

    def recording(fn):
        def wrapped(*args, **kwargs):
            result = fn(*args, **kwargs)
            largest.append(result.numel())
            return result
        return wrapped

    for name in ("einsum", "bmm", "matmul"):  # every product the kernels may form
        monkeypatch.setattr(torch, name, recording(getattr(torch, name)))
    out, _ = reference_attention(q, k, k, [0, tokens], causal=False, block_size=block)
    out.sum().backward()
    # biggest intermediate, forward and backward: one tile of scores per head, never tokens x tokens
    assert max(largest) == heads * block * block < tokens * tokens


@pytest.mark.parametrize("ulysses_size", [1, 2])
@pytest.mark.parametrize("split", ["contiguous", "zigzag"])
def test_shard_then_unshard_is_the_identity(split, ulysses_size):
    plan = make_shard_plan(cu_seqlens(LENGTHS), 4, split=split, ulysses_size=ulysses_size)
    x = torch.arange(sum(LENGTHS) * 3).reshape(-1, 3)
    parts = [shard_tokens(x, plan, c) for c in range(plan.cp)]
    assert sum(p.shape[0] for p in parts) == sum(LENGTHS)
    assert torch.equal(unshard_tokens(parts, plan), x)
    lse = x.T.contiguous()
    lse_parts = [shard_tokens(lse, plan, c, dim=1) for c in range(4)]
    assert torch.equal(unshard_tokens(lse_parts, plan, dim=1), lse)


def test_zigzag_rank_holds_chunks_i_and_2p_minus_1_minus_i():
    plan = make_shard_plan([0, 8, 18], 2, split="zigzag")  # 8 -> chunks of 2; 10 -> 3,3,2,2
    assert plan.token_index(0).tolist() == [0, 1, 6, 7, 8, 9, 10, 16, 17]
    assert plan.token_index(1).tolist() == [2, 3, 4, 5, 11, 12, 13, 14, 15]
    assert plan.positions(1).tolist() == [2, 3, 4, 5, 3, 4, 5, 6, 7]


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        make_shard_plan([1, 5], 2)
    with pytest.raises(ValueError, match="ulysses_size=3 must be >= 1 and divide cp=4"):
        make_shard_plan([0, 5], 4, ulysses_size=3)
    with pytest.raises(ValueError, match="split='striped'"):
        make_shard_plan([0, 5], 2, split="striped")


def _ring_case_ids(world):
    return [c[0] for c in case_names(world) if c[0].startswith(("ring", "zigzag"))] + [
        "zigzag-causal-float64-mha", "zigzag-causal-float64-chunk1", "ring-causal-float32-chunk5",
        "zigzag-full-float64-chunk5",
    ]


@pytest.mark.parametrize(
    "world,case", [(w, c) for w in WORLDS for c in _ring_case_ids(w)], ids=lambda x: str(x)
)
def test_ring_equals_single_process_attention(attention_world, world, case):
    limit = EXACT_FP64 if "float64" in case else WITHIN_FP32
    for rank, result in enumerate(attention_world(world)):
        for name in ("out", "lse", "dq", "dk", "dv"):
            assert result["cases"][case][name] <= limit, (rank, name, result["cases"][case])


@pytest.mark.parametrize("world", WORLDS)
def test_ring_sends_exactly_what_the_formula_says(attention_world, world):
    plan = make_shard_plan(cu_seqlens(LENGTHS), world, split="zigzag")
    tokens = [plan.ring_tokens(r) for r in range(world)]
    for rank, result in enumerate(attention_world(world)):
        comm = result["comm"]
        stats, forward, total = comm["stats"], comm["seen_forward"], comm["seen_total"]
        formula = ring_comm_formula(tokens, rank, KV_HEADS, DIM, torch.float64)
        assert {key: stats[key] for key in formula} == formula
        assert stats["kv_exchanges_forward"] == world - 1  # P-1 KV exchanges per forward call
        assert stats["kv_exchanges_backward"] == world - 1
        assert stats["dkv_exchanges_backward"] == world
        # measured independently from the tensors handed to torch.distributed:
        assert forward["p2p_batches"] == world - 1
        assert forward["p2p_bytes"] == formula["bytes_sent_forward"]
        assert forward["other_collectives"] == 0
        assert total["p2p_batches"] == 3 * world - 2
        assert total["p2p_bytes"] == formula["bytes_sent_forward"] + formula["bytes_sent_backward"]
        assert total["other_collectives"] == 0  # no hidden all-gathers or all-reduces


@pytest.mark.parametrize("world", WORLDS)
def test_chunked_ring_sends_the_same_bytes_in_more_messages(attention_world, world):
    plan = make_shard_plan(cu_seqlens(LENGTHS), world, split="zigzag")
    tokens = [plan.ring_tokens(r) for r in range(world)]
    chunks = -(-max(tokens) // COMM_CHUNK)
    assert chunks > 1 and min(tokens) >= chunks  # several chunks, none empty
    for rank, result in enumerate(attention_world(world)):
        comm = result["comm_chunked"]
        stats, forward = comm["stats"], comm["seen_forward"]
        formula = ring_comm_formula(tokens, rank, KV_HEADS, DIM, torch.float64, kv_chunks=chunks)
        assert {key: stats[key] for key in formula} == formula
        assert stats["kv_exchanges_forward"] == world - 1  # still P-1 hops of each shard
        # one message (a K and a V tensor) per chunk and hop, seen in the tensors handed to gloo
        assert forward["p2p_sends"] == 2 * (world - 1) * chunks
        assert forward["p2p_bytes"] == formula["bytes_sent_forward"]
        assert forward["other_collectives"] == 0
        assert comm["seen_total"]["other_collectives"] == 0


def test_comm_formula_for_equal_shards():
    # 4 ranks x 10 tokens, 2 kv heads of dim 8 in fp32: each block is 2*10*2*8*4 = 1280 bytes
    formula = ring_comm_formula([10] * 4, 1, 2, 8, torch.float32)
    assert formula["bytes_sent_forward"] == 3 * 1280
    assert formula["bytes_sent_backward"] == 3 * 1280 + 4 * 1280
    bf16 = ring_comm_formula([10] * 4, 1, 2, 8, torch.bfloat16)  # dK/dV accumulate in fp32
    assert bf16["bytes_sent_backward"] == 3 * 640 + 4 * 1280


@pytest.mark.parametrize("world", WORLDS)
def test_zigzag_balances_causal_work(attention_world, world):
    assert all(n % (2 * world) == 0 for n in BALANCE_LENGTHS)
    ratios = {}
    for split in ("contiguous", "zigzag"):
        work = [result["work"][split] for result in attention_world(world)]
        ratios[split] = max(work) / (sum(work) / world)
    assert ratios["zigzag"] == 1.0
    assert ratios["contiguous"] == 2 - 1 / world
