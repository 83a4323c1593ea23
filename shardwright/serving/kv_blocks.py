"""Block allocator of the paged KV cache, owned by the controller (InferenceEngine).

The cache holds `num_blocks` blocks of `block_size` token slots; slot `b * block_size + o` is
offset `o` of block `b`. Each sequence has a block table: the list of its block ids, position
`p` living in slot `table[p // block_size] * block_size + p % block_size`.

Admission is by reservation: `reserve(seq_id, max_total_tokens)` succeeds only if every admitted
sequence can still grow to its own reservation. So a sequence that was admitted never fails for
lack of blocks in the middle of generation: blocks promised to it are never handed to another.

Prefix caching (`prefix_caching=True`): `reserve(..., prompt_ids)` starts the table with the
cached blocks of the prompt's longest cached prefix of full blocks (prefix_cache.py: a block is
found by the hash of its tokens and its predecessors'), never the whole prompt: at most
`(len(prompt_ids) - 1) // block_size` blocks, so the step computing the rest has a token to
sample. `cache_full_blocks(seq_id, n)` offers the full prompt blocks among positions [0, n)
once the plan writing them is dispatched. A cached block is shared by every table holding it
(reference counted) and is written only by the sequence that cached it: tables share only
leading full prompt blocks, and every sequence writes only from its first uncached position on.
A freed cached block is idle: kept with its hash, found again by a later prompt, and evicted
least recently used first, only when no uncached free block is left.

Guarantees (checked by tests/serving/test_kv_blocks.py and test_prefix_cache.py):
- block ids are in [0, num_blocks); a block in two tables is a cached full block at the same
  index of both; without prefix caching no block is in two tables at once;
- `num_free + num_used == num_blocks` at all times (idle cached blocks count as free), and
  `num_used` returns to 0 once every sequence has been freed;
- `num_committed = num_used + blocks promised and not yet allocated <= num_blocks`, shared
  blocks counted once; `ensure` within a sequence's reservation never fails.

Pure Python, no torch: every call is O(blocks it touches) (`slots` is O(end - start); `reserve`
with prefix caching also hashes the prompt, O(len(prompt_ids))).
"""

from __future__ import annotations

from collections.abc import Sequence

from shardwright.serving.prefix_cache import PrefixCache, block_hashes


class OutOfBlocksError(RuntimeError):
    """A sequence grew past its reservation and no unpromised block was left."""


