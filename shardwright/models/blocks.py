"""Building blocks of a decoder layer, assembled from tensor-parallel layers.

Shapes: hidden states are [batch, tokens, hidden]; inside attention, q is
[batch, local_heads, tokens, head_dim] and k, v are [batch, local_kv_heads, tokens, head_dim].
Each module gets the `ParallelContext` explicitly and builds only this rank's slice.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from shardwright.config import ModelSpec
from shardwright.models.kv_cache import LayerKV
from shardwright.models.paged import PagedBatch, PagedKVCache, causal_mask, paged_attention, sdpa
from shardwright.models.rotary import Rotary
from shardwright.parallel.attention.plan import ShardPlan
from shardwright.parallel.attention.ring import ring_attention
from shardwright.parallel.collectives import copy_to_group, reduce_from_group
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.layers import ColumnParallelLinear, RowParallelLinear, RowRange, linear


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

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's term of the output before the sum over TP (x already entered the group:
        `copy_to_group`); no bias (MoE experts carry none)."""
        gate, up = linear(x, self.gate_up.weight).split(self.local, dim=-1)
        return linear(self.act(gate) * up, self.down.weight)


class MoEMLP(nn.Module):
    """Mixture of experts (Mixtral, Qwen2-MoE): each token goes to the top-k of `num_experts` gated MLPs.

    The router (replicated on every TP rank) takes softmax over all experts in float32, keeps the k
    largest probabilities and, with `moe_renormalize`, rescales them to sum to 1; the token's output is
    the weighted sum of its experts' outputs (+ sigmoid(x w_g) * shared_expert(x) for Qwen2-MoE). Each
    expert's hidden width is split over TP like a dense MLP's; every rank adds the weighted partial
    outputs of all its experts and the sum over TP happens once per layer (one all-reduce, not one per
    expert). The routing weights and the shared gate multiply those partial outputs, so their
    gradients are summed over TP (the f op), and routing is the same on every rank (same inputs and
    weights). Only the experts some token chose compute; no token is ever dropped.
    """

    def __init__(self, spec: ModelSpec, ctx: ParallelContext, *, device=None, dtype=None) -> None:
        super().__init__()
        h = spec.hidden_size
        self.top_k, self.renormalize, self.group = spec.experts_per_token, spec.moe_renormalize, ctx.tp_group
        self.router = nn.Linear(h, spec.num_experts, bias=False, device=device, dtype=dtype)
        self.experts = nn.ModuleList(GatedMLP(spec, ctx, width=spec.expert_size, device=device, dtype=dtype)
                                     for _ in range(spec.num_experts))
        self.shared = self.shared_gate = None
        if spec.shared_expert_intermediate_size:
            self.shared = GatedMLP(spec, ctx, width=spec.shared_expert_intermediate_size, device=device, dtype=dtype)
            self.shared_gate = nn.Linear(h, 1, bias=False, device=device, dtype=dtype)

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
        weights, chosen = self.route(x)
        weights = copy_to_group(weights, self.group)
        xs = copy_to_group(x, self.group)
        out = torch.zeros_like(x)
        counts = torch.bincount(chosen.reshape(-1), minlength=len(self.experts)).tolist()
        for e in (e for e, n in enumerate(counts) if n):
            tokens, slot = torch.where(chosen == e)
            y = self.experts[e].partial(xs.index_select(0, tokens))
            out.index_add_(0, tokens, (y * weights[tokens, slot, None]).to(x.dtype))
        if self.shared is not None:
            gate = copy_to_group(torch.sigmoid(linear(x, self.shared_gate.weight)), self.group)
            out = out + gate * self.shared.partial(xs)
        return reduce_from_group(out, self.group).view(shape)


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
