"""Weight-only quantization of the linear layers (pure torch, inference only).

One representation for every method, GPTQ's:  W[n, k] = scale[n, g] * (q[n, k] - zero[n, g]),
g = g_idx[k]  (a `GroupQuant`; integers q and zero in 0 .. 2^bits - 1, scales held in fp16 as
checkpoints store them). The methods only choose the integers:

    int8   8 bits, one group per row (group_size = in_features), symmetric (zero = 128)
    rtn4   4 bits, groups of `group_size` input features, asymmetric, round to nearest
    gptq4  4 bits like rtn4, with GPTQ's error compensation (models.gptq)

Quantization applies to the *global* (unsharded) checkpoint tensor, and each TP rank then takes
its slice of the integers (models.quant_format.QuantSource): every layout holds the same integers,
so tp=1 and tp=2 compute with identical weights. A row-parallel slice cuts along groups: its
start and length must be multiples of the group size (`check_group_layout`, a one-line error).

On CPU the products run on torch's packed kernels (`torch._weight_int8pack_mm`,
`torch._weight_int4pack_mm_for_cpu`) with bf16 activations: at batch 1 on an 8192 x 4096 weight
(2 threads) int8 takes 1.3 ms with bf16 activations and 16 ms with fp32 ones, int4 (group 128)
1.3 ms vs 39 ms, so activations are cast to bf16 and the output back. A GPTQ act-order weight
(g_idx not in column order) runs the int4 kernel on its columns permuted into group order (the
activations are permuted the same way). Elsewhere (CUDA, a layout the kernels cannot take), or
with `use_kernels=False`, the weight is dequantized and multiplied with F.linear (the reference).
The LM head and the embedding stay unquantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from shardwright.config import INT4_GROUP_SIZES, ModelSpec, ParallelLayout
from shardwright.parallel.layers import ColumnParallelLinear, RowParallelLinear

QuantMethod = Literal["int8", "rtn4"]  # applied while loading a float checkpoint
FP16_TINY = 2.0 ** -14  # smallest normal fp16: scales are stored in fp16


@dataclass
class GroupQuant:
    """Integers of one [N, K] weight: q [N, K] int32, scale and zero [N, G] fp32 (zero holds
    integers), g_idx [K] int64 (the group of each input feature), `bits` per integer."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        s, z = self.scale[:, self.g_idx], self.zero[:, self.g_idx]
        return (s * (self.q.float() - z)).to(dtype)

    def rows(self, start: int, stop: int) -> GroupQuant:
        """Output features [start, stop)."""
        return GroupQuant(self.q[start:stop], self.scale[start:stop], self.zero[start:stop], self.g_idx, self.bits)

    def cols(self, start: int, stop: int) -> GroupQuant:
        """Input features [start, stop), keeping only the groups they use (renumbered in order)."""
        g = self.g_idx[start:stop]
        used, g_local = torch.unique(g, sorted=True, return_inverse=True)
        return GroupQuant(self.q[:, start:stop], self.scale[:, used], self.zero[:, used], g_local, self.bits)

    @staticmethod
    def cat(parts: list[GroupQuant], what: str) -> GroupQuant:
        """Fused output features (q, k, v or gate, up): the parts must share their input groups."""
        if any(p.bits != parts[0].bits or not torch.equal(p.g_idx, parts[0].g_idx) for p in parts):
            raise ValueError(f"{what}: the fused parts were quantized with different groups (g_idx or bits); "
                             "quantize them from the same calibration inputs")
        return GroupQuant(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.zero for p in parts]), parts[0].g_idx, parts[0].bits)


