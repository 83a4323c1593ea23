"""Context parallelism in a packed serving step: prefill with ring attention, decode with split-KV.

The paged KV cache is sharded over the CP ranks by block: block b lives on rank b % cp (see
`PagedKVCache`). A step's tokens are shared out the same way:

* a prefill token (its sequence has more than one query token in the step) is computed, through
  every layer, only by the rank that stores its K/V block, so prefill work and activations are
  split over the CP ranks, and each rank writes exactly the keys and values it computed;
* a decode token (one query token) is computed by every rank; its K/V is written by the rank
  that stores its block.

Attention, per layer:

* prefill (ring): every rank gathers the keys and values it holds of the step's prefill
  sequences (cached context and this step's new tokens) into one shard; the shards travel
  around the CP ring (P-1 exchanges, point-to-point, `RingComm`), and each rank attends its own
  prefill queries over every shard with the causal mask by position, merging the partial
  (out, lse) of each shard into its running result with `merge_attention_`, the merge shared
  with ring attention and split-KV decode. Every rank knows every other rank's shard layout
  from the block tables, so only K and V are sent.
* decode (split-KV): each rank computes every decode query's partial (out, lse) over the keys
  it holds; one all-gather and the exact merge (`gather_and_merge`) give the full result.

After the last layer the hidden states of the sampled tokens are assembled on every rank with
one all-reduce over the CP group (each sampled row is contributed by exactly one rank: its
block's owner for a prefill row, CP rank 0 for a decode row; the others add exact zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from shardwright.models.paged import gather_slots
from shardwright.parallel.attention.merge import merge_attention_
from shardwright.parallel.attention.ring import RingComm
from shardwright.parallel.attention.splitkv import gather_and_merge

QUERY_CHUNK = 256  # prefill partials: query rows per kernel call (keys past the chunk are skipped)
MASK_ELEMENTS = 1 << 22  # prefill partials go in query chunks of at most this many (query, key) pairs
_KV_TAG = 11


@dataclass
class Segment:
    """One sequence's keys in a rank's prefill shard: rows [start, start + count) of the shard."""

    seq: int
    start: int
    count: int
    positions: torch.Tensor  # [count] positions of those keys in the sequence


@dataclass
class CPShare:
    """This CP rank's part of one packed step (built once per step, shared by every layer)."""

    rows: torch.Tensor  # packed indices this rank computes (decode rows and its prefill rows)
    write_local: torch.Tensor  # indices into `rows` whose K/V this rank stores
    write_slots: torch.Tensor  # their local cache slots
    decode_local: torch.Tensor  # indices into `rows` of the decode rows (one per decode sequence)
    decode_slots: list[torch.Tensor]  # per decode row: local slots of its sequence's keys here
    decode_key_positions: list[torch.Tensor]
    decode_positions: torch.Tensor  # [num_decode] query positions
    prefill_local: torch.Tensor  # indices into `rows` of this rank's prefill rows (by sequence)
    prefill_positions: torch.Tensor  # their query positions
    prefill_ranges: dict[int, tuple[int, int]]  # seq -> its rows [a, b) within prefill_local
    shard_slots: torch.Tensor  # local slots of this rank's prefill shard, segment by segment
    shards: list[list[Segment]]  # per CP rank, the layout of its prefill shard
    sample_local: torch.Tensor  # [num_sampled] index into `rows`, or -1 where another rank adds it
    has_decode: bool
    has_prefill: bool

    @classmethod
    def build(cls, batch, block_size: int, cp: int, rank: int) -> CPShare:
        device = batch.positions.device
        owner, local_slot = owner_and_local_slot(batch.slot_mapping, block_size, cp)  # per token
        decode_seqs = [i for i, n in enumerate(batch.query_lens) if n == 1]
        is_decode = torch.zeros(batch.num_tokens, dtype=torch.bool, device=device)
        for i in decode_seqs:
            is_decode[batch.query_starts[i]] = True
        rows = (is_decode | (owner == rank)).nonzero().flatten()
        index_of = torch.full((batch.num_tokens,), -1, dtype=torch.long, device=device)
        index_of[rows] = torch.arange(rows.numel(), device=device)
        mine = owner[rows] == rank
        write_local = mine.nonzero().flatten()

        key_owner, key_local = zip(*(owner_and_local_slot(s, block_size, cp) for s in batch.context_slots)) \
            if batch.context_slots else ((), ())
        decode_slots, decode_keys = [], []
        for i in decode_seqs:
            here = (key_owner[i] == rank).nonzero().flatten()
            decode_slots.append(key_local[i][here])
            decode_keys.append(here)
        decode_local = index_of[[batch.query_starts[i] for i in decode_seqs]] if decode_seqs else \
            torch.zeros(0, dtype=torch.long, device=device)

        prefill_rows, ranges, shards, shard_slots = [], {}, [[] for _ in range(cp)], []
        for i in batch.prefill_seqs:
            start, n = batch.query_starts[i], batch.query_lens[i]
            seq_rows = torch.arange(start, start + n, device=device)
            seq_rows = seq_rows[owner[seq_rows] == rank]
            a = sum(r.numel() for r in prefill_rows)
            ranges[i] = (a, a + seq_rows.numel())
            prefill_rows.append(seq_rows)
            for j in range(cp):
                positions = (key_owner[i] == j).nonzero().flatten()
                offset = sum(s.count for s in shards[j])
                shards[j].append(Segment(i, offset, positions.numel(), positions))
                if j == rank:
                    shard_slots.append(key_local[i][positions])
        packed_prefill = torch.cat(prefill_rows) if prefill_rows else torch.zeros(0, dtype=torch.long, device=device)

        sample_local = torch.full((batch.sample_index.numel(),), -1, dtype=torch.long, device=device)
        for k, t in enumerate(batch.sample_index.tolist()):
            contributes = rank == 0 if bool(is_decode[t]) else int(owner[t]) == rank
            if contributes:
                sample_local[k] = index_of[t]
        return cls(
            rows=rows, write_local=write_local, write_slots=local_slot[rows[write_local]],
            decode_local=decode_local, decode_slots=decode_slots, decode_key_positions=decode_keys,
            decode_positions=batch.positions[[batch.query_starts[i] for i in decode_seqs]]
            if decode_seqs else torch.zeros(0, dtype=torch.long, device=device),
            prefill_local=index_of[packed_prefill], prefill_positions=batch.positions[packed_prefill],
            prefill_ranges=ranges,
            shard_slots=torch.cat(shard_slots) if shard_slots else torch.zeros(0, dtype=torch.long, device=device),
            shards=shards, sample_local=sample_local,
            has_decode=bool(decode_seqs), has_prefill=bool(batch.prefill_seqs),
        )

    def gather_samples(self, h: torch.Tensor, group) -> torch.Tensor:
        """Hidden states [num_sampled, hidden] of the sampled rows on every rank (one all-reduce
        over the CP group; each row comes from exactly one rank, the rest add exact zeros)."""
        out = h.new_zeros(self.sample_local.numel(), h.shape[-1])
        here = (self.sample_local >= 0).nonzero().flatten()
        out[here] = h[self.sample_local[here]]
        dist.all_reduce(out, group=group)
        return out


