"""HostKVStore: one rank's copies of spilled KV blocks, in host memory, on a ledger.

The controller decides what spills (serving/kv_spill.py); every plan carries the copy operations,
which each rank runs on its own shard of the paged cache (its layers, its KV heads) before the
plan's forward, in the order given. A copy is the blocks' key and value rows of every local
layer, bit for bit; restoring writes them into the new blocks' rows, so attention afterwards
reads exactly what it would have read had the sequence never left the device.

Every copy is reserved on the store's ledger (kind "kv_spill") before it is made and released
when it is restored or dropped: the ledger's budget (capacity blocks x this rank's bytes per
block) is never passed, and a reservation that would pass it raises BudgetExceeded (the
controller's SpillStore refuses first, so that means the two disagree). On CUDA the copies
live in pinned host memory.

Context parallelism is not supported: a restored block may live on another CP rank than the
block it was spilled from (block b lives on rank b % cp), which would need a transfer between
ranks; the engine refuses spilling with cp > 1.
"""

from __future__ import annotations

import torch

from shardwright.pool.ledger import MemoryLedger


class HostKVStore:
    """Host copies of spilled blocks of `cache` (a models.paged.PagedKVCache with cp = 1)."""

    def __init__(self, cache, ledger: MemoryLedger) -> None:
        if cache.cp != 1:
            raise ValueError(f"KV spilling needs cp=1 (the cache is sharded over cp={cache.cp} ranks)")
        self.cache, self.ledger = cache, ledger
        self._copies: dict[int, tuple[list[torch.Tensor], int]] = {}  # seq_id -> (tensors, bytes)
        self.bytes_spilled = 0
        self.bytes_restored = 0

    def run(self, ops) -> None:
        """Run (kind, seq_id, blocks) operations in order: 'spill', 'restore' or 'drop'."""
        for kind, seq_id, blocks in ops:
            if kind == "spill":
                self.spill(seq_id, blocks)
            elif kind == "restore":
                self.restore(seq_id, blocks)
            elif kind == "drop":
                self.drop(seq_id)
            else:
                raise ValueError(f"unknown KV spill operation {kind!r}; expected spill, restore or drop")

    def spill(self, seq_id: int, blocks: list[int]) -> int:
        """Copy the key and value rows of `blocks` (every local layer) to host memory; the bytes."""
        if seq_id in self._copies:
            raise ValueError(f"seq_id={seq_id} already has a spilled copy on {self.ledger.owner}")
        rows = self._rows(blocks)
        layers = self.cache.keys + self.cache.values
        nbytes = sum(rows.numel() * t[0].numel() * t.element_size() for t in layers)
        self.ledger.reserve("kv_spill", nbytes)
        pin = layers[0].device.type == "cuda"
        copies = [t.index_select(0, rows).to("cpu") for t in layers]
        self._copies[seq_id] = ([c.pin_memory() for c in copies] if pin else copies, nbytes)
        self.bytes_spilled += nbytes
        return nbytes

    def restore(self, seq_id: int, blocks: list[int]) -> int:
        """Write `seq_id`'s copy into `blocks` (same count as spilled) and free it; the bytes."""
        copies, nbytes = self._pop(seq_id)
        rows = self._rows(blocks)
        if rows.numel() != copies[0].shape[0]:
            raise ValueError(f"seq_id={seq_id}: restoring {len(blocks)} blocks, but "
                             f"{copies[0].shape[0] // self.cache.block_size} were spilled")
        for t, c in zip(self.cache.keys + self.cache.values, copies):
            t.index_copy_(0, rows, c.to(t.device, non_blocking=True))
        self.ledger.release("kv_spill", nbytes)
        self.bytes_restored += nbytes
        return nbytes

    def drop(self, seq_id: int) -> int:
        """Free `seq_id`'s copy (its request was cancelled); the bytes (0 if it had none)."""
        if seq_id not in self._copies:
            return 0
        _, nbytes = self._pop(seq_id)
        self.ledger.release("kv_spill", nbytes)
        return nbytes

    def traffic(self) -> dict[str, int]:
        return {"kv_bytes_spilled": self.bytes_spilled, "kv_bytes_restored": self.bytes_restored,
                "kv_bytes_held": sum(n for _, n in self._copies.values()), "kv_spilled_sequences": len(self._copies)}

    def _pop(self, seq_id: int):
        try:
            return self._copies.pop(seq_id)
        except KeyError:
            raise KeyError(f"seq_id={seq_id} has no spilled copy on {self.ledger.owner}") from None

    def _rows(self, blocks: list[int]) -> torch.Tensor:
        bs = self.cache.block_size
        index = torch.tensor(list(blocks), dtype=torch.long)[:, None] * bs + torch.arange(bs)
        return index.flatten().to(self.cache.keys[0].device) if self.cache.keys else index.flatten()
