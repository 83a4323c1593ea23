"""Weight-only INT8/INT4 quantization against dequantized-weight references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import quant_cases
from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.models.quant import QuantizedWeight, quantize_method, quantize_model
from shardwright.models.quant_format import QuantSource
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.launch import run_ranks


def test_int8_round_trip_within_half_a_step(rng):
    w = torch.randn(96, 256, generator=rng)
    gq = quantize_method(w, "int8", 128)
    assert gq.scale.shape == (96, 1) and (gq.zero == 128).all()  # symmetric, one group per row
    err = (gq.dequantize() - w).abs()
    # Round-to-nearest: each element is off by at most half its row's step; the fp16-stored scale
    # may be 2^-11 smaller, which moves the row's extreme (128 steps out) by 128 * 2^-11 steps.
    assert (err <= gq.scale * (0.5 + 128 * 2 ** -11)).all()
    assert int(gq.q.min()) >= 0 and int(gq.q.max()) <= 255 and (gq.q - 128).abs().max() >= 127


@pytest.mark.parametrize("group_size", [32, 128])
def test_rtn4_round_trip_within_half_a_step(rng, group_size):
    w = torch.randn(64, 256, generator=rng)
    gq = quantize_method(w, "rtn4", group_size)
    assert int(gq.q.min()) >= 0 and int(gq.q.max()) <= 15 and gq.scale.shape == (64, 256 // group_size)
    err = (gq.dequantize() - w).abs().reshape(64, -1, group_size)
    # Half a step, and the zero point's rounding can shift the grid so the group's extreme lies up
    # to one more half step outside it (the fp16 scale adds 2^-11 relative).
    assert (err <= gq.scale[..., None] * (1 + 1e-3)).all()
    assert err.mean() <= 0.3 * gq.scale.mean()  # most errors are well inside half a step


@pytest.mark.parametrize("method,group_size", [("int8", 128), ("rtn4", 32), ("rtn4", 128)])
def test_kernel_equals_dequantized_linear(rng, method, group_size):
    w = torch.randn(256, 512, generator=rng) * 0.05
    x = torch.randn(3, 512, generator=rng)
    qw = QuantizedWeight(quantize_method(w, method, group_size), use_kernels=True)
    assert qw.packed is not None, "the CPU kernel should be used on CPU"
    ref = F.linear(x.bfloat16().float(), qw.dequantize())
    y = qw.linear(x)
    # The kernel takes bf16 activations (the reference rounds x the same way) and returns bf16:
    # one bf16 rounding of the output, 2^-8 relative, plus bf16-rounded scales (int8: the
    # scale, 2^-8 of each product; int4: scale and zero) summed over 512 terms: bound 2% of max |y|.
    assert (y - ref).abs().max() <= 0.02 * ref.abs().max()
    assert y.dtype == x.dtype


def test_rtn4_rank_in_features_must_divide_group(checkpoints):
    _, model = load_model(checkpoints["llama"], ParallelContext.single("cpu"))
    with pytest.raises(ValueError, match="group_size=128"):
        quantize_model(model, "rtn4", group_size=128)  # hidden 64 does not divide by 128
    # A row-parallel rank's slice of the global integers must hold whole groups.
    gq = quantize_method(torch.randn(8, 128), "rtn4", 64)
    with pytest.raises(ValueError, match=r"input features \[32, 64\) cut groups of 64"):
        QuantSource._in_slice("o.weight", gq, 32, 64)
    assert QuantSource._in_slice("o.weight", gq, 64, 128).scale.shape == (8, 1)


@pytest.mark.parametrize("quant,group_size", [("rtn4", 32), ("int8", 128)])
def test_tp2_quantized_logits_equal_tp1(checkpoints, rng, quant, group_size):
    ids = torch.randint(0, 203, (2, 12), generator=rng)
    d = str(checkpoints["llama_gqa"])
    ref = quant_cases.run_quant_logits(0, 1, d, ids, quant, group_size)
    by_rank = run_ranks(quant_cases.run_quant_logits, 2, args=(d, ids, quant, group_size))
    scale = ref.abs().max()
    # Both layouts hold the same integers (quantized from the global tensor, then sliced) and
    # differ by the all-reduce's order and bf16 rounding of partial outputs (2^-8 relative per op,
    # amplified by this random std-0.2 model; measured 1.1-1.2% of max |logit|): bound 3%.
    # A wrong slice or scale gives errors of the order of the logits themselves.
    tol = 0.03
    for logits in by_rank:
        assert (logits - ref).abs().max() <= tol * scale


@pytest.mark.parametrize("quant,group_size", [("int8", 128), ("rtn4", 32)])
def test_kernels_equal_dequantized_reference_model(checkpoints, quant, group_size):
    ctx = ParallelContext.single("cpu")
    _, kernels = load_model(checkpoints["llama"], ctx, quant=quant, group_size=group_size)
    _, ref = load_model(checkpoints["llama"], ctx)
    quantize_model(ref, quant, group_size=group_size, use_kernels=False)  # same integers, fp32 F.linear
    _, fp32 = load_model(checkpoints["llama"], ctx)
    ids, pos = torch.tensor([[5, 17, 42, 99, 3, 97, 158, 41]]), torch.arange(8)[None]
    with torch.no_grad():
        lk, lr, lf = (m.full_logits(m(ids, pos)) for m in (kernels, ref, fp32))
    assert torch.equal(kernels.blocks[0].attn.qkv.weight.dequantize(), ref.blocks[0].attn.qkv.weight.dequantize())
    # The kernels take bf16 activations and return bf16 (2^-9 relative each way per product),
    # which this random std-0.2 model amplifies: measured 5.6% of max |logit| for int8. Bound 10%;
    # a wrong scale, zero or packing gives errors of the order of the logits (>50%).
    assert (lk - lr).abs().max() <= 0.10 * lr.abs().max()
    assert (lr - lf).abs().max() > 0, "quantization should change the logits"


def test_bf16_model_runs_end_to_end(checkpoints):
    ctx = ParallelContext.single("cpu")
    _, bf16 = load_model(checkpoints["llama"], ctx, dtype="bfloat16")
    _, fp32 = load_model(checkpoints["llama"], ctx)
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    pos = torch.arange(6)[None]
    with torch.no_grad():
        lb = bf16.full_logits(bf16(ids, pos))
        lf = fp32.full_logits(fp32(ids, pos))
    assert lb.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: per-op relative error 2^-8 compounded over 2 layers: 5% of max.
    assert (lb.float() - lf).abs().max() <= 0.05 * lf.abs().max()
    assert len(greedy_generate(bf16, [5, 17, 42], 8)) == 8
