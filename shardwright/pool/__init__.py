"""Peer memory pooling: serve a shard larger than a worker's memory budget.

- `MemoryLedger`: a worker's own accounting of every tensor it keeps resident, against its budget.
- `shard_sizes` / `plan_pool`: which layers of each rank stay resident and where the others live
  (a peer on the same node, a peer on another node, or host memory), refused with the missing
  bytes when nothing has room.
- `PeerStore`: the memory a peer lends (loaded straight from the checkpoint).
- `LayerFetcher`: binds a same-node peer's mapped segment in place (zero-copy, no thread); fetches
  other pooled layers ahead of use in the background and drops them after.

Pure torch: nothing here imports Ray, gRPC or Redis (the Ray shells are in shardwright.actors).
"""

from shardwright.pool.ledger import BudgetExceeded, MemoryLedger
from shardwright.pool.planner import (HOST, Holder, PoolAdmissionError, PoolPlan, RankNeed, plan_pool)

__all__ = ["HOST", "BudgetExceeded", "Holder", "MemoryLedger", "PoolAdmissionError", "PoolPlan",
           "RankNeed", "plan_pool"]
