"""The controller's accounting of KV blocks spilled to the workers' host memory (and back).

A running sequence that is paused (engine: its caller stopped reading, `max_unread_tokens`) and
has no plan in flight may have its KV blocks spilled when the block manager cannot admit a
waiting request: the workers copy the K/V of the blocks holding its computed tokens into host
memory (each rank its own shard: its layers, its heads, its CP blocks), the device blocks go
back to the free list, and when the sequence is resumed and its reservation fits again it gets
fresh blocks that the workers fill from the copy before the plan's forward runs. Copies are
exact, so outputs equal a run that never spilled.

`SpillStore` holds the controller's side: the spill capacity in blocks (summed over the
sequences spilled now), which sequences hold how many, and the counters. Guarantees:
- `num_held <= capacity_blocks` at all times: `put` refuses (returns False, changing nothing)
  what does not fit, and the scheduler then leaves the sequence resident and the waiting
  request waits (admission is as without spilling, never worse);
- every `put` is matched by one `take` (restore) or `drop` (cancelled while spilled); the
  counters add up: blocks_spilled = blocks_restored + blocks_dropped + num_held.
The workers' own host ledgers (ShardRunner, kind "kv_spill") enforce the bytes on each rank.

Plans carry the copy operations (`SpillOp`, in the order the scheduler decided them); a worker
runs them in that order before the plan's forward, so a block spilled and handed to another
sequence in the same plan is copied out before anything writes it, and a restored block is
filled before it is read. Operations decided while no plan was made wait for the next plan
(the blocks they free are only handed out by a plan, which then carries them first).

Pure Python, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


SpillKind = Literal["spill", "restore", "drop"]


@dataclass(frozen=True, slots=True)
class SpillOp:
    """One copy operation of a plan: `spill` copies the K/V of `blocks` (device block ids, in
    table order) of `seq_id` to host memory; `restore` copies them back into `blocks` (the i-th
    spilled block into the i-th) and frees the copy; `drop` frees the copy of a cancelled one."""

    kind: SpillKind
    seq_id: int
    blocks: tuple[int, ...] = ()


class Spiller:
    """Spills and restores sequences' blocks through `blocks` (a BlockManager) and `store`,
    recording the copy operations for the next plan (`take_ops`, in the order decided: a worker
    runs them in that order before the plan's forward). Works on any sequence object with
    `seq_id`, `num_computed` (tokens whose K/V are written) and `num_kv_tokens` (its reservation)."""

    def __init__(self, blocks, store: SpillStore) -> None:
        self.blocks, self.store = blocks, store
        self._ops: list[SpillOp] = []

    def spill(self, seq) -> bool:
        """Copy out the blocks of `seq`'s computed tokens and free its blocks and reservation;
        False (nothing changed) if the store has no room for them."""
        n = self.blocks.blocks_for(seq.num_computed)
        if not self.store.put(seq.seq_id, n):
            return False
        self._ops.append(SpillOp("spill", seq.seq_id, tuple(self.blocks.block_table(seq.seq_id)[:n])))
        self.blocks.free(seq.seq_id)
        return True

    def restore(self, seq) -> bool:
        """Reserve `seq` again and give it fresh blocks for its computed tokens, filled from its
        copy; False (nothing changed) if its reservation does not fit now."""
        if not self.blocks.reserve(seq.seq_id, seq.num_kv_tokens):
            return False
        table = self.blocks.ensure(seq.seq_id, seq.num_computed)
        if len(table) != self.store.take(seq.seq_id):
            raise RuntimeError(f"seq_id={seq.seq_id}: restored into {len(table)} blocks, not the number "
                               "spilled: the spill accounting is broken")
        self._ops.append(SpillOp("restore", seq.seq_id, tuple(table)))
        return True

    def drop(self, seq_id: int) -> None:
        """Forget the copy of `seq_id` (cancelled while spilled); no-op if it has none."""
        if self.store.holds(seq_id):
            self.store.drop(seq_id)
            self._ops.append(SpillOp("drop", seq_id))

    def take_ops(self) -> tuple[SpillOp, ...]:
        """The operations decided since the last call (for the plan about to be returned)."""
        ops, self._ops = tuple(self._ops), []
        return ops


@dataclass
class SpillStore:
    """Spill capacity (blocks, over every spilled sequence) and counters; see the module docstring.

    `bytes_per_block` is the K/V bytes of one block summed over the gang's ranks (0 if unknown);
    it only converts the counters to bytes.
    """

    capacity_blocks: int
    bytes_per_block: int = 0
    _held: dict[int, int] = field(default_factory=dict)
    blocks_spilled: int = 0
    blocks_restored: int = 0
    blocks_dropped: int = 0
    num_spills: int = 0
    num_restores: int = 0

    def __post_init__(self) -> None:
        if self.capacity_blocks < 0:
            raise ValueError(f"capacity_blocks={self.capacity_blocks} must be >= 0 (0 turns spilling off)")

    @property
    def num_held(self) -> int:
        return sum(self._held.values())

    def holds(self, seq_id: int) -> bool:
        return seq_id in self._held

    def put(self, seq_id: int, num_blocks: int) -> bool:
        """Account `num_blocks` spilled blocks of `seq_id`; False (nothing changed) if they do not fit."""
        if seq_id in self._held:
            raise ValueError(f"seq_id={seq_id} is already spilled; restore or drop it first")
        if self.num_held + num_blocks > self.capacity_blocks:
            return False
        self._held[seq_id] = num_blocks
        self.blocks_spilled += num_blocks
        self.num_spills += 1
        return True

    def take(self, seq_id: int) -> int:
        """The blocks of `seq_id` restored: released here; their number."""
        n = self._pop(seq_id)
        self.blocks_restored += n
        self.num_restores += 1
        return n

    def drop(self, seq_id: int) -> int:
        """The copy of a cancelled sequence discarded; its blocks (0 if it held none)."""
        n = self._held.pop(seq_id, 0)
        self.blocks_dropped += n
        return n

    def _pop(self, seq_id: int) -> int:
        try:
            return self._held.pop(seq_id)
        except KeyError:
            raise KeyError(f"seq_id={seq_id} holds no spilled blocks") from None

    def stats(self) -> dict[str, int]:
        """Counters for health and benchmarks (bytes over every rank of the gang)."""
        b = self.bytes_per_block
        return {"capacity_blocks": self.capacity_blocks, "held_blocks": self.num_held,
                "spills": self.num_spills, "restores": self.num_restores,
                "blocks_spilled": self.blocks_spilled, "blocks_restored": self.blocks_restored,
                "blocks_dropped": self.blocks_dropped, "bytes_spilled": self.blocks_spilled * b,
                "bytes_restored": self.blocks_restored * b, "bytes_held": self.num_held * b}
