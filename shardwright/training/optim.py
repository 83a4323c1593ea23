"""AdamW, the learning-rate schedule and global-norm gradient clipping over every shard.

- `build_optimizer`: torch AdamW; matrices (dim >= 2: linear weights, embeddings) decay,
  vectors (norm weights, biases) do not.
- `lr_at(step)`: linear warm-up to `lr` over `warmup_steps`, cosine decay to `min_lr` at
  `decay_steps`, `min_lr` after.
- `global_grad_norm`: the 2-norm of the gradient of the whole (unsharded) model. Each rank adds
  the squares of the pieces it owns (`sharding.owns`): TP-sharded pieces on every TP rank,
  TP-replicated ones (norms, row-parallel biases, GPT-2 position embeddings, replicated kv heads)
  on one; every pipeline stage adds its layers; each EP rank its own experts (the rest, replicated
  over EP, only EP rank 0); only DP rank 0 adds (the DP-reduced gradients are
  identical across DP); a tied LM-head copy is skipped. One all-reduce over the world sums them,
  so every rank gets the same norm and clips with the same coefficient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from shardwright.config import OptimConfig
from shardwright.models.decoder import DecoderModel
from shardwright.parallel.context import ParallelContext
from shardwright.training.sharding import owns, param_pieces


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Learning rate of optimizer step `step` (0-based)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = cfg.decay_steps - cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / span) if span > 0 else 1.0
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over `model`'s parameters; weight decay on matrices only."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr_at(0, cfg),
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


OwnedRows = list[tuple[torch.nn.Parameter, list[tuple[int, int]]]]


def owned_rows(model: DecoderModel, ctx: ParallelContext, *, skip: frozenset[str] = frozenset()) -> OwnedRows:
    """The row ranges of each parameter whose gradient this rank counts in the global norm.

    Fixed for a model: compute once. Empty on DP (and CP) ranks other than 0; parameters named
    in `skip` (a tied LM-head copy) are left out.
    """
    if ctx.dp_rank != 0 or ctx.cp_rank != 0:
        return []
    owned = []
    for name, param, pieces in param_pieces(model):
        rows = [(p.row_start, p.row_stop) for p in pieces if owns(p, ctx.tp_rank) and p.row_stop > p.row_start]
        if ctx.ep_rank != 0 and ".mlp.experts." not in name:  # replicated over EP: counted on EP rank 0
            continue
        if name not in skip and rows:
            owned.append((param, rows))
    return owned


def global_grad_norm(owned: OwnedRows, ctx: ParallelContext) -> float:
    """The 2-norm of the whole model's gradient; collective over the world (see module doc)."""
    squares = torch.zeros((), dtype=torch.float32, device=ctx.device)
    for param, rows in owned:
        if param.grad is not None:
            grad = param.grad.float()
            for start, stop in rows:
                squares += grad[start:stop].pow(2).sum()
    if dist.is_initialized() and ctx.world_size > 1:
        dist.all_reduce(squares)
    return float(squares.sqrt())


def clip_grads_(params: list[torch.nn.Parameter], norm: float, max_norm: float | None) -> float:
    """Scale gradients by min(1, max_norm / (norm + 1e-6)) in place (as torch's clip_grad_norm_)."""
    if max_norm is None:
        return 1.0
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return coef
