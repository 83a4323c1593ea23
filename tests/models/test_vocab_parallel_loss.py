"""Vocab-parallel cross-entropy against torch.nn.functional.cross_entropy, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tp_cases
from shardwright.parallel.launch import run_ranks
from shardwright.parallel.loss import mean_loss, vocab_parallel_cross_entropy

# The loss is log-sum-exp minus the target logit in fp32 either way; only the summation order
# differs across ranks, so 1e-6 is a tight bound for logits of size ~5.
TOL = 1e-6


def reference(logits: torch.Tensor, target: torch.Tensor):
    x = logits.clone().requires_grad_(True)
    F.cross_entropy(x, target, ignore_index=-100).backward()
    return F.cross_entropy(logits, target, ignore_index=-100, reduction="none"), x.grad


def inputs(vocab: int = 203, tokens: int = 40):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(tokens, vocab, generator=gen) * 5
    target = torch.randint(0, vocab, (tokens,), generator=gen)
    target[::7] = -100
    target[1] = vocab - 1  # a target in the last rank's (padded) slice
    return logits, target


def test_single_rank_equals_torch():
    logits, target = inputs()
    x = logits.clone().requires_grad_(True)
    losses = vocab_parallel_cross_entropy(x, target)
    mean_loss(losses, target).backward()
    ref_losses, ref_grad = reference(logits, target)
    assert (losses - ref_losses).abs().max() <= TOL
    assert (x.grad - ref_grad).abs().max() <= TOL


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_equals_torch(tp):
    logits, target = inputs()
    ref_losses, ref_grad = reference(logits, target)
    for losses, grad in run_ranks(tp_cases.run_vocab_ce, tp, args=(logits, target)):
        assert (losses - ref_losses).abs().max() <= TOL
        assert (grad - ref_grad).abs().max() <= TOL


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_cross_entropy(torch.zeros(3, 5), torch.zeros(4, dtype=torch.long))
