"""Paged KV cache and padding-free (packed) attention for the serving engine.

A step's tokens from many sequences are packed into one [num_tokens] batch: no pad tokens.
Keys and values live in fixed-size blocks; the controller's block tables map each sequence's
positions to *slots* (block_id * block_size + offset). Per layer the cache is two tensors of
shape [num_blocks * block_size, local_kv_heads, head_dim].

Attention for a step: the new K/V are written to their slots first; decode rows (one query
token) are attended together in one batched call over keys gathered from their slots (padded
keys masked out); prefill chunks are attended one sequence at a time with a causal offset mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PagedBatch:
    """Tensors describing one packed step, built once per step and shared by every layer.

    token_ids/positions/slot_mapping: [num_tokens]. For each sequence i of the step,
    query tokens are [query_starts[i], query_starts[i] + query_lens[i]) of the packed batch and
    its context (cache after this step) has context_lens[i] tokens at `context_slots[i]`.
    `sample_index` [num_sampled] are the packed indices whose logits are needed.
    """

    token_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    query_starts: list[int]
    query_lens: list[int]
    context_lens: list[int]
    context_slots: list[torch.Tensor]
    sample_index: torch.Tensor
    decode_rows: torch.Tensor | None = None  # packed indices of one-token queries
    decode_slots: torch.Tensor | None = None  # [num_decode, max_context] slots (padded with 0)
    decode_mask: torch.Tensor | None = None  # [num_decode, 1, 1, max_context] True = attend
    prefill_seqs: tuple[int, ...] = ()  # sequence indices with more than one query token

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @classmethod
    def build(
        cls,
        token_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        query_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        sample_index: list[int],
        device: torch.device,
    ) -> PagedBatch:
        """Derive every per-step tensor from the controller's plan (plain Python lists)."""
        starts, acc = [], 0
        for n in query_lens:
            starts.append(acc)
            acc += n
        context_lens = [positions[s] + n for s, n in zip(starts, query_lens)]
        slots = [_slots(table, ctx, block_size) for table, ctx in zip(block_tables, context_lens)]
        batch = cls(
            token_ids=torch.tensor(token_ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            query_starts=starts, query_lens=list(query_lens), context_lens=context_lens,
            context_slots=[s.to(device) for s in slots],
            sample_index=torch.tensor(sample_index, dtype=torch.long, device=device),
            prefill_seqs=tuple(i for i, n in enumerate(query_lens) if n > 1),
        )
        batch._add_decode_group(device)
        return batch

    def _add_decode_group(self, device: torch.device) -> None:
        decode = [i for i, n in enumerate(self.query_lens) if n == 1]
        if not decode:
            return
        longest = max(self.context_lens[i] for i in decode)
        slots = torch.zeros(len(decode), longest, dtype=torch.long)
        mask = torch.zeros(len(decode), longest, dtype=torch.bool)
        for row, i in enumerate(decode):
            n = self.context_lens[i]
            slots[row, :n] = self.context_slots[i]
            mask[row, :n] = True
        self.decode_rows = torch.tensor([self.query_starts[i] for i in decode], device=device)
        self.decode_slots = slots.to(device)
        self.decode_mask = mask.view(len(decode), 1, 1, longest).to(device)


def _slots(table: list[int], num_tokens: int, block_size: int) -> torch.Tensor:
    blocks = torch.tensor(table, dtype=torch.long).repeat_interleave(block_size)
    offsets = torch.arange(block_size).repeat(len(table))
    return (blocks * block_size + offsets)[:num_tokens]


class PagedKVCache:
    """Per-layer key/value slot tensors [local blocks * block_size, kv_heads, head_dim].

    With context parallelism (cp > 1) the controller's `num_blocks` blocks are sharded over the
    CP ranks: block b lives on rank b % cp as local block b // cp, so each rank stores about
    1/cp of every long sequence's keys and values, and attention is split-KV (`paged_attention`).
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, *, dtype: torch.dtype, device: torch.device | str,
                 cp_rank: int = 0, cp: int = 1, cp_group=None) -> None:
        local_blocks = len(range(cp_rank, num_blocks, cp))
        shape = (local_blocks * block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size = num_blocks, block_size
        self.cp_rank, self.cp, self.cp_group = cp_rank, cp, cp_group

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, cache: PagedKVCache,
    batch: PagedBatch, scale: float,
) -> torch.Tensor:
    """Attention of packed queries over each sequence's paged context.

    q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim] (this step's
    tokens, written to the cache here). Returns [num_tokens, heads, head_dim].
    """
    if cache.cp > 1:
        return _paged_attention_cp(q, k, v, layer, cache, batch, scale)
    keys, values = cache.keys[layer], cache.values[layer]
    keys.index_copy_(0, batch.slot_mapping, k)
    values.index_copy_(0, batch.slot_mapping, v)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    if batch.decode_rows is not None:
        qd = q.index_select(0, batch.decode_rows).unsqueeze(2)  # [B, H, 1, D]
        kd = keys[batch.decode_slots].transpose(1, 2)  # [B, KV, L, D]
        vd = values[batch.decode_slots].transpose(1, 2)
        od = _sdpa(qd, kd, vd, batch.decode_mask, scale, gqa)
        out.index_copy_(0, batch.decode_rows, od.squeeze(2))
    for i in batch.prefill_seqs:
        start, n, ctx = batch.query_starts[i], batch.query_lens[i], batch.context_lens[i]
        qs = q[start : start + n].transpose(0, 1).unsqueeze(0)
        if ctx == n:  # the whole context is this chunk: plain causal attention
            ks, vs = k[start : start + n], v[start : start + n]
            mask = None
        else:
            ks, vs = keys[batch.context_slots[i]], values[batch.context_slots[i]]
            mask = _offset_causal_mask(n, ctx, q.device)
        o = _sdpa(qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0), mask, scale,
                  gqa, causal=mask is None)
        out[start : start + n] = o[0].transpose(0, 1)
    return out


@dataclass
class LocalShare:
    """This CP rank's share of a step: the new K/V rows it stores, and per sequence the local
    slots and positions of the context keys it holds."""

    write_rows: torch.Tensor
    write_slots: torch.Tensor
    slots: list[torch.Tensor]
    key_positions: list[torch.Tensor]

    @classmethod
    def build(cls, batch: PagedBatch, cache: PagedKVCache) -> LocalShare:
        bs, cp, r = cache.block_size, cache.cp, cache.cp_rank

        def local(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            block = slots // bs
            mine = (block % cp) == r
            return mine.nonzero().flatten(), (block[mine] // cp) * bs + slots[mine] % bs

        write_rows, write_slots = local(batch.slot_mapping)
        slots, positions = [], []
        for ctx_slots in batch.context_slots:
            idx, loc = local(ctx_slots)
            slots.append(loc)
            positions.append(idx)  # context slot i holds position i
        return cls(write_rows, write_slots, slots, positions)


def _paged_attention_cp(q, k, v, layer: int, cache: PagedKVCache, batch: PagedBatch, scale: float) -> torch.Tensor:
    """Split-KV attention over a CP-sharded cache: every rank has every query; each computes the
    partial (out, lse) over the keys it holds, then one all-gather and the exact merge
    (shardwright.parallel.attention.merge) give every rank the full result."""
    from shardwright.parallel.attention.splitkv import gather_and_merge

    share = batch.__dict__.get("_cp_share")
    if share is None:
        share = batch.__dict__["_cp_share"] = LocalShare.build(batch, cache)
    keys, values = cache.keys[layer], cache.values[layer]
    keys.index_copy_(0, share.write_slots, k.index_select(0, share.write_rows))
    values.index_copy_(0, share.write_slots, v.index_select(0, share.write_rows))
    heads = q.shape[1]
    groups = heads // k.shape[1]
    out = torch.zeros_like(q)
    lse = torch.full((heads, q.shape[0]), float("-inf"), dtype=q.dtype, device=q.device)
    for i, (start, n) in enumerate(zip(batch.query_starts, batch.query_lens)):
        if share.slots[i].numel() == 0:
            continue  # this rank holds none of the sequence: an empty split
        qs = q[start:start + n].transpose(0, 1)  # [H, n, D]
        ks = keys[share.slots[i]].transpose(0, 1).repeat_interleave(groups, dim=0)  # [H, m, D]
        vs = values[share.slots[i]].transpose(0, 1).repeat_interleave(groups, dim=0)
        scores = torch.matmul(qs, ks.transpose(1, 2)) * scale  # [H, n, m]
        q_pos = batch.positions[start:start + n]
        visible = share.key_positions[i][None, :] <= q_pos[:, None]  # [n, m]
        scores = scores.masked_fill(~visible, float("-inf"))
        part_lse = torch.logsumexp(scores, dim=-1)  # [H, n]; -inf where nothing is visible
        probs = torch.exp(scores - part_lse.unsqueeze(-1).masked_fill(part_lse.unsqueeze(-1).isinf(), 0))
        out[start:start + n] = torch.matmul(probs, vs).transpose(0, 1)
        lse[:, start:start + n] = part_lse
    merged, _ = gather_and_merge(out, lse, cache.cp_group)
    return merged.to(q.dtype)


def _offset_causal_mask(num_queries: int, context: int, device: torch.device) -> torch.Tensor:
    past = context - num_queries
    keys = torch.arange(context, device=device)
    return keys[None, :] <= (past + torch.arange(num_queries, device=device))[:, None]


def _sdpa(q, k, v, mask, scale: float, gqa: bool, causal: bool = False) -> torch.Tensor:
    if gqa:
        groups = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
