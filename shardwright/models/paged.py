"""Paged KV cache and padding-free (packed) attention for the serving engine.

A step's tokens from many sequences are packed into one [num_tokens] batch: no pad tokens.
Keys and values live in fixed-size blocks; the controller's block tables map each sequence's
positions to *slots* (block_id * block_size + offset). Per layer the cache is two tensors of
shape [num_blocks * block_size, local_kv_heads, head_dim].

Attention for a step: the new K/V are written to their slots first; decode rows (one query
token) are attended in batched calls over keys gathered from their slots, grouped by context
length (`DecodeGroup`: a short row is not padded to the longest of the step; padded keys masked
out); prefill chunks are attended one sequence at a time with a causal offset mask.
The decode gather writes into two workspace tensors the cache keeps and reuses for every layer
and step, not into fresh ones: a fresh tensor of a long batch's keys is new memory each time,
page faults included (32 sequences x 300 keys x 4 x 64 fp32, one thread: median 5.0 ms fresh,
1.2 ms reused; 0.93 vs 0.68 ms best). Gathering nothing at all was tried: the same attention
written as indexed loads inside reductions and compiled with inductor (no K/V copy) ran slower
than gather + SDPA (32 x 48 keys fp32 0.67 vs 0.64 ms, bf16 0.58 vs 0.34 ms, 32 x 300 bf16
10.5 vs 4.0 ms) after 18-83 s of compiling, and SDPA beats plain matmul-softmax-matmul 1.5-10x.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    decode_groups: tuple[DecodeGroup, ...] = ()  # the one-token queries, by context length
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
        slots = _context_slots(block_tables, context_lens, block_size)
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

    def cp_share(self, cache: PagedKVCache):
        """This CP rank's part of the step (`paged_cp.CPShare`), built on first use."""
        share = self.__dict__.get("_cp_share")
        if share is None:
            from shardwright.models.paged_cp import CPShare

            share = CPShare.build(self, cache.block_size, cache.cp, cache.cp_rank)
            self.__dict__["_cp_share"] = share
        return share

    def _add_decode_group(self, device: torch.device) -> None:
        decode = [i for i, n in enumerate(self.query_lens) if n == 1]
        self.decode_groups = tuple(DecodeGroup.build([self.query_starts[i] for i in seqs],
                                                     [self.context_slots[i] for i in seqs], device)
                                   for seqs in _length_groups(decode, self.context_lens))


# Decode rows are attended in groups of similar context length, each padded to its longest: a row
# joins the group of the longest rows while its context is over this fraction of theirs, so at most
# a quarter of any row's keys are padding. One group padded to the longest of a mixed batch reads
# and gathers up to twice the keys (32 rows of 17-251 keys, mean 132, 4 kv heads x 64, one layer,
# 1 thread: 4.9 ms fp32 and 13.8 ms bf16 in one group; 2.2 and 7.1 ms with one call per row).
DECODE_GROUP_MIN_FRACTION = 0.75


def _length_groups(seqs: list[int], context_lens: list[int]) -> list[list[int]]:
    """`seqs` split into groups of similar context length (DECODE_GROUP_MIN_FRACTION), longest first."""
    groups: list[list[int]] = []
    for i in sorted(seqs, key=lambda i: -context_lens[i]):
        if groups and context_lens[i] > DECODE_GROUP_MIN_FRACTION * context_lens[groups[-1][0]]:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


@dataclass
class DecodeGroup:
    """One-token queries attended in one call: packed indices `rows` [n], their keys' `slots`
    [n, longest] (padded with slot 0) and, when their contexts differ in length, the key `mask`
    [n, 1, 1, longest] (True = attend; None: every row attends to all `longest` keys)."""

    rows: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor | None
    lens: list[int]
    window_masks: dict = field(default_factory=dict)  # window -> mask, made on first use

    @classmethod
    def build(cls, rows: list[int], context_slots: list[torch.Tensor], device: torch.device) -> DecodeGroup:
        lens = [int(s.numel()) for s in context_slots]
        longest = max(lens)
        mask = None
        if min(lens) == longest:
            slots = torch.stack(context_slots)
        else:
            slots = torch.zeros(len(rows), longest, dtype=torch.long)
            mask = torch.zeros(len(rows), longest, dtype=torch.bool)
            for row, (n, s) in enumerate(zip(lens, context_slots)):
                slots[row, :n] = s
                mask[row, :n] = True
            mask = mask.view(len(rows), 1, 1, longest).to(device)
        return cls(torch.tensor(rows, device=device), slots.to(device), mask, lens)

    def window_mask(self, window: int | None) -> torch.Tensor | None:
        """The key mask restricted to each row's last `window` keys (sliding-window attention)."""
        if window is None or max(self.lens) <= window:
            return self.mask
        if window not in self.window_masks:
            longest = self.slots.shape[1]
            lens = torch.tensor(self.lens, device=self.slots.device)[:, None]
            keys = torch.arange(longest, device=self.slots.device)[None, :]
            self.window_masks[window] = ((keys < lens) & (keys >= lens - window)).view(len(self.lens), 1, 1, longest)
        return self.window_masks[window]


