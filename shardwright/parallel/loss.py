"""Vocab-parallel cross-entropy (Megatron-LM): the loss over logits split by vocabulary.

No rank ever holds the full [tokens, vocab] logits. Forward: an all-reduce MAX for stability,
an all-reduce SUM of the target logit (held by exactly one rank) and one of the exp-sums.
Backward is local: softmax minus the one-hot target, on this rank's columns only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardwright.parallel.collectives import Group, all_reduce_max

IGNORE_INDEX = -100


def _sum(x: torch.Tensor, group: Group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, vocab_start: int, group: Group):
        logits = logits.float()
        row_max = all_reduce_max(logits.max(dim=-1).values, group)
        shifted = logits - row_max.unsqueeze(-1)
        local_target = target - vocab_start
        mine = (local_target >= 0) & (local_target < logits.shape[-1])
        index = local_target.masked_fill(~mine, 0).unsqueeze(-1)
        target_logit = shifted.gather(-1, index).squeeze(-1).masked_fill(~mine, 0.0)
        target_logit = _sum(target_logit, group)
        exp = shifted.exp()
        sum_exp = _sum(exp.sum(dim=-1), group)
        ignored = target == IGNORE_INDEX
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), index, mine, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, index, mine, ignored = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(-1, index, -mine.to(grad.dtype).unsqueeze(-1))
        scale = grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1)
        return grad * scale, None, None, None


def vocab_parallel_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, *, vocab_start: int = 0, group: Group = None
) -> torch.Tensor:
    """Per-token cross-entropy of logits split by vocabulary across `group`.

    logits: [..., local_vocab], this rank's columns [vocab_start, vocab_start + local_vocab) of
    the full logits (padding columns must hold -inf). target: [...] global token ids, or
    IGNORE_INDEX (-100) for positions that carry no loss (their loss and gradient are 0).
    Returns float32 losses of shape target.shape. With `group` None it equals
    `F.cross_entropy(logits, target, reduction="none")`.
    """
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} disagree")
    return _VocabParallelCrossEntropy.apply(logits, target, vocab_start, group)


def mean_loss(losses: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the positions that are not IGNORE_INDEX (0 when there are none)."""
    count = (target != IGNORE_INDEX).sum().clamp(min=1)
    return losses.sum() / count
