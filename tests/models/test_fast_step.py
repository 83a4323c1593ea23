"""The fast CPU step (oneDNN-packed bf16 and fp32 weights, the reused decode-gather workspace) against the
plain path it replaces, on the serving path (forward_packed over a paged cache)."""

from __future__ import annotations

import pytest
import torch

from model_helpers import paged_greedy, tiny_spec
from shardwright.models import load_model
from shardwright.models.packed import FP32_PACKED, PackedWeight, pack_model
from shardwright.models.paged import PagedBatch, PagedKVCache, gather_slots, paged_attention, sdpa
from shardwright.models.random_init import write_random_checkpoint
from shardwright.parallel.context import ParallelContext

BLOCK = 4

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN is not in this torch")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_step")
    specs = {"llama": tiny_spec("llama", num_kv_heads=2, num_layers=4, max_position_embeddings=1024),  # GQA, no biases, untied head
             "gpt2": tiny_spec("gpt2", num_layers=4, max_position_embeddings=1024)}  # biases, tied head (stays a tensor)
    return {name: write_random_checkpoint(root / name, spec, seed=11 + i, std=0.15)
            for i, (name, spec) in enumerate(specs.items())}




@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_packed_bf16_step_equals_the_plain_bf16_step(checkpoints, name):
    _, plain = load_model(checkpoints[name], ParallelContext.single("cpu"), dtype="bfloat16")
    _, packed = load_model(checkpoints[name], ParallelContext.single("cpu"), dtype="bfloat16")
    count = pack_model(packed)
    linears = 4 * 2 * 2 + (1 if name == "llama" else 0)  # qkv, o, gate_up/fc, down/proj (+ own head)
    assert count == linears
    assert isinstance(packed.blocks[0].attn.qkv.weight, PackedWeight)
    prompts = [[5, 9, 2, 6, 5, 3, 5], [7, 1, 8, 2, 8, 1, 8, 2, 8]]  # continuations of 7-8 distinct tokens
    want_tokens, want_logits = paged_greedy(plain, prompts, 24, chunk=5, block=BLOCK)
    got_tokens, got_logits = paged_greedy(packed, prompts, 24, chunk=5, block=BLOCK)
    assert len(set(want_tokens[0])) > 4, "continuation too repetitive to be a test"
    assert got_tokens == want_tokens
    # Both sides are bf16 GEMMs accumulating in fp32; oneDNN's packed kernel may block the
    # accumulation differently from the plain call's (measured: equal bit for bit at 1-77 rows on
    # the CI machine), and one bf16 rounding step of a logit of magnitude ~4 is 1/64.
    for got, want in zip(got_logits, want_logits):
        torch.testing.assert_close(got, want, rtol=0, atol=2 / 64)


