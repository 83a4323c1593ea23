"""The MLPs of a decoder block, split over tensor parallelism: SwiGLU (Llama family) and GPT-2's.

x is [..., hidden]; each module gets the `ParallelContext` explicitly and builds only this rank's
columns (the hidden width split over TP, summed by the row-parallel output projection).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardwright.config import ModelSpec
from shardwright.parallel.collectives import copy_to_group
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.layers import ColumnParallelLinear, RowParallelLinear, RowRange, linear


def activation(name: str):
    if name == "silu":
        return F.silu
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    return F.relu


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused into one column-parallel matmul.
    `width` is its hidden width (default spec.intermediate_size; an expert's is spec.expert_size)."""

    def __init__(self, spec: ModelSpec, ctx: ParallelContext, *, width: int | None = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        cols = RowRange.even(width or spec.intermediate_size, ctx.tp_rank, ctx.tp)
        self.local = cols.length
        self.gate_up = ColumnParallelLinear(
            spec.hidden_size, [cols, cols], ctx.tp_group, bias=spec.mlp_bias, device=device, dtype=dtype
        )
        self.down = RowParallelLinear(
            cols, spec.hidden_size, ctx.tp_group, bias=spec.mlp_bias, device=device, dtype=dtype
        )
        self.act = activation(spec.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.local, dim=-1)
        if torch.is_grad_enabled():
            return self.down(self.act(gate) * up)
        # Inference: the product goes into act(gate)'s tensor, the same values without a second
        # fresh [tokens, width] tensor (a prefill's is tens of MB: new pages to fault in each layer).
        return self.down(self.act(gate).mul_(up))

    def partial(self, x: torch.Tensor, replica_group=None) -> torch.Tensor:
        """This rank's term of the output before the sum over TP (x already entered the group:
        `copy_to_group`); no bias (MoE experts carry none). `replica_group`: ranks that hold these
        same weights but apply them to other rows (the shared expert over EP): the weights enter it
        through the f op, so their gradients are summed over it."""
        gate_up, down = self.gate_up.weight, self.down.weight
        if replica_group is not None and torch.is_grad_enabled():
            gate_up, down = copy_to_group(gate_up, replica_group), copy_to_group(down, replica_group)
        gate, up = linear(x, gate_up).split(self.local, dim=-1)
        return linear(self.act(gate) * up, down)


class PlainMLP(nn.Module):
    """GPT-2: proj(act(fc(x)))."""

    def __init__(self, spec: ModelSpec, ctx: ParallelContext, *, device=None, dtype=None) -> None:
        super().__init__()
        cols = RowRange.even(spec.intermediate_size, ctx.tp_rank, ctx.tp)
        self.fc = ColumnParallelLinear(
            spec.hidden_size, [cols], ctx.tp_group, bias=spec.mlp_bias, device=device, dtype=dtype
        )
        self.proj = RowParallelLinear(
            cols, spec.hidden_size, ctx.tp_group, bias=spec.mlp_bias, device=device, dtype=dtype
        )
        self.act = activation(spec.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))
