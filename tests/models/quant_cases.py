"""Rank functions for the quantization tests (module level, so `spawn` can import them)."""

from __future__ import annotations

import torch

from shardwright.models import load_model
from tp_cases import context


def run_quant_logits(rank: int, world_size: int, directory: str, ids: torch.Tensor, quant: str, group_size: int):
    """Full logits of the model quantized on this rank after slicing."""
    _, model = load_model(directory, context(world_size), quant=quant, group_size=group_size)
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return model.full_logits(model(ids, positions))


def run_dequantized_weights(rank: int, world_size: int, directory: str, ids: torch.Tensor):
    """Each linear's dequantized local weight and the full logits of a (GPTQ-format) checkpoint."""
    from shardwright.models.quant import QuantizedWeight

    _, model = load_model(directory, context(world_size))
    weights = {n: m.weight.dequantize() for n, m in model.named_modules()
               if isinstance(getattr(m, "weight", None), QuantizedWeight)}
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        return weights, model.full_logits(model(ids, positions))
