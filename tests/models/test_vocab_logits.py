"""The logits product taken over vocabulary row chunks (CPU inference, 2-48 rows) equals the
plain product: each logit is the same dot product, so the test asks for equality within 1e-6
relative (MKL may block the hidden dimension differently for different shapes)."""

from __future__ import annotations

import pytest
import torch

from shardwright.models.decoder import VOCAB_CHUNK_MAX_TOKENS, VOCAB_CHUNK_ROWS, _chunk_vocab, vocab_logits
from shardwright.parallel.layers import RowRange


@pytest.mark.parametrize("shape", [(1, 64), (2, 64), (8, 64), (4, 8, 64), (32, 64), (49, 64)])
def test_chunked_vocab_logits_equal_the_plain_product(shape):
    gen = torch.Generator().manual_seed(0)
    vocab = 3 * VOCAB_CHUNK_ROWS + 123  # a partial last chunk, and padding rows past the vocab
    rows = RowRange(vocab - 100, 0, vocab)  # the last 100 rows are padding
    weight = torch.randn(vocab, shape[-1], generator=gen)
    h = torch.randn(*shape, generator=gen)
    with torch.inference_mode():
        tokens = h.numel() // shape[-1]
        assert _chunk_vocab(h, weight) == (2 <= tokens <= VOCAB_CHUNK_MAX_TOKENS)
        got = vocab_logits(h, weight, rows, None)
    want = h @ weight.t()
    want[..., rows.valid_stop - rows.start:] = float("-inf")
    assert got.shape == (*shape[:-1], vocab)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert not _chunk_vocab(h.requires_grad_(), weight)  # training keeps the plain, differentiable product
