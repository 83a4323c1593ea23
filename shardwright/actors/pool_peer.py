"""PeerRunner: a gang member that computes nothing and lends its memory budget.

It holds other ranks' pooled layers (loaded from the checkpoint by shardwright.pool.PeerStore)
and answers for them: same-node owners map its shared segments, owners elsewhere call `tensors`.
It receives every step message like the compute ranks, and answers at once: a dead peer then
shows up in the step's results as a dead gang member, named, and the deployment rebuilds.
"""

from __future__ import annotations

from shardwright.config import ModelSpec, ParallelLayout
from shardwright.pool.ledger import MemoryLedger
from shardwright.pool.store import PeerStore


class PeerRunner:
    """One memory peer of a deployment's gang (plain object; the Ray shell is ShardWorker)."""

    def __init__(self, rank: int, layout: ParallelLayout, *, memory_budget_bytes: int | None = None,
                 threads_per_worker: int | None = None) -> None:
        self.rank, self.layout = rank, layout
        from shardwright.parallel.context import default_device
        from shardwright.pool.ledger import resolve_budget

        self.ledger = MemoryLedger(resolve_budget(memory_budget_bytes, default_device()),
                                   owner=f"memory peer (rank {rank})")
        self.store = PeerStore(self.ledger)

    def load(self, model_dir: str, dtype: str | None, items: list[tuple[int, int]]) -> dict:
        """Hold the (rank, local layer) pairs of the plan; returns a handle per pair."""
        spec = ModelSpec.from_hf_dir(model_dir, dtype=dtype)
        self.store.load(model_dir, spec, self.layout, [tuple(i) for i in items])
        return self.store.handles()

    def unlink(self) -> None:
        self.store.unlink()

    def tensors(self, rank: int, layer: int):
        return self.store.tensors(rank, layer)

    def memory(self) -> dict:
        return self.ledger.snapshot()

    def reset_memory_peak(self) -> None:
        self.ledger.reset_high_water()

    def ping(self) -> None:
        """Alive (a peer joins no process group, so there is nothing to reduce)."""

    def step(self, msg) -> None:
        return None

    def prompt_logits(self, token_ids) -> None:
        return None

    def shutdown(self) -> None:
        self.store.close()
