"""Pre-packed weights for the CPU GEMMs of a loaded shard (inference only).

    pack_model(model)   # every column/row-parallel linear and an untied LM head, in place

oneDNN multiplies against a weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`) without re-packing it on every call. It pays for
bf16: the plain bf16 F.linear at 1-32 rows re-packs B each call. Measured on the CI machine
(1 thread, weights in cache, min of 40): 2304 x 768 at 1 row 0.24 -> 0.15 ms, at 32 rows 0.31 ->
0.19 ms; 768 x 2048 0.20 -> 0.13 ms; the LM head 32000 x 768 at 32 rows 4.1 -> 3.1 ms. For fp32 the
packed oneDNN and MKL products are slower than `parallel.layers.linear` (its weight-left product):
2304 x 768 at 32 rows 0.31 ms plain, 0.73 MKL-packed, 0.80 oneDNN-packed; so fp32 weights are left
as they are (`packable`). The packed product gives the same values as F.linear bit for bit at
1-77 rows (measured), and rounds like any other bf16 GEMM beyond.

The whole decode step of llama-110m (`shardwright bench step --quick`, variants in turns, on a
machine shared with other jobs at load 15-46 on 2 cores, so wide ranges): bf16 packed over bf16
plain 1.4-1.8x (1 thread) and 1.0-1.6x (2 threads) in median step time at batch 1/8/32; over
fp32 1.3-2.7x and 1.1-1.8x.
"""

from __future__ import annotations

import torch
from torch import nn

from shardwright.parallel.layers import ColumnParallelLinear, RowParallelLinear

PACKED_DTYPES = (torch.bfloat16,)


def packable(weight) -> bool:
    """A plain CPU tensor weight whose packed product is faster than the plain one."""
    return (isinstance(weight, torch.Tensor) and weight.device.type == "cpu" and weight.dim() == 2
            and weight.dtype in PACKED_DTYPES and torch.backends.mkldnn.is_available())


class PackedWeight:
    """A [out_features, in_features] weight in oneDNN's blocked layout, called by
    `parallel.layers.linear` through `linear(x, bias)` (as a quantized weight is)."""

    def __init__(self, w: torch.Tensor) -> None:
        self.shape, self.dtype, self.device = tuple(w.shape), w.dtype, w.device
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().contiguous())

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if x.dtype != self.dtype or torch.is_grad_enabled():
            raise RuntimeError(f"a packed {self.dtype} weight is for {self.dtype} inference; got {x.dtype} "
                               f"input{' with gradients enabled' if torch.is_grad_enabled() else ''}")
        # The bias goes into the kernel: added to the fp32 sum before the one rounding to bf16,
        # as F.linear does (adding it afterwards rounds twice and changes greedy tokens).
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, bias, "none", [], "")


def pack_model(model: nn.Module) -> int:
    """Pack, in place, every packable weight of the model's column- and row-parallel linears and
    of an LM head of its own (a tied head stays the embedding's tensor); returns how many were
    packed. The model is for inference from then on. Quantize first: a quantized weight is not
    a tensor and is left as it is."""
    count = 0
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) or module is getattr(model, "lm_head", None):
            if packable(module._parameters.get("weight")):
                module.weight = PackedWeight(module._parameters.pop("weight"))
                count += 1
    return count