def owner_and_local_slot(slots: torch.Tensor, block_size: int, cp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For global cache slots: the CP rank storing each (block b on rank b % cp) and its slot in
    that rank's local cache (local block b // cp)."""
    block = slots // block_size
    return block % cp, (block // cp) * block_size + slots % block_size


def paged_attention_cp(q, k, v, layer: int, cache, share: CPShare, scale: float) -> torch.Tensor:
    """Attention of this rank's rows (q, k, v [len(share.rows), heads, head_dim]) over the
    CP-sharded paged cache (see the module docstring); collective over the CP group."""
    keys, values = cache.keys[layer], cache.values[layer]
    keys.index_copy_(0, share.write_slots, k.index_select(0, share.write_local))
    values.index_copy_(0, share.write_slots, v.index_select(0, share.write_local))
    out = torch.empty_like(q)
    if share.has_decode:
        qd = q.index_select(0, share.decode_local)
        part_out, part_lse = _new_partial(qd)
        for row, (slots, key_pos) in enumerate(zip(share.decode_slots, share.decode_key_positions)):
            if slots.numel():
                o, lse = _partial(qd[row:row + 1], gather_slots(keys, slots), gather_slots(values, slots),
                                  share.decode_positions[row:row + 1], key_pos, scale)
                part_out[row:row + 1], part_lse[:, row:row + 1] = o, lse
        merged, _ = gather_and_merge(part_out, part_lse, cache.cp_group)
        out.index_copy_(0, share.decode_local, merged.to(q.dtype))
    if share.has_prefill:
        qp = q.index_select(0, share.prefill_local)
        merged = _ring_prefill(qp, gather_slots(keys, share.shard_slots), gather_slots(values, share.shard_slots), share, scale,
                               cache.cp_group)
        out.index_copy_(0, share.prefill_local, merged.to(q.dtype))
    return out


def _ring_prefill(q, k, v, share: CPShare, scale: float, group) -> torch.Tensor:
    """This rank's prefill queries over every rank's prefill shard: P-1 K/V exchanges."""
    ring = RingComm(group)
    me, world = ring.rank, ring.size
    acc_out, acc_lse = _new_partial(q)
    kv = (k, v)
    for hop in range(world):
        src = (me - hop) % world
        pending = None
        if hop < world - 1:
            incoming = sum(s.count for s in share.shards[(src - 1) % world])
            pending = ring.exchange(kv, incoming, _KV_TAG)
        for seg in share.shards[src]:
            a, b = share.prefill_ranges[seg.seq]
            if a == b or seg.count == 0:
                continue
            rows = slice(seg.start, seg.start + seg.count)
            part = _partial(q[a:b], kv[0][rows], kv[1][rows], share.prefill_positions[a:b],
                            seg.positions, scale)
            merge_attention_(acc_out[a:b], acc_lse[:, a:b], *part)
        if pending is not None:
            kv = pending.wait()
    return acc_out


def _new_partial(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An empty running (out [n, H, D], lse [H, n]) in float32: rows that saw no key yet."""
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


def _partial(q, k, v, q_pos, k_pos, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [n, H, D], lse [H, n]) of queries at q_pos over keys at k_pos (key <= query), float32;
    both ascending. Queries go in chunks of QUERY_CHUNK rows (at most MASK_ELEMENTS (query, key)
    pairs), each over the prefix of keys its last query can see. A row that sees no key gets
    (0, -inf). On the CPU the fused flash kernel (`_flash_cpu`) does the work; elsewhere a
    plain masked softmax."""
    groups = q.shape[1] // k.shape[1]
    ks_all = k.float().transpose(0, 1).repeat_interleave(groups, dim=0)  # [H, m, D]
    vs_all = v.float().transpose(0, 1).repeat_interleave(groups, dim=0)
    out, lse = _new_partial(q)
    step = max(1, min(QUERY_CHUNK, MASK_ELEMENTS // max(1, k.shape[0])))
    for a in range(0, q.shape[0], step):
        b = min(q.shape[0], a + step)
        # positions ascend, so the keys a chunk can see are a prefix: skip the rest (causal)
        seen = int(torch.searchsorted(k_pos, q_pos[b - 1 : b], right=True)[0])
        if seen == 0:
            continue  # no key visible to any row of the chunk: it stays (0, -inf)
        ks, vs = ks_all[:, :seen], vs_all[:, :seen]
        visible = k_pos[None, :seen] <= q_pos[a:b, None]  # [n, seen]
        qs = q[a:b].float().transpose(0, 1)  # [H, n, D]
        if _flash_cpu is not None and q.device.type == "cpu":
            bias = torch.zeros(visible.shape, dtype=torch.float32).masked_fill_(~visible, float("-inf"))
            o, part_lse = _flash_cpu(qs[None], ks[None], vs[None], 0.0, False, attn_mask=bias, scale=scale)
            o, part_lse = o[0], part_lse[0]
        else:
            scores = torch.matmul(qs, ks.transpose(1, 2)).mul_(scale).masked_fill_(~visible, float("-inf"))
            part_lse = torch.logsumexp(scores, dim=-1)  # [H, n]
            shift = part_lse.masked_fill(part_lse.isinf(), 0.0).unsqueeze(-1)
            o = torch.matmul(scores.sub_(shift).exp_(), vs)
        blind = ~visible.any(dim=1)  # rows that see no key here: (0, -inf) exactly
        out[a:b] = o.transpose(0, 1).masked_fill(blind[:, None, None], 0.0)
        lse[:, a:b] = part_lse.masked_fill(blind[None, :], float("-inf"))
    return out, lse


# PyTorch's fused CPU flash-attention forward, which also returns the log-sum-exp (a private op;
# None if this build lacks it, and the plain path is used).
_flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
