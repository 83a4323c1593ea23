"""Mixture-of-experts layers (Mixtral, Qwen2-MoE) with tensor and expert parallelism, and the
router's load-balancing loss.

`MoEMLP`: each token goes to the top-k of `num_experts` gated MLPs. The router (replicated on every
rank) takes softmax over all experts in float32, keeps the k largest probabilities and, with
`moe_renormalize`, rescales them to sum to 1; the token's output is the weighted sum of its
experts' outputs (+ sigmoid(x w_g) * shared_expert(x) for Qwen2-MoE). Only the experts some token
chose compute; no token is ever dropped.

- TP: each expert's hidden width is split over TP like a dense MLP's; every rank adds the weighted
  partial outputs of all its experts and the sum over TP happens once per layer (one all-reduce).
  The routing weights and the shared gate multiply those partial outputs, so their gradients are
  summed over TP (the f op).
- EP (`ParallelLayout.ep`): rank o of an EP group holds the contiguous experts
  [o*E/ep, (o+1)*E/ep) (`parallel.experts.expert_range`), named by their global index, so a shard's
  parameter names are the ep = 1 model's. The layer's input is replicated over EP; every rank
  routes all rows (the router is cheap, and its gradient then needs no sum), takes its share of
  the rows, dispatches their routed pairs to the experts' owners by all-to-all, combines the outputs
  back, adds its rows' shared-expert term, sums over TP and all-gathers the rows over EP
  (parallel/experts.py). The shared expert and its gate are replicated over EP and applied to each
  rank's rows only, so their gradients are summed over EP (the f op).

Expert pooling (pool/experts.py): when a rank's experts do not all fit its budget, some experts'
parameters stay on the meta device and `expert_weights` (an object set by the pool) binds them
while they compute: `routed(index, x)` is told each forward's input (so the pool can apply the next
MoE layer's router to it and fetch that layer's predicted experts ahead), and `bound(index, used)`
yields the experts this layer uses, each one's weights bound while the loop body computes it. The
experts compute the same rows with the same weights in either case, so the output is the same.

`record_router_logits(model)` collects every MoE layer's router logits during a forward, for
`load_balancing_loss` (transformers' `load_balancing_loss_func`, Switch Transformer eq. 4-6).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from shardwright.config import ModelSpec
from shardwright.models.mlp import GatedMLP
from shardwright.parallel.collectives import copy_to_group, reduce_from_group
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.experts import (ExpertCommStats, combine, dispatch, expert_range, gather_rows, row_range,
                                          split_rows)
from shardwright.parallel.layers import linear


class MoEMLP(nn.Module):
    """A mixture-of-experts MLP over x [..., hidden] (see the module docstring)."""

    def __init__(self, spec: ModelSpec, ctx: ParallelContext, *, device=None, dtype=None) -> None:
        super().__init__()
        h = spec.hidden_size
        self.top_k, self.renormalize, self.num_experts = spec.experts_per_token, spec.moe_renormalize, spec.num_experts
        self.group, self.ep_group, self.ep_rank, self.ep = ctx.tp_group, ctx.ep_group, ctx.ep_rank, ctx.ep
        self.owned = expert_range(spec.num_experts, ctx.ep_rank, ctx.ep)
        self.router = nn.Linear(h, spec.num_experts, bias=False, device=device, dtype=dtype)
        self.experts = nn.ModuleDict({str(e): GatedMLP(spec, ctx, width=spec.expert_size, device=device, dtype=dtype)
                                      for e in self.owned})
        self.shared = self.shared_gate = None
        if spec.shared_expert_intermediate_size:
            self.shared = GatedMLP(spec, ctx, width=spec.shared_expert_intermediate_size, device=device, dtype=dtype)
            self.shared_gate = nn.Linear(h, 1, bias=False, device=device, dtype=dtype)
        self.comm_stats: ExpertCommStats | None = None  # what the all-to-alls carry, when attached
        self.router_logits_sink: list[torch.Tensor] | None = None  # set by record_router_logits
        self.expert_weights = None  # the expert pool binding pooled experts (see the module docstring)
        self.pool_index = 0  # this layer's index among the pool's MoE layers

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [tokens, k] float32, expert ids [tokens, k]) for x [tokens, hidden]."""
        probs = torch.softmax(linear(x, self.router.weight).float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        if self.router_logits_sink is not None:
            self.router_logits_sink.append(linear(x, self.router.weight))
        weights, chosen = self.route(x)  # every row, identically on every EP rank
        if self.expert_weights is not None:
            self.expert_weights.routed(self.pool_index, x)
        rows = row_range(x.shape[0], self.ep_rank, self.ep)
        mine, weights = split_rows(x, self.ep_group), split_rows(weights, self.ep_group)
        chosen = chosen[rows.start:rows.stop]
        xs = copy_to_group(mine, self.group)
        out = self._routed(xs, copy_to_group(weights, self.group), chosen)
        if self.shared is not None:
            gate_w = self.shared_gate.weight
            if self.ep_group is not None and torch.is_grad_enabled():
                gate_w = copy_to_group(gate_w, self.ep_group)
            gate = copy_to_group(torch.sigmoid(linear(mine, gate_w)), self.group)
            out = out + gate * self.shared.partial(xs, self.ep_group)
        out = reduce_from_group(out, self.group)
        return gather_rows(out, x.shape[0], self.ep_group).view(shape)

    def _routed(self, xs: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """The weighted sum of each row's experts' partial outputs (pairs sent to the experts' owners
        and back)."""
        received, sent = dispatch(xs, chosen, self.num_experts, self.ep_group, self.comm_stats)
        back = combine(self._experts(received, sent.recv_experts), sent, self.ep_group, self.comm_stats)
        pair_weights = weights.reshape(-1).index_select(0, sent.order)
        out = torch.zeros_like(xs)
        out.index_add_(0, sent.order // self.top_k, (back * pair_weights[:, None]).to(xs.dtype))
        return out

    def _experts(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        """Each row through its (local) expert; rows of one expert computed together, in place.

        An expert no row chose does not compute: its (empty) chunk stands for its output, so the
        result stays in the autograd graph of `rows` even when this rank received no row at all.
        Then every EP rank runs the same all-to-alls in backward whatever the routing (a rank whose
        experts went unused would otherwise skip them and its peers would wait forever)."""
        order = torch.argsort(local_ids, stable=True)
        counts = torch.bincount(local_ids, minlength=len(self.owned)).tolist()
        outs = dict(zip(self.owned, rows.index_select(0, order).split(counts)))
        used = [e for e, n in zip(self.owned, counts) if n]
        for e in used if self.expert_weights is None else self.expert_weights.bound(self.pool_index, used):
            outs[e] = self.experts[str(e)].partial(outs[e])
        return torch.cat([outs[e] for e in self.owned]).index_select(0, torch.argsort(order))


def moe_layers(model: nn.Module) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def attach_comm_stats(model: nn.Module, stats: ExpertCommStats | None) -> None:
    """Every MoE layer of `model` adds what its all-to-alls carry to `stats` (None detaches)."""
    for layer in moe_layers(model):
        layer.comm_stats = stats


@contextmanager
def record_router_logits(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Within the block, each forward of a MoE layer of `model` appends its router logits
    [tokens, num_experts] (every row, in the model dtype, with gradient) to the yielded list."""
    sink: list[torch.Tensor] = []
    layers = moe_layers(model)
    for layer in layers:
        layer.router_logits_sink = sink
    try:
        yield sink
    finally:
        for layer in layers:
            layer.router_logits_sink = None


def load_balancing_loss(router_logits: list[torch.Tensor], num_experts: int, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss as transformers' `load_balancing_loss_func` computes it
    (no attention mask: every row counts): over the rows of all layers together, f_e = share of the
    top-k assignments that went to expert e, P_e = mean router probability of e;
    loss = num_experts * sum_e f_e * P_e. f carries no gradient; P does, through the router."""
    counts = torch.zeros(num_experts, dtype=torch.float32, device=router_logits[0].device)
    prob_sum = torch.zeros_like(counts)
    rows = 0
    for logits in router_logits:
        probs = torch.softmax(logits, dim=-1)
        _, chosen = torch.topk(probs, top_k, dim=-1)
        counts = counts + torch.bincount(chosen.reshape(-1), minlength=num_experts).float()
        prob_sum = prob_sum + probs.float().sum(dim=0)
        rows += logits.shape[0]
    return num_experts * torch.sum((counts / rows) * (prob_sum / rows))
