"""Weight-only INT8/INT4 quantization against dequantized-weight references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import quant_cases
from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.models.quant import QuantizedWeight, quantize_int4, quantize_int8, quantize_model
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.launch import run_ranks


def test_int8_round_trip_within_half_a_step(rng):
    w = torch.randn(96, 256, generator=rng)
    q, scale = quantize_int8(w)
    err = (q.float() * scale[:, None] - w).abs()
    # Round-to-nearest: each element is off by at most half its row's step (+ fp32 rounding).
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert q.dtype == torch.int8 and q.abs().max() == 127


@pytest.mark.parametrize("group_size", [32, 128])
def test_int4_round_trip_within_half_a_step(rng, group_size):
    w = torch.randn(64, 256, generator=rng)
    q, scale, zero = quantize_int4(w, group_size)
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    qw = QuantizedWeight(w, "int4", group_size, use_kernels=False)
    err = (qw.dequantize() - w).abs().reshape(64, -1, group_size)
    assert (err <= scale[..., None] / 2 * (1 + 1e-4) + 1e-6).all()


@pytest.mark.parametrize("method,group_size", [("int8", 128), ("int4", 32), ("int4", 128)])
def test_kernel_equals_dequantized_linear(rng, method, group_size):
    w = torch.randn(256, 512, generator=rng) * 0.05
    x = torch.randn(3, 512, generator=rng)
    qw = QuantizedWeight(w, method, group_size, use_kernels=True)
    assert qw.packed is not None, "the CPU kernel should be used on CPU"
    ref = F.linear(x.bfloat16().float(), qw.dequantize())
    y = qw.linear(x)
    # The kernel takes bf16 activations (the reference rounds x the same way) and returns bf16:
    # one bf16 rounding of the output, 2^-8 relative, plus bf16-rounded scales (int8: the
    # scale, 2^-8 of each product; int4: scale and zero) summed over 512 terms: bound 2% of max |y|.
    assert (y - ref).abs().max() <= 0.02 * ref.abs().max()
    assert y.dtype == x.dtype


def test_int4_rank_in_features_must_divide_group(checkpoints):
    _, model = load_model(checkpoints["llama"], ParallelContext.single("cpu"))
    with pytest.raises(ValueError, match="group_size=128"):
        quantize_model(model, "int4", group_size=128)  # hidden 64 does not divide by 128


@pytest.mark.parametrize("quant,group_size", [("int4", 32), ("int8", 128)])
def test_tp2_quantized_logits_equal_tp1(checkpoints, rng, quant, group_size):
    ids = torch.randint(0, 203, (2, 12), generator=rng)
    d = str(checkpoints["llama_gqa"])
    ref = quant_cases.run_quant_logits(0, 1, d, ids, quant, group_size)
    by_rank = run_ranks(quant_cases.run_quant_logits, 2, args=(d, ids, quant, group_size))
    scale = ref.abs().max()
    # int4: every group lies in one rank's in_features, so both layouts hold the same integers and
    # differ by the all-reduce's order and bf16 rounding of partial outputs (2^-8 relative per op,
    # amplified by this random std-0.2 model; measured 1.1% of max |logit|): bound 3%.
    # int8: a row-parallel rank scales its own half-row, so the weights differ by quantization
    # noise (<= 1/254 of a row's max per weight; measured 2.5%, the int8-vs-fp32 gap is 4.4%): 5%.
    # A wrong slice or scale gives errors of the order of the logits themselves.
    tol = 0.03 if quant == "int4" else 0.05
    for logits in by_rank:
        assert (logits - ref).abs().max() <= tol * scale


def test_int8_greedy_tokens_equal_dequantized_reference(checkpoints):
    ctx = ParallelContext.single("cpu")
    _, quant = load_model(checkpoints["llama"], ctx, quant="int8")
    _, ref = load_model(checkpoints["llama"], ctx)
    quantize_model(ref, "int8", use_kernels=False)  # the same integers, F.linear on fp32 activations
    prompt = [5, 17, 42, 99, 3]
    assert greedy_generate(quant, prompt, 12) == greedy_generate(ref, prompt, 12)


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
