"""Weight-only quantization of the linear layers of a loaded shard (pure torch, inference only).

    quantize_model(model, "int8")                 # per output channel, symmetric
    quantize_model(model, "int4", group_size=32)  # group-wise RTN, asymmetric (zero points)

Each rank quantizes the slice it holds, after loading, so a row-parallel layer's groups are cut
from its own input features: the rank's in_features must divide by the group size.
On CPU the products run on torch's packed kernels (`torch._weight_int8pack_mm`,
`torch._weight_int4pack_mm_for_cpu`) with bf16 activations: at batch 1 on an 8192 x 4096 weight
(2 threads) int8 takes 1.3 ms with bf16 activations and 16 ms with fp32 ones, int4 (group 128)
1.3 ms vs 39 ms, so activations are cast to bf16 and the output back. Elsewhere, or with
`use_kernels=False`, the weight is dequantized and multiplied with F.linear (the reference path).
The LM head and the embedding stay unquantized.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from shardwright.parallel.layers import ColumnParallelLinear, RowParallelLinear

QuantMethod = Literal["int8", "int4"]
INT4_GROUP_SIZES = (32, 64, 128)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row INT8: q [N, K] int8, scale [N] fp32, w ~= q * scale[:, None]."""
    scale = (w.float().abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise RTN INT4 in torch's convention: q [N, K] in 0..15 (int32),
    scales and zeros [N, K / group_size] fp32, w ~= (q - 8) * scale + zero per group."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-12)
    q = torch.round((g - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(n, k), scale, lo + 8.0 * scale


class QuantizedWeight:
    """A quantized [out_features, in_features] weight that `parallel.layers.linear` calls.

    `linear(x, bias)` returns x W^T + b in x's dtype; `dequantize(dtype)` gives W back.
    """

    def __init__(self, w: torch.Tensor, method: QuantMethod, group_size: int, use_kernels: bool) -> None:
        self.method, self.group_size, self.shape = method, group_size, tuple(w.shape)
        self.device = w.device
        if method == "int8":
            self.q, self.scale = quantize_int8(w)
            self.zero = None
        else:
            self.q, self.scale, self.zero = quantize_int4(w, group_size)
        self.packed = self._pack() if use_kernels and w.device.type == "cpu" else None

    def _pack(self) -> torch.Tensor | None:
        if self.method == "int8":
            return self.q
        if not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
            return None
        self.scales_and_zeros = torch.stack([self.scale.t(), self.zero.t()], dim=-1).to(torch.bfloat16).contiguous()
        return torch._convert_weight_to_int4pack_for_cpu(self.q, 1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.method == "int8":
            return (self.q.float() * self.scale[:, None]).to(dtype)
        n, k = self.shape
        q = self.q.reshape(n, k // self.group_size, self.group_size).float()
        return ((q - 8.0) * self.scale[..., None] + self.zero[..., None]).reshape(n, k).to(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.dequantize(x.dtype), bias)
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.method == "int8":
            y = torch._weight_int8pack_mm(x2, self.packed, self.scale.to(torch.bfloat16))
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.shape[0])
        return y if bias is None else y + bias


def quantize_model(model: nn.Module, method: QuantMethod, *, group_size: int = 128,
                   use_kernels: bool = True) -> nn.Module:
    """Replace the weight of every column- and row-parallel linear in `model` by a
    QuantizedWeight, in place; the model is for inference (no gradients) from then on."""
    if method not in ("int8", "int4"):
        raise ValueError(f"quant={method!r} is not a method; choose 'int8' or 'int4'")
    if method == "int4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported for int4; choose one of {INT4_GROUP_SIZES}")
    for name, module in model.named_modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        w = module.weight.detach()
        if method == "int4" and w.shape[1] % group_size:
            raise ValueError(
                f"{name}: in_features={w.shape[1]} on this rank does not divide by group_size={group_size}; "
                f"choose a group size dividing it (row-parallel splits cut along groups) or a smaller tp")
        qw = QuantizedWeight(w, method, group_size, use_kernels)
        module._parameters.pop("weight")
        module.weight = qw
    return model