def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's min-max quantizer over the last dim of w [..., n]: (scale, zero), zero an integer.
    The range always contains 0; symmetric puts zero at the middle (2^(bits-1))."""
    maxq = 2 ** bits - 1
    lo, hi = w.float().amin(dim=-1).clamp(max=0), w.float().amax(dim=-1).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = -hi
    scale = ((hi - lo) / maxq).clamp(min=FP16_TINY).half().float()
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to nearest on the grid of (scale, zero), broadcast over w: integers in 0 .. 2^bits - 1."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2 ** bits - 1)


def rtn(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> GroupQuant:
    """Round-to-nearest of a [N, K] weight in groups of `group_size` input features."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features={k} does not divide by group_size={group_size}")
    g = w.float().reshape(n, k // group_size, group_size)
    scale, zero = find_params(g, bits, sym)
    q = quantize_values(g, scale[..., None], zero[..., None], bits).to(torch.int32).reshape(n, k)
    return GroupQuant(q, scale, zero, torch.arange(k) // group_size, bits)


def quantize_method(w: torch.Tensor, method: QuantMethod, group_size: int) -> GroupQuant:
    """`method` ("int8" per row, "rtn4" per group) of a global [N, K] weight."""
    if method == "int8":
        return rtn(w, 8, w.shape[1], sym=True)
    if method == "rtn4":
        return rtn(w, 4, group_size, sym=False)
    raise ValueError(f"quant={method!r} is not a method; choose int8 or rtn4")


def check_method(method: str, group_size: int) -> None:
    if method not in ("int8", "rtn4"):
        raise ValueError(f"quant={method!r} is not a method; choose none, int8 or rtn4")
    if method == "rtn4" and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"group_size={group_size} is not supported for rtn4; choose one of {INT4_GROUP_SIZES}")


def check_group_layout(spec: ModelSpec, layout: ParallelLayout, group_size: int) -> None:
    """Refuse a group size that does not divide every rank's input features (row-parallel slices
    of o_proj and down_proj, and the full hidden size of the column-parallel ones)."""
    heads = spec.num_heads * spec.head_dim
    widths = [("hidden_size", spec.hidden_size), ("num_heads * head_dim / tp", heads // layout.tp),
              ("intermediate_size / tp", spec.intermediate_size // layout.tp)]
    if spec.num_experts:  # the experts' and the shared expert's down projections are row-parallel too
        widths.append(("moe_intermediate_size / tp", spec.expert_size // layout.tp))
    if spec.shared_expert_intermediate_size:
        widths.append(("shared_expert_intermediate_size / tp", spec.shared_expert_intermediate_size // layout.tp))
    for what, size in widths:
        if size % group_size:
            raise ValueError(f"group_size={group_size} does not divide {what}={size} at tp={layout.tp} "
                             "(row-parallel slices cut along groups); choose a smaller group size or tp")


class QuantizedWeight:
    """A quantized [out_features, in_features] weight that `parallel.layers.linear` calls.

    `linear(x, bias)` returns x W^T + b in x's dtype; `dequantize(dtype)` gives W back.
    """

    def __init__(self, gq: GroupQuant, use_kernels: bool = True, device: torch.device | str = "cpu") -> None:
        self.gq, self.shape = gq, gq.shape
        self.device = torch.device(device)
        self.kind, self.perm, self.packed = "dequantize", None, None
        if use_kernels and self.device.type == "cpu":
            self._pack()

    def _pack(self) -> None:
        gq = self.gq
        n, k = gq.shape
        if gq.bits == 8 and gq.scale.shape[1] == 1:
            q8 = gq.q - gq.zero.to(torch.int32)
            if int(q8.min()) >= -128 and int(q8.max()) <= 127:
                self.kind, self.packed = "int8", q8.to(torch.int8).contiguous()
                self.scale_bf16 = gq.scale[:, 0].to(torch.bfloat16)
            return
        groups = gq.scale.shape[1]
        if gq.bits != 4 or k % groups or k // groups not in INT4_GROUP_SIZES \
                or not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
            return
        self.group_size = k // groups
        perm = torch.argsort(gq.g_idx, stable=True)
        if not torch.equal(gq.g_idx[perm], torch.arange(k) // self.group_size):
            return  # groups of unequal sizes: only the reference path
        identity = torch.equal(perm, torch.arange(k))
        self.perm = None if identity else perm
        q = gq.q if identity else gq.q[:, perm]
        # torch's convention: W = (q - 8) * scale + zero_t, so zero_t = (8 - zero) * scale.
        zero_t = (8.0 - gq.zero) * gq.scale
        self.scales_and_zeros = torch.stack([gq.scale.t(), zero_t.t()], dim=-1).to(torch.bfloat16).contiguous()
        self.kind, self.packed = "int4", torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.gq.dequantize(dtype)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.dequantize(x.dtype).to(x.device), bias)
        x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        if self.perm is not None:
            x2 = x2[:, self.perm]
        if self.kind == "int8":
            y = torch._weight_int8pack_mm(x2, self.packed, self.scale_bf16)
        else:
            y = torch._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype).view(*x.shape[:-1], self.shape[0])
        return y if bias is None else y + bias

    @property
    def nbytes(self) -> int:
        """Bytes of the packed integers and scales this weight keeps (what a step reads)."""
        n, k = self.shape
        return n * k * self.gq.bits // 8 + self.gq.scale.numel() * 4


def set_quantized(module: nn.Module, qw: QuantizedWeight) -> None:
    """Replace `module.weight` (a Parameter) by the quantized weight."""
    module._parameters.pop("weight", None)
    module.weight = qw


def quantize_model(model: nn.Module, method: QuantMethod, *, group_size: int = 128,
                   use_kernels: bool = True) -> nn.Module:
    """Quantize every column- and row-parallel linear of a single-process `model` in place
    (its local weights are the global ones); for sharded models load with `load_model(quant=...)`."""
    check_method(method, group_size)
    for name, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            if method == "rtn4" and module.weight.shape[1] % group_size:
                raise ValueError(f"{name}: in_features={module.weight.shape[1]} does not divide by "
                                 f"group_size={group_size}; choose a group size dividing it")
            gq = quantize_method(module.weight.detach(), method, group_size)
            set_quantized(module, QuantizedWeight(gq, use_kernels, module.weight.device))
    return model
