"""The (output, lse) merge: exact for any split of the keys, identity for empty splits, no NaN."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwright.parallel.attention import merge_attention, merge_attention_

EXACT = 1e-12  # fp64: the merge reassociates a softmax over <= 64 parts; observed ~1e-15


def attention_over(scores: torch.Tensor, v: torch.Tensor, keys: torch.Tensor):
    """Materialised attention over the key subset `keys`: (out [T, H, D], lse [H, T])."""
    if keys.numel() == 0:  # an empty split: garbage output on purpose, lse -inf
        h, t = scores.shape[0], scores.shape[1]
        out = torch.full((t, h, v.shape[-1]), float("nan"), dtype=v.dtype)
        return out, torch.full((h, t), float("-inf"), dtype=v.dtype)
    part = scores[..., keys]  # [H, T, n]
    lse = torch.logsumexp(part, dim=-1)
    out = torch.einsum("htk,khd->thd", torch.softmax(part, dim=-1), v[keys])
    return out, lse


@settings(max_examples=40, deadline=None)
@given(
    num_splits=st.integers(1, 64),
    num_keys=st.integers(1, 80),
    seed=st.integers(0, 2**31 - 1),
    stacked=st.booleans(),
)
def test_merge_of_random_splits_is_exact(num_splits, num_keys, seed, stacked):
    gen = torch.Generator().manual_seed(seed)
    heads, tokens, dim = 3, 5, 4
    scores = torch.randn(heads, tokens, num_keys, generator=gen, dtype=torch.float64) * 4
    v = torch.randn(num_keys, heads, dim, generator=gen, dtype=torch.float64)
    owner = torch.randint(0, num_splits, (num_keys,), generator=gen)  # unequal, some empty
    order = torch.randperm(num_splits, generator=gen)  # merge in random order
    parts = [attention_over(scores, v, (owner == s).nonzero().flatten()) for s in order.tolist()]
    outs, lses = [p[0] for p in parts], [p[1] for p in parts]
    if stacked:
        outs, lses = torch.stack(outs), torch.stack(lses)
    out, lse = merge_attention(outs, lses)
    want_out, want_lse = attention_over(scores, v, torch.arange(num_keys))
    assert (out - want_out).abs().max().item() < EXACT
    assert (lse - want_lse).abs().max().item() < EXACT


def test_pairwise_merging_equals_one_merge():
    gen = torch.Generator().manual_seed(1)
    outs = torch.randn(6, 4, 2, 3, generator=gen, dtype=torch.float64)
    lses = torch.randn(6, 2, 4, generator=gen, dtype=torch.float64)
    out, lse = outs[0], lses[0]
    for i in range(1, 6):
        out, lse = merge_attention([out, outs[i]], [lse, lses[i]])
    all_out, all_lse = merge_attention(outs, lses)
    assert (out - all_out).abs().max().item() < EXACT
    assert (lse - all_lse).abs().max().item() < EXACT


def test_empty_split_is_the_identity():
    gen = torch.Generator().manual_seed(2)
    out = torch.randn(7, 4, 8, generator=gen, dtype=torch.float64)
    lse = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    empty_out = torch.full_like(out, float("nan"))  # whatever an empty split holds is ignored
    empty_lse = torch.full_like(lse, float("-inf"))
    for pair in (([out, empty_out], [lse, empty_lse]), ([empty_out, out], [empty_lse, lse])):
        merged_out, merged_lse = merge_attention(*pair)
        assert torch.equal(merged_out, out)
        assert torch.equal(merged_lse, lse)


def test_row_masked_everywhere_is_zero_and_minus_inf():
    gen = torch.Generator().manual_seed(3)
    outs = torch.randn(3, 5, 2, 4, generator=gen, dtype=torch.float32)
    lses = torch.randn(3, 2, 5, generator=gen, dtype=torch.float32)
    lses[:, 1, 2] = float("-inf")  # head 1, token 2: no split saw a key
    outs[:, 2, 1] = float("nan")
    out, lse = merge_attention(outs, lses)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[2, 1], torch.zeros(4))
    assert lse[1, 2].item() == float("-inf")
    assert torch.isfinite(lse).sum().item() == lse.numel() - 1


def test_bad_shapes_raise_value_error():
    with pytest.raises(ValueError, match="lses must be"):
        merge_attention(torch.zeros(2, 5, 3, 4), torch.zeros(2, 5, 3))


def test_in_place_merge_into_row_views_equals_one_merge():
    # ring attention merges each query tile of each step into views of one running accumulator
    gen = torch.Generator().manual_seed(4)
    outs = torch.randn(3, 10, 2, 4, generator=gen, dtype=torch.float64)
    lses = torch.randn(3, 2, 10, generator=gen, dtype=torch.float64)
    lses[1, :, 7:] = float("-inf")  # split 1 saw no key for the last rows
    want_out, want_lse = merge_attention(outs, lses)
    out, lse = outs[0].clone(), lses[0].clone()
    storage = out.data_ptr(), lse.data_ptr()
    for s in (1, 2):
        for rows in (slice(0, 4), slice(4, 10)):
            merge_attention_(out[rows], lse[:, rows], outs[s][rows], lses[s][:, rows])
    assert (out.data_ptr(), lse.data_ptr()) == storage
    assert (out - want_out).abs().max().item() < EXACT
    assert (lse - want_lse).abs().max().item() < EXACT
