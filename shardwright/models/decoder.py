"""The decoder-only transformer (the Llama family, Gemma 2 included, and GPT-2), one pipeline stage of it per rank.

`DecoderModel(spec, ctx)` holds this rank's slice: the TP shard of the layers of its pipeline
stage, plus the embedding on the first stage and the final norm and LM head on the last. With
`ParallelContext.single()` it is the whole model in one process: the reference.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from shardwright.config import ModelSpec
from shardwright.models.blocks import DecoderBlock, make_norm
from shardwright.models.kv_cache import KVCache
from shardwright.models.paged import PagedBatch, PagedKVCache
from shardwright.models.rotary import Rotary
from shardwright.parallel.collectives import copy_to_group, gather_last_dim
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.layers import RowRange, VocabParallelEmbedding, linear

TORCH_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def stage_layers(num_layers: int, pp: int, pp_rank: int) -> range:
    """Contiguous layers of stage `pp_rank`; the first num_layers % pp stages get one extra."""
    base, extra = divmod(num_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


def vocab_logits(h: torch.Tensor, weight: torch.Tensor, rows: RowRange, group,
                 softcap: float | None = None) -> torch.Tensor:
    """Logits of this rank's vocabulary rows; padding rows past the real vocab are -inf.

    `h` is replicated over the TP group, so its gradient is summed over the group (the f op).
    With `softcap` (Gemma 2) each logit z becomes softcap*tanh(z/softcap), before the padding.
    """
    logits = linear(copy_to_group(h, group), weight)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    num_valid = max(0, rows.valid_stop - rows.start)
    if num_valid < rows.length:
        logits[..., num_valid:] = float("-inf")
    return logits


class DecoderModel(nn.Module):
    """One pipeline stage of a TP-sharded decoder.

    forward(x, positions, cache): x is token ids [batch, tokens] on the first stage, hidden
    states [batch, tokens, hidden] elsewhere; positions [batch, tokens] int. The last stage
    returns this rank's vocabulary slice of the logits [batch, tokens, local_vocab] (see
    `full_logits`), the others the hidden states for the next stage.
    """

    def __init__(self, spec: ModelSpec, ctx: ParallelContext, *, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.spec, self.ctx = spec, ctx
        dev = device if device is not None else ctx.device
        dtype = TORCH_DTYPES[spec.dtype]
        kw = {"device": dev, "dtype": dtype}
        self.layer_ids = stage_layers(spec.num_layers, ctx.pp, ctx.pp_rank)
        self.vocab_rows = RowRange.padded(spec.vocab_size, ctx.tp_rank, ctx.tp)
        self.embed = self.pos_embed = self.norm = self.lm_head = None
        if ctx.is_first_stage:
            self.embed = VocabParallelEmbedding(self.vocab_rows, spec.hidden_size, ctx.tp_group, **kw)
            if spec.architecture == "gpt2":
                self.pos_embed = nn.Embedding(spec.max_position_embeddings, spec.hidden_size, **kw)
        self.blocks = nn.ModuleList(DecoderBlock(spec, ctx, layer, **kw) for layer in self.layer_ids)
        if ctx.is_last_stage:
            self.norm = make_norm(spec, **kw)
            if not (spec.tie_word_embeddings and self.embed is not None):
                # Untied, or tied with the embedding on another stage: this stage keeps a copy
                # (loaded from the embedding tensor when tied).
                self.lm_head = nn.Linear(spec.hidden_size, self.vocab_rows.length, bias=False, **kw)
        self.rotary = None
        if spec.architecture == "llama":
            self.rotary = Rotary(spec.head_dim, spec.rope_theta, spec.rope_scaling)
        # Optional source of blocks' weights that are not resident (peer memory pooling): an
        # object with begin_pass() and a context manager layer(i); see shardwright.pool.fetch.
        self.layer_weights = None

    def _block_weights(self, i: int):
        return self.layer_weights.layer(i) if self.layer_weights is not None else nullcontext()

    @property
    def dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.spec.dtype]

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None = None,
                plan=None) -> torch.Tensor:
        """`plan` (a parallel.attention ShardPlan): x [1, tokens] is this CP rank's share of a
        packed batch and attention is ring attention over the CP group (training)."""
        h = self._embed(x, positions) if self.embed is not None else x
        rotary = None
        if self.rotary is not None:
            rotary = (self.rotary, *self.rotary.cos_sin(positions, h.dtype))
        if self.layer_weights is not None:
            self.layer_weights.begin_pass()
        for i, block in enumerate(self.blocks):
            with self._block_weights(i):
                h = block(h, rotary, cache.layer(i) if cache is not None else None, plan)
        if cache is not None:
            cache.advance(positions.shape[-1])
        if self.norm is None:
            return h
        weight = self.lm_head.weight if self.lm_head is not None else self.embed.weight
        return vocab_logits(self.norm(h), weight, self.vocab_rows, self.ctx.tp_group, self.spec.final_logit_softcap)

    def forward_packed(self, x: torch.Tensor, batch: PagedBatch, cache: PagedKVCache) -> torch.Tensor:
        """One packed serving step over the paged cache.

        x: token ids [num_tokens] on the first stage, hidden states [num_tokens, hidden]
        elsewhere. Returns hidden states [num_tokens, hidden] for the next stage, or on the last
        stage this rank's vocabulary slice of the logits of the `batch.sample_index` tokens
        [num_sampled, local_vocab]. With cp > 1 a rank computes only its rows of the step
        (`batch.cp_share(cache).rows`, see paged_cp.py): hidden states in and out are those rows.
        """
        share = batch.cp_share(cache) if cache.cp > 1 else None
        positions = batch.positions if share is None else batch.positions[share.rows]
        positions = positions.unsqueeze(0)
        if self.embed is not None:
            ids = x if share is None else x[share.rows]
            h = self._embed(ids.unsqueeze(0), positions)
        else:
            h = x.unsqueeze(0)
        rotary = None
        if self.rotary is not None:
            rotary = (self.rotary, *self.rotary.cos_sin(positions, h.dtype))
        if self.layer_weights is not None:
            self.layer_weights.begin_pass()
        for i, block in enumerate(self.blocks):
            with self._block_weights(i):
                h = block.forward_packed(h, rotary, i, cache, batch)
        if self.norm is None:
            return h[0]
        if share is None:
            h = h[0].index_select(0, batch.sample_index)
        else:
            h = share.gather_samples(h[0], self.ctx.cp_group)
        weight = self.lm_head.weight if self.lm_head is not None else self.embed.weight
        return vocab_logits(self.norm(h), weight, self.vocab_rows, self.ctx.tp_group, self.spec.final_logit_softcap)

    def new_paged_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """A paged KV cache for this stage's layers and this rank's kv heads."""
        kv_heads = self.blocks[0].attn.num_kv_heads if len(self.blocks) else 0
        return PagedKVCache(len(self.blocks), num_blocks, block_size, kv_heads, self.spec.head_dim,
                            dtype=self.dtype, device=self.ctx.device, cp_rank=self.ctx.cp_rank, cp=self.ctx.cp,
                            cp_group=self.ctx.cp_group)

    def _embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        if self.spec.embedding_multiplier is not None:  # as transformers: the factor cast to the dtype first
            h = h * torch.tensor(self.spec.embedding_multiplier, dtype=h.dtype)
        return h if self.pos_embed is None else h + self.pos_embed(positions)

    def full_logits(self, local_logits: torch.Tensor) -> torch.Tensor:
        """All-gather the vocabulary slices into [..., vocab_size] logits (last stage only)."""
        return gather_last_dim(local_logits, self.ctx.tp_group)[..., : self.spec.vocab_size]

    def new_cache(self, batch: int, max_tokens: int) -> KVCache:
        """A contiguous KV cache for this stage's layers and this rank's kv heads."""
        first = self.blocks[0].attn if len(self.blocks) else None
        kv_heads = first.num_kv_heads if first is not None else 0
        return KVCache(len(self.blocks), batch, kv_heads, self.spec.head_dim, max_tokens,
                       dtype=self.dtype, device=self.ctx.device)