class BlockManager:
    """Free list + per-sequence block tables + reservations (+ the prefix cache, when on).

    `free` of a sequence the manager does not know is a no-op returning 0, so that cancelling a
    request that already finished (and was freed) is harmless; every other call on an unknown
    sequence raises KeyError naming it.
    """

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1: the cache needs a block")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1 token per block")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0 first
        self._tables: dict[int, list[int]] = {}
        self._refs: dict[int, int] = {}  # block -> tables holding it (blocks in use only)
        self._reserved: dict[int, int] = {}  # seq_id -> blocks promised (its reservation)
        self._pending = 0  # sum over sequences of blocks promised and not yet in their table
        self._high_water = 0
        self._prefix = PrefixCache() if prefix_caching else None
        self._keys: dict[int, list] = {}  # seq_id -> hashes of its prompt's full blocks
        self._offered: dict[int, int] = {}  # seq_id -> leading blocks hit or offered to the cache
        self.num_hit_blocks = 0  # prompt blocks found in the cache, over all reservations
        self.num_hit_sequences = 0  # reservations that found at least one block

    # ----------------------------------------------------------------- counters
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def prefix_caching(self) -> bool:
        return self._prefix is not None

    @property
    def num_free(self) -> int:
        """Blocks in no table (some may be promised to a reservation; some cached and idle)."""
        return self._num_blocks - len(self._refs)

    @property
    def num_used(self) -> int:
        """Blocks currently in some sequence's table (a shared block counts once)."""
        return len(self._refs)

    @property
    def num_committed(self) -> int:
        """Blocks in use or promised: num_used + blocks reserved and not yet allocated."""
        return len(self._refs) + self._pending

    @property
    def num_uncommitted(self) -> int:
        """Blocks a new reservation (or growth past a reservation) may still take."""
        return self._num_blocks - self.num_committed

    @property
    def high_water(self) -> int:
        """The largest `num_used` seen since construction."""
        return self._high_water

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    @property
    def num_cached(self) -> int:
        """Blocks in the prefix cache (held or idle); 0 without prefix caching."""
        return self._prefix.num_cached if self._prefix else 0

    @property
    def num_idle_cached(self) -> int:
        """Cached blocks no sequence holds (counted in num_free; evicted when blocks run out)."""
        return self._prefix.num_idle if self._prefix else 0

    @property
    def num_prefill_tokens_saved(self) -> int:
        """Prompt tokens not computed because their blocks were found in the cache."""
        return self.num_hit_blocks * self._block_size

    def prefix_stats(self) -> dict[str, int | bool]:
        """The prefix cache's counters (for health and benchmarks)."""
        return {"enabled": self.prefix_caching, "cached_blocks": self.num_cached,
                "idle_cached_blocks": self.num_idle_cached, "hit_blocks": self.num_hit_blocks,
                "hit_sequences": self.num_hit_sequences,
                "prefill_tokens_saved": self.num_prefill_tokens_saved,
                "evictions": self._prefix.num_evictions if self._prefix else 0}

    def block_hash(self, block: int) -> bytes | None:
        """The prefix-cache key `block` holds, or None (not cached, or caching off)."""
        return self._prefix.key_of(block) if self._prefix else None

    # ---------------------------------------------------------------- admission
    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens (ceil division)."""
        return -(-num_tokens // self._block_size)

    def can_ever_fit(self, max_total_tokens: int) -> bool:
        """Whether a sequence of `max_total_tokens` fits even in an empty cache."""
        return self.blocks_for(max_total_tokens) <= self._num_blocks

    def reserve(self, seq_id: int, max_total_tokens: int, prompt_ids: Sequence[int] = ()) -> bool:
        """Promise `seq_id` the blocks for `max_total_tokens` tokens; False if they are not free.

        True means the promise is recorded; the table starts with the prefix-cache hits of
        `prompt_ids` (none without prefix caching or prompt), `len(block_table) * block_size`
        tokens whose K/V are already cached, and `ensure` grows it. Hits that are idle count
        against the free blocks; hits held by other sequences cost nothing more. False leaves
        everything unchanged. Raises ValueError if `seq_id` is already known.
        """
        if seq_id in self._tables:
            raise ValueError(f"seq_id={seq_id} already holds a reservation; free it first")
        if max_total_tokens < 1:
            raise ValueError(f"max_total_tokens={max_total_tokens} must be >= 1")
        need = self.blocks_for(max_total_tokens)
        keys = block_hashes(prompt_ids, self._block_size) if self._prefix and prompt_ids else []
        cap = min(len(prompt_ids) - 1, max_total_tokens) // self._block_size if keys else 0
        hits = self._prefix.match(keys[:cap]) if cap else []
        revived = sum(1 for b in hits if b not in self._refs)
        if revived + need - len(hits) > self.num_uncommitted:
            return False
        for b in hits:
            self._refs[b] = self._refs.get(b, 0) + 1
            self._prefix.hold(b)
        self._tables[seq_id] = list(hits)
        self._reserved[seq_id] = need
        self._pending += need - len(hits)
        if self._prefix is not None:
            self._keys[seq_id], self._offered[seq_id] = keys, len(hits)
            self.num_hit_blocks += len(hits)
            self.num_hit_sequences += bool(hits)
        self._high_water = max(self._high_water, self.num_used)
        return True

    # --------------------------------------------------------------- allocation
    def ensure(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens` tokens; return the (live) table.

        Never shrinks. Within the reservation it always succeeds; past it, it takes unpromised
        blocks or raises OutOfBlocksError naming the numbers (the table is left unchanged).
        New blocks come from the uncached free blocks first, then by evicting the least
        recently used idle cached block.
        """
        table = self._table(seq_id)
        extra = self.blocks_for(num_tokens) - len(table)
        if extra <= 0:
            return table
        promised = max(0, self._reserved[seq_id] - len(table))
        over = max(0, extra - promised)
        if over > self.num_uncommitted:
            raise OutOfBlocksError(
                f"seq_id={seq_id} needs {extra} more block(s) for {num_tokens} tokens, "
                f"{over} past its reservation of {self._reserved[seq_id]} block(s), but only "
                f"{self.num_uncommitted} of {self._num_blocks} blocks are unpromised; "
                "reserve the sequence's full length at admission"
            )
        self._pending -= extra - over
        self._reserved[seq_id] = max(self._reserved[seq_id], len(table) + extra)
        for _ in range(extra):
            block = self._take()
            self._refs[block] = 1
            table.append(block)
        self._high_water = max(self._high_water, self.num_used)
        return table

    def cache_full_blocks(self, seq_id: int, num_tokens: int) -> int:
        """Offer `seq_id`'s full prompt blocks within positions [0, num_tokens) to the prefix
        cache; the number newly cached. Call it when the plan writing those positions is
        dispatched: a later plan that finds them reads them after they are written (stages run
        plans in dispatch order, and a step writes its K/V before it attends). A block whose
        hash is already cached (by another block) stays private. No-op without prefix caching.
        """
        if self._prefix is None:
            return 0
        table, keys, start = self._table(seq_id), self._keys[seq_id], self._offered[seq_id]
        end = min(len(keys), num_tokens // self._block_size, len(table))
        added = sum(self._prefix.insert(table[i], keys[i]) for i in range(start, end))
        self._offered[seq_id] = max(start, end)
        return added

    def free(self, seq_id: int) -> int:
        """Return `seq_id`'s blocks and drop its reservation; the number of blocks it held.

        A block another table still holds stays in use; a cached one becomes idle (its tail
        blocks least recently used, so a prefix's root outlives its leaves); the rest go back
        to the free list. Idempotent: a sequence the manager does not know (never reserved, or
        already freed) is a no-op returning 0.
        """
        table = self._tables.pop(seq_id, None)
        if table is None:
            return 0
        self._pending -= max(0, self._reserved.pop(seq_id) - len(table))
        self._keys.pop(seq_id, None)
        self._offered.pop(seq_id, None)
        for block in reversed(table):
            left = self._refs[block] - 1
            if left:
                self._refs[block] = left
                continue
            del self._refs[block]
            if self._prefix is None or not self._prefix.release(block):
                self._free.append(block)
        return len(table)

    def _take(self) -> int:
        """An unused block: an uncached free one, else the LRU idle cached one (evicted)."""
        if self._free:
            return self._free.pop()
        block = self._prefix.evict() if self._prefix is not None else None
        if block is None:  # the reservation arithmetic makes this unreachable
            raise RuntimeError(f"no free block although {self.num_free} of {self._num_blocks} are "
                               "counted free: the block accounting is broken")
        return block

    # ------------------------------------------------------------------ lookups
    def block_table(self, seq_id: int) -> list[int]:
        """The live block table of `seq_id` (do not mutate; copy it to keep it)."""
        return self._table(seq_id)

    def slots(self, seq_id: int, start: int, end: int) -> list[int]:
        """Global slot ids of positions [start, end) of `seq_id`; they must be allocated."""
        table = self._table(seq_id)
        bs = self._block_size
        if not 0 <= start <= end <= len(table) * bs:
            raise ValueError(
                f"positions [{start}, {end}) of seq_id={seq_id} are outside its "
                f"{len(table)} block(s) x {bs} = {len(table) * bs} allocated slots; call ensure first"
            )
        return [table[p // bs] * bs + p % bs for p in range(start, end)]

    def _table(self, seq_id: int) -> list[int]:
        try:
            return self._tables[seq_id]
        except KeyError:
            raise KeyError(f"seq_id={seq_id} holds no blocks: reserve it first") from None
