"""GPTQ (Frantar et al., 2022): 4-bit weights that minimise each layer's output error on
calibration inputs, ||W X - Q X||^2, instead of each weight's own rounding error.

    H = 2 X X^T / n                   (the layer's Hessian, from calibration activations X [K, n])
    H += damp * mean(diag H) * I;  U = cholesky(H^-1, upper)
    for each column k (in act-order: by decreasing diag H):
        q_k = quant(w_k)              (the group's scale and zero found from the updated weights
                                       when the column starts a group)
        e = (w_k - q_k) / U[k, k];  w_j -= e U[k, j] for the columns j > k still unquantized
    done in blocks of 128 columns ("lazy batch" updates), as the paper's Algorithm 1.

Rows are independent given H, so a fused layer (q, k, v or gate, up: one input) is quantized at
once. `quantize_gptq_model` runs calibration block by block, each block seeing the outputs of
the blocks already quantized (the paper's sequential scheme).
"""

from __future__ import annotations

import torch
from torch import nn

from shardwright.models.quant import GroupQuant, find_params, quantize_values
from shardwright.parallel.layers import ColumnParallelLinear, RowParallelLinear


def gptq(w: torch.Tensor, hessian: torch.Tensor, *, bits: int = 4, group_size: int = 128, sym: bool = False,
         act_order: bool = False, damp: float = 0.01, block_size: int = 128) -> GroupQuant:
    """GPTQ of a [N, K] weight given its Hessian [K, K]; returns the integers in column order."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features={k} does not divide by group_size={group_size}")
    W, H = w.detach().double().clone(), hessian.detach().double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    block_size = max(block_size // group_size, 1) * group_size  # groups never straddle blocks
    q = torch.zeros(n, k, dtype=torch.int32)
    scales, zeros = [], []
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        W1, err = W[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=W.dtype)
        for i in range(i2 - i1):
            if i % group_size == 0:
                scale, zero = (t.double() for t in find_params(W1[:, i:i + group_size], bits, sym))
                scales.append(scale)
                zeros.append(zero)
            col = W1[:, i]
            qi = quantize_values(col, scale, zero, bits).double()
            q[:, i1 + i] = qi.to(torch.int32)
            e = (col - scale * (qi - zero)) / U[i1 + i, i1 + i]
            W1[:, i:] -= e[:, None] * U[i1 + i, i1 + i:i2][None, :]
            err[:, i] = e
        W[:, i2:] -= err @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    g_idx = (torch.arange(k) // group_size)[inv]
    return GroupQuant(q[:, inv].contiguous(), torch.stack(scales, 1).float(), torch.stack(zeros, 1).float(),
                      g_idx, bits)


def layer_error(w: torch.Tensor, gq: GroupQuant, x: torch.Tensor) -> float:
    """||x W^T - x Q^T||^2 / ||x W^T||^2 over calibration rows x [n, K]: the error GPTQ minimises."""
    ref = x.double() @ w.double().t()
    return float(((ref - x.double() @ gq.dequantize().double().t()) ** 2).sum() / (ref ** 2).sum())


class HessianHook:
    """Accumulates H = 2 X^T X / n over the inputs a linear layer sees (a forward pre-hook)."""

    def __init__(self, module: nn.Module) -> None:
        k = module.weight.shape[1]
        self.h, self.n = torch.zeros(k, k, dtype=torch.float64), 0
        self.handle = module.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        self.h *= self.n / (self.n + x.shape[0])
        self.n += x.shape[0]
        self.h += 2.0 / self.n * x.t() @ x


class _Stop(Exception):
    pass


@torch.no_grad()
def quantize_gptq_model(model: nn.Module, windows: torch.Tensor, *, bits: int = 4, group_size: int = 128,
                        act_order: bool = False, damp: float = 0.01) -> dict[str, GroupQuant]:
    """GPTQ of every linear in the blocks of a single-process DecoderModel, block by block on the
    calibration token windows [num, seq]; returns module name -> GroupQuant and leaves the
    model's weights at their dequantized values (so each block calibrates on quantized inputs)."""
    positions = torch.arange(windows.shape[1])[None]
    out: dict[str, GroupQuant] = {}
    for b, block in enumerate(model.blocks):
        linears = {f"blocks.{b}.{n}": m for n, m in block.named_modules()
                   if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}
        hooks = {name: HessianHook(m) for name, m in linears.items()}
        stop = block.register_forward_hook(lambda *_: (_ for _ in ()).throw(_Stop()))
        try:
            for row in windows:
                try:
                    model(row[None], positions)
                except _Stop:
                    pass
        finally:
            stop.remove()
            for h in hooks.values():
                h.handle.remove()
        for name, m in linears.items():
            gq = gptq(m.weight, hooks[name].h, bits=bits, group_size=group_size, act_order=act_order, damp=damp)
            m.weight.copy_(gq.dequantize(m.weight.dtype))
            out[name] = gq
    return out
