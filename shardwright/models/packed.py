"""Pre-packed weights for the CPU GEMMs of a loaded shard (inference only).

    pack_model(model)   # every column/row-parallel linear and an untied LM head, in place

oneDNN multiplies against a weight reordered once into its blocked layout
(`torch.ops.mkldnn._reorder_linear_weight`) without re-packing it on every call.

bf16: the plain bf16 F.linear at 1-32 rows re-packs B each call. Measured on the first CI machine
(1 thread, weights in cache, min of 40): 2304 x 768 at 1 row 0.24 -> 0.15 ms, at 32 rows 0.31 ->
0.19 ms; 768 x 2048 0.20 -> 0.13 ms; the LM head 32000 x 768 at 32 rows 4.1 -> 3.1 ms. The packed
product gives the same values as F.linear bit for bit at 1-77 rows (measured), and rounds like any
other bf16 GEMM beyond.

fp32: on the present machine (AMD EPYC, AVX-512; 1 thread, CPU time, best of 10, machine loaded)
the packed product beats both `parallel.layers.linear` paths (F.linear and its weight-left
product) at every row count of a step: 4096 x 768 at 1 row 0.28 ms vs 0.70 (weight-left), at
8 rows 0.89 vs 2.6, at 32 rows 2.6 vs 3.8, at 1024 rows 61 vs 71; 768 x 2048 at 8 rows 0.25 vs
1.15, at 1024 rows 30 vs 35. (On the first CI machine, CPU not recorded, it was the other way round at
32 rows, 0.80 vs 0.31 ms; so fp32 is packed only where torch's kernels run at AVX-512, where
it was measured to pay: `FP32_PACKED`.) The fp32 packed product sums
over the input features in oneDNN's blocking, not MKL's: logits differ from the plain product's
in the last bits (within 1e-4 on the test models), greedy tokens are the same on every test.
"""

from __future__ import annotations

import torch
from torch import nn

from shardwright.parallel.layers import ColumnParallelLinear, RowParallelLinear

FP32_PACKED = torch.backends.cpu.get_cpu_capability() == "AVX512"
PACKED_DTYPES = (torch.bfloat16, torch.float32) if FP32_PACKED else (torch.bfloat16,)


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
