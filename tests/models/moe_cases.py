"""Rank functions for the expert-parallel tests (module level, so `spawn` can import them).

Each runs on every rank of a gloo world started by `run_ranks` with `ParallelLayout(**layout)`
(world size ep * tp), loads the checkpoints the test wrote and returns plain values.
"""

from __future__ import annotations

from dataclasses import asdict

import torch

import tp_cases
from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.models.checkpoint import CheckpointReader
from shardwright.models.generate import greedy_generate
from shardwright.models.moe import attach_comm_stats, load_balancing_loss, record_router_logits
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.experts import ExpertCommStats
from shardwright.parallel.loss import mean_loss, vocab_parallel_cross_entropy


def context(layout: dict) -> ParallelContext:
    parallel = ParallelLayout(**layout)
    if parallel.world_size == 1:
        return ParallelContext.single("cpu")
    return ParallelContext.from_initialized(parallel)


def run_greedy(rank: int, world_size: int, layout: dict, cases: list[tuple[str, list[int], int]]):
    """Per case: the prompt's full logits, what the all-to-alls carried in that forward, the
    greedy continuation, and the local expert count of the first MoE layer."""
    ctx = context(layout)
    results = []
    for directory, prompt, n in cases:
        _, model = load_model(directory, ctx)
        stats = ExpertCommStats()
        attach_comm_stats(model, stats)
        with torch.no_grad():
            logits = model.full_logits(model(torch.tensor([prompt]), torch.arange(len(prompt))[None]))
        attach_comm_stats(model, None)
        experts = next(len(b.mlp.experts) for b in model.blocks if hasattr(b.mlp, "experts"))
        results.append((logits, asdict(stats), greedy_generate(model, prompt, n), experts))
    return results


def run_grads(rank: int, world_size: int, layout: dict, cases: list[tuple], aux_coef: float = 0.0):
    """Per case (directory, ids, targets): the loss (CE mean + aux_coef * load-balancing loss) and
    every gradient as pieces of checkpoint tensors (tp_cases.grad_pieces)."""
    ctx = context(layout)
    out = []
    for directory, ids, targets in cases:
        spec, model = load_model(directory, ctx)
        stats = ExpertCommStats()
        attach_comm_stats(model, stats)
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        with record_router_logits(model) as router_logits:
            local = model(ids, positions)
        loss = mean_loss(vocab_parallel_cross_entropy(local, targets, vocab_start=model.vocab_rows.start,
                                                      group=ctx.tp_group), targets)
        if aux_coef:
            loss = loss + aux_coef * load_balancing_loss(router_logits, spec.num_experts, spec.experts_per_token)
        loss.backward()
        with CheckpointReader(directory) as reader:
            pieces = tp_cases.grad_pieces(model, reader)
        out.append((loss.detach(), pieces, asdict(stats)))
    return out


def run_all(rank: int, world_size: int, layout: dict, greedy_cases: list, grad_cases: list, aux_coef: float):
    """`run_greedy` and `run_grads` in one world (one start-up of the ranks for both)."""
    return run_greedy(rank, world_size, layout, greedy_cases), run_grads(rank, world_size, layout, grad_cases,
                                                                         aux_coef)


def run_collapsed_grads(rank: int, world_size: int, layout: dict, directory: str, ids, targets):
    """`run_grads` with every token routed to experts 0 and 1 (its own top-2 weights kept): at ep = 2
    EP rank 1's experts receive nothing (a collapsed router, as training can produce)."""
    ctx = context(layout)
    _, model = load_model(directory, ctx)
    for block in model.blocks:
        if hasattr(block.mlp, "experts"):
            route = block.mlp.route
            block.mlp.route = lambda x, route=route: (route(x)[0], torch.tensor([0, 1]).expand(x.shape[0], 2))
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    loss = mean_loss(vocab_parallel_cross_entropy(model(ids, positions), targets, vocab_start=model.vocab_rows.start,
                                                  group=ctx.tp_group), targets)
    loss.backward()
    for p in model.parameters():  # the unused experts' (no gradient reached them)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    with CheckpointReader(directory) as reader:
        return loss.detach(), tp_cases.grad_pieces(model, reader)
