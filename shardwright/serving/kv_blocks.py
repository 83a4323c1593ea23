"""Block allocator of the paged KV cache, owned by the controller (InferenceEngine).

The cache holds `num_blocks` blocks of `block_size` token slots; slot `b * block_size + o` is
offset `o` of block `b`. Each sequence has a block table: the list of its block ids, position
`p` living in slot `table[p // block_size] * block_size + p % block_size`.

Admission is by reservation: `reserve(seq_id, max_total_tokens)` succeeds only if every admitted
sequence can still grow to its own reservation. So a sequence that was admitted never fails for
lack of blocks in the middle of generation: blocks promised to it are never handed to another.

Guarantees (checked by tests/serving/test_kv_blocks.py):
- block ids are in [0, num_blocks) and no block is in two tables at once;
- `num_free + num_used == num_blocks` at all times, and `num_used` returns to 0 once every
  sequence has been freed;
- `ensure` within a sequence's reservation never fails.

Pure Python, no torch: every call is O(blocks it touches) (`slots` is O(end - start)).
"""

from __future__ import annotations


class OutOfBlocksError(RuntimeError):
    """A sequence grew past its reservation and no unpromised block was left."""


class BlockManager:
    """Free list + per-sequence block tables + reservations.

    `free` of a sequence the manager does not know is a no-op returning 0, so that cancelling a
    request that already finished (and was freed) is harmless; every other call on an unknown
    sequence raises KeyError naming it.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1: the cache needs a block")
        if block_size < 1:
            raise ValueError(f"block_size={block_size} must be >= 1 token per block")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out 0 first
        self._tables: dict[int, list[int]] = {}
        self._reserved: dict[int, int] = {}  # seq_id -> blocks promised (its reservation)
        self._committed = 0  # sum over sequences of max(reserved, allocated)
        self._high_water = 0

    # ----------------------------------------------------------------- counters
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_free(self) -> int:
        """Blocks in no table (some may be promised to a reservation)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks currently in some sequence's table."""
        return self._num_blocks - len(self._free)

    @property
    def num_committed(self) -> int:
        """Blocks in use or promised: sum over sequences of max(reservation, allocated)."""
        return self._committed

    @property
    def num_uncommitted(self) -> int:
        """Blocks a new reservation (or growth past a reservation) may still take."""
        return self._num_blocks - self._committed

    @property
    def high_water(self) -> int:
        """The largest `num_used` seen since construction."""
        return self._high_water

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    # ---------------------------------------------------------------- admission
    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens (ceil division)."""
        return -(-num_tokens // self._block_size)

    def can_ever_fit(self, max_total_tokens: int) -> bool:
        """Whether a sequence of `max_total_tokens` fits even in an empty cache."""
        return self.blocks_for(max_total_tokens) <= self._num_blocks

    def reserve(self, seq_id: int, max_total_tokens: int) -> bool:
        """Promise `seq_id` the blocks for `max_total_tokens` tokens; False if they are not free.

        True means the promise is recorded (the table starts empty; `ensure` fills it). False
        leaves everything unchanged. Raises ValueError if `seq_id` is already known.
        """
        if seq_id in self._tables:
            raise ValueError(f"seq_id={seq_id} already holds a reservation; free it first")
        if max_total_tokens < 1:
            raise ValueError(f"max_total_tokens={max_total_tokens} must be >= 1")
        need = self.blocks_for(max_total_tokens)
        if need > self.num_uncommitted:
            return False
        self._tables[seq_id] = []
        self._reserved[seq_id] = need
        self._committed += need
        return True

    # --------------------------------------------------------------- allocation
    def ensure(self, seq_id: int, num_tokens: int) -> list[int]:
        """Grow `seq_id`'s table to hold `num_tokens` tokens; return the (live) table.

        Never shrinks. Within the reservation it always succeeds; past it, it takes unpromised
        blocks or raises OutOfBlocksError naming the numbers (the table is left unchanged).
        """
        table = self._table(seq_id)
        extra = self.blocks_for(num_tokens) - len(table)
        if extra <= 0:
            return table
        over = max(0, len(table) + extra - max(self._reserved[seq_id], len(table)))
        if over > self.num_uncommitted:
            raise OutOfBlocksError(
                f"seq_id={seq_id} needs {extra} more block(s) for {num_tokens} tokens, "
                f"{over} past its reservation of {self._reserved[seq_id]} block(s), but only "
                f"{self.num_uncommitted} of {self._num_blocks} blocks are unpromised; "
                "reserve the sequence's full length at admission"
            )
        self._committed += over
        table.extend(self._free.pop() for _ in range(extra))
        self._high_water = max(self._high_water, self.num_used)
        return table

    def free(self, seq_id: int) -> int:
        """Return `seq_id`'s blocks and drop its reservation; the number of blocks freed.

        Idempotent: a sequence the manager does not know (never reserved, or already freed)
        is a no-op returning 0.
        """
        table = self._tables.pop(seq_id, None)
        if table is None:
            return 0
        reserved = self._reserved.pop(seq_id)
        self._committed -= max(reserved, len(table))
        self._free.extend(reversed(table))
        return len(table)

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