def _context_slots(tables: list[list[int]], context_lens: list[int], block_size: int) -> list[torch.Tensor]:
    """Per sequence, the slots of its first context_lens[i] positions: rows of one [sequences,
    width * block_size] tensor computed at once (one op for the step, not a few per sequence)."""
    if not tables:
        return []
    width = max(len(t) for t in tables)
    table = torch.tensor([[*t, *[0] * (width - len(t))] for t in tables], dtype=torch.long)
    slots = (table[:, :, None] * block_size + torch.arange(block_size)).view(len(tables), width * block_size)
    return [slots[i, :n] for i, n in enumerate(context_lens)]


class PagedKVCache:
    """Per-layer key/value slot tensors [local blocks * block_size, kv_heads, head_dim].

    With context parallelism (cp > 1) the controller's `num_blocks` blocks are sharded over the
    CP ranks: block b lives on rank b % cp as local block b // cp, so each rank stores about
    1/cp of every long sequence's keys and values; prefill is ring attention over those shards
    and decode split-KV (`paged_cp.py`).
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
        self._workspace: dict[str, torch.Tensor] = {}

    def workspace(self, name: str, rows: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A reused [rows, kv_heads, head_dim] scratch tensor (the decode gather's keys or values),
        in `dtype` (default the cache's), grown to the largest `rows` asked for; its contents live
        until the next call for `name`."""
        buf = self._workspace.get(name)
        if buf is None or buf.shape[0] < rows:
            like = self.keys[0]
            buf = torch.empty((rows, *like.shape[1:]), dtype=dtype or like.dtype, device=like.device)
            self._workspace[name] = buf
        return buf[:rows]

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer `layer` at `slots` (any shape), [*slots.shape, kv_heads,
        head_dim], in the workspaces; in fp32 where attention runs in fp32 (`attention_dtype`)."""
        rows = slots.numel()
        keys = gather_slots(self.keys[layer], slots, self.workspace("keys", rows))
        values = gather_slots(self.values[layer], slots, self.workspace("values", rows))
        wide = attention_dtype(keys)
        if wide == keys.dtype:
            return keys, values
        return (self.workspace("keys_wide", rows, wide).view(keys.shape).copy_(keys),
                self.workspace("values_wide", rows, wide).view(values.shape).copy_(values))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, cache: PagedKVCache,
    batch: PagedBatch, scale: float, *, window: int | None = None, softcap: float | None = None,
) -> torch.Tensor:
    """Attention of packed queries over each sequence's paged context.

    q: [num_tokens, heads, head_dim]; k, v: [num_tokens, kv_heads, head_dim] (this step's
    tokens, written to the cache here). Returns [num_tokens, heads, head_dim]. With `window`
    (sliding-window attention) a query at position p sees keys at positions (p - window, p].
    Every key stays cached; the window is a mask. With `softcap` (Gemma 2) the scores s become
    softcap*tanh(s/softcap) before the mask (`softcapped_attention`).
    """
    if cache.cp > 1:  # q, k, v are this CP rank's rows of the step (see paged_cp.py)
        from shardwright.models.paged_cp import paged_attention_cp

        if window is not None:
            raise ValueError(f"sliding_window={window} is not supported with context parallelism "
                             f"(cp={cache.cp}); serve this model with cp=1")
        if softcap is not None:
            raise ValueError(f"attn_logit_softcap={softcap} is not supported with context parallelism "
                             f"(cp={cache.cp}); serve this model with cp=1")

        return paged_attention_cp(q, k, v, layer, cache, batch.cp_share(cache), scale)
    cache.keys[layer].index_copy_(0, batch.slot_mapping, k)
    cache.values[layer].index_copy_(0, batch.slot_mapping, v)
    out = torch.empty_like(q)
    gqa = q.shape[1] != k.shape[1]
    for group in batch.decode_groups:
        qd = q.index_select(0, group.rows).unsqueeze(2)  # [B, H, 1, D]
        kd, vd = (t.transpose(1, 2) for t in cache.gather(layer, group.slots))  # [B, KV, L, D]
        od = sdpa(qd, kd, vd, group.window_mask(window), scale, gqa, softcap=softcap)
        out.index_copy_(0, group.rows, od.squeeze(2))
    for i in batch.prefill_seqs:
        start, n, ctx = batch.query_starts[i], batch.query_lens[i], batch.context_lens[i]
        qs = q[start : start + n].transpose(0, 1).unsqueeze(0)
        if ctx == n:  # the whole context is this chunk: plain causal attention
            ks, vs = k[start : start + n], v[start : start + n]
            mask = None if window is None or ctx <= window else causal_mask(n, ctx, window, q.device)
        else:
            ks, vs = cache.gather(layer, batch.context_slots[i])
            mask = causal_mask(n, ctx, window, q.device)
        o = sdpa(qs, ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0), mask, scale,
                  gqa, causal=mask is None, softcap=softcap)
        out[start : start + n] = o[0].transpose(0, 1)
    return out


def gather_slots(cache: torch.Tensor, slots: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """cache[slots] for a slot tensor of any shape: index_select over the flattened slots, the
    same rows as advanced indexing at 2-4x its speed on CPU (measured: 32 x 48 slots of
    4 x 64 floats 0.09 vs 0.34 ms, 32 x 300 0.43 vs 2.1 ms); into `out` ([slots.numel(), ...]
    of the cache's row shape) when given."""
    flat = slots.reshape(-1)
    rows = cache.index_select(0, flat) if out is None else torch.index_select(cache, 0, flat, out=out)
    return rows.view(*slots.shape, *cache.shape[1:])


def causal_mask(num_queries: int, context: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[num_queries, context] True = attend, for the last `num_queries` of `context` positions:
    causal, and with `window` only the `window` most recent keys (the query's own included)."""
    past = context - num_queries
    keys = torch.arange(context, device=device)[None, :]
    query = (past + torch.arange(num_queries, device=device))[:, None]
    mask = keys <= query
    if window is not None:
        mask &= keys > query - window
    return mask


# SDPA's own grouped-query support (torch >= 2.5) reads each kv head for its query heads in place:
# at batch 32 it takes 0.6 ms where repeating k and v first takes 1.0 ms (48 keys; 5.4 vs 9.8 ms
# at 300), with the same result bit for bit. blocks.py uses it too.
SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


# On the CPU, attention over bf16 (or fp16) q, k, v runs in fp32, the output rounded once to the
# model's dtype: torch's CPU SDPA kernel is slow in bf16 and no more exact (32 decode rows of
# 17-251 keys, 12 heads over 4 kv heads x 64, 1 thread: 13.8 ms bf16, 4.6 ms upcast first; a causal
# prefill of 136 tokens 1.03 vs 0.91 ms; the error against fp64 is the same or smaller). The
# eager reference path (blocks.Attention) does the same, so the two stay comparable token for token.
def attention_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype attention over `t` computes in (`sdpa`)."""
    if t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    return t.dtype


def sdpa(q, k, v, mask, scale: float, gqa: bool, causal: bool = False,
         softcap: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked) v in `attention_dtype`, returned in q's dtype: q [b, heads,
    t, d], k and v [b, kv_heads, s, d] (`gqa`: heads > kv_heads), `mask` bool (True = attend) or
    None, `causal` for a square causal mask instead; with `softcap` `softcapped_attention`."""
    if softcap is not None:
        if causal:
            mask = causal_mask(q.shape[-2], k.shape[-2], None, q.device)
        return softcapped_attention(q, k, v, mask, scale, softcap)
    dtype, wide = q.dtype, attention_dtype(q)
    q, k, v = q.to(wide), k.to(wide), v.to(wide)
    if gqa and SDPA_HAS_GQA:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                             enable_gqa=True)
    else:
        if gqa:
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
    return out.to(dtype)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float, softcap: float) -> torch.Tensor:
    """softmax(softcap * tanh(q k^T * scale / softcap), masked) v, as transformers' eager Gemma 2
    attention computes it (SDPA has no soft-cap): q [b, heads, t, d], k and v [b, kv_heads, s, d]
    (each kv head serves heads / kv_heads consecutive query heads), `mask` a bool mask broadcasting
    to [b, heads, t, s] (True = attend) or None. The softmax runs in float32."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
