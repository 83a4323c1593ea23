"""Rank functions for the tensor-parallel tests (module level, so `spawn` can import them).

Each function runs on every rank of a gloo world started by `run_ranks`, loads checkpoints the
test wrote, and returns plain tensors for the test process to compare with the tp = 1 reference.
"""

from __future__ import annotations

import torch

from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.models.checkpoint import CheckpointReader, Read
from shardwright.models.generate import greedy_generate
from shardwright.models.weights import weight_plan
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.loss import mean_loss, vocab_parallel_cross_entropy


def context(world_size: int) -> ParallelContext:
    if world_size == 1:
        return ParallelContext.single("cpu")
    return ParallelContext.from_initialized(ParallelLayout(tp=world_size))


def logits_and_grads(ctx: ParallelContext, directory: str, ids: torch.Tensor, targets: torch.Tensor):
    """Full logits, the loss, and every parameter gradient as pieces of checkpoint tensors."""
    _, model = load_model(directory, ctx)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    local = model(ids, positions)
    loss = mean_loss(vocab_parallel_cross_entropy(
        local, targets, vocab_start=model.vocab_rows.start, group=ctx.tp_group), targets)
    loss.backward()
    with CheckpointReader(directory) as reader:
        pieces = grad_pieces(model, reader)
    return model.full_logits(local).detach(), loss.detach(), pieces


def grad_pieces(model, reader) -> list[tuple]:
    """(checkpoint name, out slice, in slice, conv1d, grad) for every read of every parameter."""
    pieces = []
    for _, param, reads in weight_plan(model, reader):
        lengths = [r.out.length if r.out is not None else param.shape[0] for r in reads]
        for r, g in zip(reads, param.grad.split(lengths, dim=0)):
            out = None if r.out is None else (r.offset + r.out.start, r.offset + r.out.valid_stop)
            valid = g[: out[1] - out[0]] if out is not None else g
            inn = None if r.in_ is None else (r.in_.start, r.in_.stop)
            pieces.append((r.name, out, inn, r.conv1d, valid.clone()))
    return pieces


def run_logits_grads(rank: int, world_size: int, cases: list[tuple[str, torch.Tensor, torch.Tensor]]):
    ctx = context(world_size)
    return [logits_and_grads(ctx, d, ids, tgt) for d, ids, tgt in cases]


def run_greedy(rank: int, world_size: int, cases: list[tuple[str, list[int], int]]):
    ctx = context(world_size)
    results = []
    for directory, prompt, n in cases:
        _, model = load_model(directory, ctx)
        positions = torch.arange(len(prompt))[None]
        with torch.no_grad():
            logits = model.full_logits(model(torch.tensor([prompt]), positions))
        results.append((logits, greedy_generate(model, prompt, n)))
    return results


def run_vocab_ce(rank: int, world_size: int, logits: torch.Tensor, target: torch.Tensor):
    """Each rank takes its padded vocab slice; returns losses and the gathered logit gradient."""
    from shardwright.parallel.collectives import gather_last_dim
    from shardwright.parallel.layers import RowRange

    ctx = context(world_size)
    rows = RowRange.padded(logits.shape[-1], ctx.tp_rank, ctx.tp)
    local = torch.full((*logits.shape[:-1], rows.length), float("-inf"), dtype=logits.dtype)
    valid = rows.valid_stop - rows.start
    local[..., :max(valid, 0)] = logits[..., rows.start:rows.valid_stop]
    local.requires_grad_(True)
    losses = vocab_parallel_cross_entropy(local, target, vocab_start=rows.start, group=ctx.tp_group)
    mean_loss(losses, target).backward()
    grad = gather_last_dim(local.grad, ctx.tp_group)
    return losses.detach(), grad[..., : logits.shape[-1]]


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run_load_memory(rank: int, world_size: int, directory: str) -> dict[str, int]:
    """Peak resident bytes added while this rank builds and loads its shard.

    The kernel's high-water mark (VmHWM) is reset through /proc/self/clear_refs just before the
    load, so the figure is the real peak of this process, not an estimate.
    """
    import gc

    ctx = context(world_size)
    # Warm up the libraries once (safetensors' first open, torch's first copy kernels), so the
    # figure is the load's own memory, not one-time library initialisation.
    with CheckpointReader(directory) as reader:
        torch.zeros(4).copy_(reader.read(Read("model.norm.weight"))[:4])
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    _, model = load_model(directory, ctx)
    peak = _status_kib("VmHWM")
    local = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"added_bytes": (peak - before) * 1024, "local_param_bytes": local}
