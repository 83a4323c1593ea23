"""What one rank of a layout keeps resident: weights by layer, KV cache, step activations.

Sizes come from the model built on the meta device for that rank's coordinates, so they are
exactly the bytes `load_model` would allocate there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from shardwright.config import ModelSpec, ParallelLayout
from shardwright.models.decoder import TORCH_DTYPES, DecoderModel
from shardwright.parallel.context import ParallelContext


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class ShardSizes:
    """Bytes of one rank's shard: per decoder layer of its stage, and everything else."""

    rank: int
    cp_rank: int
    layer_ids: tuple[int, ...]  # global layer index of each local layer
    layer_bytes: tuple[int, ...]
    other_weight_bytes: int  # embedding, final norm, LM head
    kv_bytes_per_token: int  # all local layers, keys and values
    hidden_size: int
    local_width: int  # widest local activation per token (qkv or the MLP's inner width)
    local_heads: int
    local_kv_heads: int
    head_dim: int
    vocab_size: int
    element_size: int

    @property
    def weight_bytes(self) -> int:
        return self.other_weight_bytes + sum(self.layer_bytes)

    def activation_bytes(self, num_tokens: int, decode_seqs: int, longest_context: int,
                         prefill_context: int = 0) -> int:
        """An upper estimate of the transient tensors of one step.

        Per token: hidden states, norms, residuals and the widest local projection; decode: the
        gathered keys and values of the batch padded to the longest context, and the scores;
        a prefill chunk: its context's keys, values and scores; the last stage's logits.
        """
        e = self.element_size
        per_token = num_tokens * (8 * self.hidden_size + 3 * self.local_width) * e
        decode = decode_seqs * longest_context * (2 * self.local_kv_heads * self.head_dim * e + self.local_heads * 4)
        prefill = prefill_context * (2 * self.local_kv_heads * self.head_dim * e) \
            + num_tokens * prefill_context * self.local_heads * 4
        logits = max(decode_seqs, 1) * self.vocab_size * 4 * 2
        return per_token + max(decode, prefill) + logits


def shard_sizes(spec: ModelSpec, layout: ParallelLayout, rank: int) -> ShardSizes:
    """The sizes of rank `rank`'s shard of `spec` under `layout` (no memory is touched)."""
    ctx = ParallelContext.coordinates(layout, rank)
    model = DecoderModel(spec, ctx, device="meta")
    layer_bytes = tuple(tensor_bytes(b.parameters()) for b in model.blocks)
    other = tensor_bytes(model.parameters()) - sum(layer_bytes)
    e = torch.empty((), dtype=TORCH_DTYPES[spec.dtype]).element_size()
    heads = kv_heads = width = 0
    if len(model.blocks):
        block = model.blocks[0]
        heads, kv_heads = block.attn.num_heads, block.attn.num_kv_heads
        width = max(p.shape[0] for p in block.parameters() if p.dim() == 2)
    kv_per_token = 2 * len(model.blocks) * kv_heads * spec.head_dim * e
    return ShardSizes(rank=rank, cp_rank=ctx.cp_rank, layer_ids=tuple(model.layer_ids), layer_bytes=layer_bytes,
                      other_weight_bytes=other, kv_bytes_per_token=kv_per_token, hidden_size=spec.hidden_size,
                      local_width=width, local_heads=heads, local_kv_heads=kv_heads, head_dim=spec.head_dim,
                      vocab_size=spec.vocab_size, element_size=e)