@pytest.mark.skipif(not FP32_PACKED, reason="fp32 is packed only where it pays (AVX-512; models/packed.py)")
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_packed_fp32_step_equals_the_plain_fp32_step(checkpoints, name):
    _, plain = load_model(checkpoints[name], ParallelContext.single("cpu"))
    _, packed = load_model(checkpoints[name], ParallelContext.single("cpu"))
    assert pack_model(packed) == 4 * 2 * 2 + (1 if name == "llama" else 0)
    assert isinstance(packed.blocks[0].mlp.down.weight if name == "llama" else packed.blocks[0].mlp.proj.weight,
                      PackedWeight)
    prompts = [[3, 14, 15, 92, 65, 35], [7, 1, 8, 2, 8, 1, 8, 2, 8]]
    want_tokens, want_logits = paged_greedy(plain, prompts, 24, chunk=5, block=BLOCK)
    got_tokens, got_logits = paged_greedy(packed, prompts, 24, chunk=5, block=BLOCK)
    assert len(set(want_tokens[0])) > 4, "continuation too repetitive to be a test"
    assert got_tokens == want_tokens
    # Both are fp32 sums over the input features, blocked differently (oneDNN's packed kernel,
    # MKL's GEMM): a few fp32 roundings per product, far below 1e-4 on logits of magnitude ~4.
    for got, want in zip(got_logits, want_logits):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_packed_weight_refuses_other_dtypes_and_gradients():
    w = PackedWeight(torch.randn(8, 16, dtype=torch.bfloat16))
    with torch.inference_mode():
        assert w.linear(torch.randn(3, 16, dtype=torch.bfloat16)).shape == (3, 8)
        with pytest.raises(RuntimeError, match="bfloat16 inference; got torch.float32"):
            w.linear(torch.randn(3, 16))
        with pytest.raises(RuntimeError, match="float32 inference; got torch.bfloat16"):
            PackedWeight(torch.randn(8, 16)).linear(torch.randn(3, 16, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="gradients enabled"):
        w.linear(torch.randn(3, 16, dtype=torch.bfloat16))


def test_decode_gather_reuses_one_workspace_and_equals_fresh_gathers():
    """Growing and shrinking decode batches: the attention equals SDPA over keys gathered into
    fresh tensors bit for bit (same kernel on the same values), and the workspace is allocated
    once for the largest batch and then reused."""
    torch.manual_seed(0)
    cache = PagedKVCache(1, 64, BLOCK, 2, 8, dtype=torch.float32, device="cpu")
    cache.keys[0].normal_()
    cache.values[0].normal_()
    ptrs = set()
    for num_seqs, context in [(5, 30), (2, 9), (5, 30), (1, 3)]:
        tables = [list(range(s * 8, s * 8 + 8))[::-1] for s in range(num_seqs)]  # blocks out of order
        pos = [context - 1 - s for s in range(num_seqs)]
        slots = [tables[s][p // BLOCK] * BLOCK + p % BLOCK for s, p in enumerate(pos)]
        batch = PagedBatch.build([1] * num_seqs, pos, slots, [1] * num_seqs, tables, BLOCK,
                                 list(range(num_seqs)), torch.device("cpu"))
        q, k, v = torch.randn(num_seqs, 4, 8), torch.randn(num_seqs, 2, 8), torch.randn(num_seqs, 2, 8)
        got = paged_attention(q, k, v, 0, cache, batch, 0.3)
        (group,) = batch.decode_groups  # contexts within a quarter of each other: one group
        kd = gather_slots(cache.keys[0], group.slots).transpose(1, 2)
        vd = gather_slots(cache.values[0], group.slots).transpose(1, 2)
        want = torch.nn.functional.scaled_dot_product_attention(
            q.unsqueeze(2), kd, vd, attn_mask=group.mask, scale=0.3, enable_gqa=True).squeeze(2)
        assert torch.equal(got, want)
        if (num_seqs, context) != (5, 30) or ptrs:  # the first largest batch allocates it
            ptrs.add(cache.workspace("keys", 1).data_ptr())
    assert len(ptrs) == 1


@pytest.mark.parametrize("window", [None, 10])
def test_decode_rows_are_grouped_by_context_length(window):
    """Rows of very different context lengths go to different groups (none padded by more than a
    quarter of its keys); each row's output equals SDPA over exactly its own keys."""
    torch.manual_seed(1)
    cache = PagedKVCache(1, 64, BLOCK, 2, 8, dtype=torch.float32, device="cpu")
    cache.keys[0].normal_()
    cache.values[0].normal_()
    contexts = [12, 40, 3, 38, 11]
    tables = [list(range(s * 12, s * 12 + 12))[::-1] for s in range(len(contexts))]
    pos = [c - 1 for c in contexts]
    slots = [tables[s][p // BLOCK] * BLOCK + p % BLOCK for s, p in enumerate(pos)]
    batch = PagedBatch.build([1] * 5, pos, slots, [1] * 5, tables, BLOCK, list(range(5)), torch.device("cpu"))
    assert [g.lens for g in batch.decode_groups] == [[40, 38], [12, 11], [3]]
    assert batch.decode_groups[-1].mask is None  # one row: all its keys, no mask
    q, k, v = torch.randn(5, 4, 8), torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    got = paged_attention(q, k, v, 0, cache, batch, 0.3, window=window)
    for s, n in enumerate(contexts):
        first = 0 if window is None else max(0, n - window)
        own = batch.context_slots[s][first:]
        want = torch.nn.functional.scaled_dot_product_attention(
            q[s].view(1, 4, 1, 8), cache.keys[0][own].transpose(0, 1).unsqueeze(0),
            cache.values[0][own].transpose(0, 1).unsqueeze(0), scale=0.3, enable_gqa=True)[0, :, 0]
        # The same keys and sums; the grouped call's masked padding only changes how SDPA blocks
        # the key loop (fp32 rounding of sums of ~40 terms: far below 1e-6).
        torch.testing.assert_close(got[s], want, rtol=0, atol=1e-6)


def test_bf16_attention_runs_in_fp32_on_the_cpu():
    """bf16 q, k, v: the result is fp32 attention over the same values rounded once to bf16 (bit for
    bit: the same fp32 kernel), and it is at least as close to fp64 attention as bf16 SDPA's."""
    torch.manual_seed(2)
    q = torch.randn(3, 4, 1, 16, dtype=torch.bfloat16)
    k, v = torch.randn(3, 2, 40, 16, dtype=torch.bfloat16), torch.randn(3, 2, 40, 16, dtype=torch.bfloat16)
    mask = torch.arange(40).view(1, 1, 1, 40) < torch.tensor([40, 25, 9]).view(3, 1, 1, 1)
    got = sdpa(q, k, v, mask, 0.25, gqa=True)
    assert got.dtype == torch.bfloat16
    sd = torch.nn.functional.scaled_dot_product_attention
    assert torch.equal(got, sd(q.float(), k.float(), v.float(), attn_mask=mask, scale=0.25, enable_gqa=True).bfloat16())
    exact = sd(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.25, enable_gqa=True)
    native = sd(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    assert (got.double() - exact).abs().max() <= (native.double() - exact).abs().max()
