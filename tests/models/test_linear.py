"""`linear` (the product every TP layer and the LM head use) equals F.linear on every path.

On CPU fp32 inference with 2-256 rows it is computed as (weight @ x^T)^T; each output is still
one dot product over the input features, so the test asks for equality within 1e-5 relative
(BLAS may block that sum differently for different shapes, as between any two shapes).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardwright.models.decoder import vocab_logits
from shardwright.parallel.layers import (
    WEIGHT_LEFT_CHUNK,
    WEIGHT_LEFT_MAX_ROWS,
    RowRange,
    _weight_left,
    linear,
)


@pytest.mark.parametrize("shape", [(1, 96), (2, 96), (8, 96), (4, 8, 96), (1, 32, 96),
                                   (WEIGHT_LEFT_MAX_ROWS, 96), (WEIGHT_LEFT_MAX_ROWS + 1, 96)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("out_features", [200, 2 * WEIGHT_LEFT_CHUNK + 37])  # one block; three, the last partial
def test_linear_equals_f_linear(shape, bias, out_features):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, shape[-1], generator=gen)
    b = torch.randn(out_features, generator=gen) if bias else None
    x = torch.randn(*shape, generator=gen)
    with torch.inference_mode():
        rows = x.numel() // shape[-1]
        assert _weight_left(x, weight) == (2 <= rows <= WEIGHT_LEFT_MAX_ROWS)
        got = linear(x, weight, b)
    assert got.shape == (*shape[:-1], out_features) and got.is_contiguous()
    torch.testing.assert_close(got, F.linear(x, weight, b), rtol=1e-5, atol=1e-5)


def test_linear_keeps_the_plain_product_where_it_is_not_faster():
    x, w = torch.randn(8, 16), torch.randn(4, 16)
    assert not _weight_left(x.requires_grad_(), w)  # training: the differentiable product
    with torch.inference_mode():
        assert not _weight_left(x.double(), w.double())  # measured for fp32 only
        assert not _weight_left(x[:1], w)  # one row: a matrix-vector product either way


def test_vocab_logits_pad_rows_are_minus_infinity():
    gen = torch.Generator().manual_seed(1)
    vocab = 300
    rows = RowRange(vocab - 20, 0, vocab)  # the last 20 rows are padding
    weight, h = torch.randn(vocab, 64, generator=gen), torch.randn(2, 5, 64, generator=gen)
    with torch.inference_mode():
        got = vocab_logits(h, weight, rows, None)
    want = h @ weight.t()
    want[..., vocab - 20:] = float("-inf")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
