"""Building blocks of a decoder layer, assembled from tensor-parallel layers.

Shapes: hidden states are [batch, tokens, hidden]; inside attention, q is
[batch, local_heads, tokens, head_dim] and k, v are [batch, local_kv_heads, tokens, head_dim].
Each module gets the `ParallelContext` explicitly and builds only this rank's slice.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shardwright.config import ModelSpec
from shardwright.models.kv_cache import LayerKV
from shardwright.models.mlp import GatedMLP, PlainMLP
from shardwright.models.moe import MoEMLP
from shardwright.models.paged import PagedBatch, PagedKVCache, causal_mask, paged_attention, sdpa
from shardwright.models.rotary import Rotary
from shardwright.parallel.attention.plan import ShardPlan
from shardwright.parallel.attention.ring import ring_attention
from shardwright.parallel.collectives import copy_to_group
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.layers import ColumnParallelLinear, RowParallelLinear, RowRange


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, normalised in float32 (as Hugging Face Llama: the cast
    back comes before the weight). With `unit_offset` (Gemma 2) the scale is (1 + weight) and is
    applied in float32 before the cast, as transformers' Gemma2RMSNorm does."""

    def __init__(self, dim: int, eps: float, *, unit_offset: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def make_norm(spec: ModelSpec, *, device=None, dtype=None) -> nn.Module:
    if spec.architecture == "llama":
        return RMSNorm(spec.hidden_size, spec.norm_eps, unit_offset=spec.norm_unit_offset, device=device, dtype=dtype)
    return nn.LayerNorm(spec.hidden_size, eps=spec.norm_eps, device=device, dtype=dtype)


def make_mlp(spec: ModelSpec, ctx: ParallelContext, layer: int = 0, *, device=None, dtype=None) -> nn.Module:
    if spec.is_moe_layer(layer):
        return MoEMLP(spec, ctx, device=device, dtype=dtype)
    cls = GatedMLP if spec.architecture == "llama" else PlainMLP
    return cls(spec, ctx, device=device, dtype=dtype)


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads split (or kv heads replicated) over TP.

    The fused qkv projection holds this rank's query heads, then its kv heads. When the model
    has fewer kv heads than TP ranks, each kv head is replicated on tp/num_kv_heads consecutive
    ranks and its weight gradient is summed over them.

    `layer` is the global layer index: it picks this layer's sliding window (`spec.window_of`),
    honoured by every path here (full prefill, KV-cache decode, paged steps). With `qk_norm`
    (Qwen3) q and k are RMS-normalised per head before RoPE; the norm weights are replicated
    over TP and their gradients summed over the group. With `attn_logit_softcap` (Gemma 2) the
    scores s become c*tanh(s/c) before the mask and softmax, in every path but context
    parallelism (refused: ring attention merges softmax pieces without it).
    """

    def __init__(self, spec: ModelSpec, ctx: ParallelContext, layer: int = 0, *, device=None, dtype=None) -> None:
        super().__init__()
        hd, tp = spec.head_dim, ctx.tp
        q_rows = RowRange.heads(spec.num_heads, hd, ctx.tp_rank, tp)
        kv_rows = RowRange.heads(spec.num_kv_heads, hd, ctx.tp_rank, tp)
        replicas = max(1, tp // spec.num_kv_heads)
        replicated = (q_rows.length, q_rows.length + 2 * kv_rows.length) if replicas > 1 else None
        self.qkv = ColumnParallelLinear(
            spec.hidden_size, [q_rows, kv_rows, kv_rows], ctx.tp_group,
            bias=spec.attention_bias or spec.qkv_bias,
            replicated_rows=replicated, replica_group=ctx.tp_subgroup(replicas),
            device=device, dtype=dtype,
        )
        self.o = RowParallelLinear(
            q_rows, spec.hidden_size, ctx.tp_group, bias=spec.attention_bias, device=device, dtype=dtype
        )
        self.head_dim = hd
        self.cp_group = ctx.cp_group
        self.num_heads = q_rows.length // hd
        self.num_kv_heads = kv_rows.length // hd
        self.scale = 1.0 / math.sqrt(spec.query_pre_attn_scalar or hd)
        self.softcap = spec.attn_logit_softcap
        self.window = spec.window_of(layer)
        self.tp_group = ctx.tp_group
        self.q_norm = self.k_norm = None
        if spec.qk_norm:
            self.q_norm = RMSNorm(hd, spec.norm_eps, device=device, dtype=dtype)
            self.k_norm = RMSNorm(hd, spec.norm_eps, device=device, dtype=dtype)

    def _project(self, x: torch.Tensor, rotary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [b, heads, t, d], k and v [b, kv_heads, t, d] of x [b, t, hidden], RoPE applied."""
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2, dim=-1
        )
        q = q.view(b, t, self.num_heads, self.head_dim)
        k = k.view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self._head_norm(self.q_norm, q), self._head_norm(self.k_norm, k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if rotary is not None:
            rope, cos, sin = rotary
            q, k = rope(q, k, cos, sin)
        return q, k, v

    def _head_norm(self, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
        """RMSNorm over the last dim with the weight entering through the f op: it is replicated
        while each rank normalises different heads, so its gradient is summed over TP."""
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
        return copy_to_group(norm.weight, self.tp_group) * h.to(x.dtype)

    def forward(self, x: torch.Tensor, rotary, cache: LayerKV | None, plan: ShardPlan | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self._project(x, rotary)
        if plan is not None and self.window is not None:
            raise ValueError(f"sliding_window={self.window} is not supported with context parallelism (cp > 1); "
                             "use cp=1 for this model")
        if plan is not None and self.softcap is not None:
            raise ValueError(f"attn_logit_softcap={self.softcap} is not supported with context parallelism "
                             "(cp > 1); use cp=1 for this model")
        if plan is not None:  # context parallel: x is this CP rank's share of a packed batch (b = 1)
            out, _ = ring_attention(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), plan,
                                    self.cp_group, causal=True, softmax_scale=self.scale)
            return self.o(out.reshape(1, t, self.num_heads * self.head_dim))
        past = 0
        if cache is not None:
            past = cache.cache.length
            k, v = cache.append(k, v)
        out = self._attend(q, k, v, past)
        return self.o(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

    def forward_packed(self, x: torch.Tensor, rotary, layer: int, cache: PagedKVCache,
                       batch: PagedBatch) -> torch.Tensor:
        """x [1, num_tokens, hidden] of a packed step; attention over the paged cache."""
        n = x.shape[1]
        q, k, v = (t[0].transpose(0, 1) for t in self._project(x, rotary))  # [n, heads, d]
        out = paged_attention(q, k, v, layer, cache, batch, self.scale, window=self.window, softcap=self.softcap)
        return self.o(out.reshape(1, n, self.num_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int) -> torch.Tensor:
        t = q.shape[2]
        gqa = self.num_heads != self.num_kv_heads
        windowed = self.window is not None and past + t > self.window
        if past == 0 and not windowed:
            return sdpa(q, k, v, None, self.scale, gqa, causal=t > 1, softcap=self.softcap)
        if t == 1 and not windowed:
            return sdpa(q, k, v, None, self.scale, gqa, softcap=self.softcap)
        return sdpa(q, k, v, causal_mask(t, past + t, self.window, q.device), self.scale, gqa, softcap=self.softcap)


class DecoderBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm1(x)), then + mlp(norm2(x)); `layer` is its global index.

    With `spec.post_norms` (Gemma 2, "sandwich" norms) each sublayer's output is normalised too
    before the add: x + post1(attn(norm1(x))), then + post2(mlp(norm2(x))).
    """

    def __init__(self, spec: ModelSpec, ctx: ParallelContext, layer: int = 0, *, device=None, dtype=None) -> None:
        super().__init__()
        self.attn_norm = make_norm(spec, device=device, dtype=dtype)
        self.attn = Attention(spec, ctx, layer, device=device, dtype=dtype)
        self.mlp_norm = make_norm(spec, device=device, dtype=dtype)
        self.mlp = make_mlp(spec, ctx, layer, device=device, dtype=dtype)
        self.attn_post_norm = self.mlp_post_norm = None
        if spec.post_norms:
            self.attn_post_norm = make_norm(spec, device=device, dtype=dtype)
            self.mlp_post_norm = make_norm(spec, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, rotary, cache: LayerKV | None, plan: ShardPlan | None = None) -> torch.Tensor:
        x = x + self._post(self.attn_post_norm, self.attn(self.attn_norm(x), rotary, cache, plan))
        return x + self._post(self.mlp_post_norm, self.mlp(self.mlp_norm(x)))

    def forward_packed(self, x: torch.Tensor, rotary, layer: int, cache: PagedKVCache,
                       batch: PagedBatch) -> torch.Tensor:
        attn = self.attn.forward_packed(self.attn_norm(x), rotary, layer, cache, batch)
        x = x + self._post(self.attn_post_norm, attn)
        return x + self._post(self.mlp_post_norm, self.mlp(self.mlp_norm(x)))

    @staticmethod
    def _post(norm: nn.Module | None, h: torch.Tensor) -> torch.Tensor:
        return h if norm is None else norm(h)
