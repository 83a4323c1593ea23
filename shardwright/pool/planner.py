"""plan_pool: which layers each rank keeps resident, and where the others are held.

A pooled layer is fetched once per step, unless the rank binds it in place: a rank computing on
the CPU maps a same-node peer's shared-memory segment and uses the layer from there (zero-copy:
no fetch, no fetch buffer). The planner pools the fewest layers that make each rank fit its
budget (counting the fetch buffers of the layers that are fetched, none for those bound in
place), spreads them evenly through the stage (so each fetch has resident layers to hide behind),
and holds each one on a peer with spare budget on the rank's own node first, then on other nodes,
then in the rank's host memory. When that is not enough it refuses with the bytes missing and
where, before anything is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shardwright.pool.ledger import fmt_bytes

HOST = "host"


class PoolAdmissionError(ValueError):
    """The deployment cannot fit: the message says how many bytes are missing where."""


@dataclass(frozen=True)
class RankNeed:
    """One compute rank: its budget and what it must keep resident besides its layers."""

    rank: int
    node: str
    budget_bytes: int
    fixed_bytes: int  # non-layer weights + KV cache + step activations
    layer_bytes: tuple[int, ...]  # per local layer
    binds_in_place: bool = False  # a same-node peer's layer is bound zero-copy (CPU), not fetched


@dataclass
class Holder:
    """A memory peer (or None for host memory) with the spare bytes it advertises."""

    peer: int
    node: str
    spare_bytes: int


@dataclass
class PoolPlan:
    """Per compute rank: local layer index -> where it lives ('resident', a peer index, 'host')."""

    placements: dict[int, dict[int, int | str]] = field(default_factory=dict)
    prefetch_depth: int = 2
    layer_bytes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    fetched_bytes: dict[int, int] = field(default_factory=dict)  # per step; the rest is bound in place

    def pooled(self, rank: int) -> dict[int, int | str]:
        return {i: where for i, where in self.placements.get(rank, {}).items() if where != "resident"}

    def held_by(self, peer: int) -> list[tuple[int, int]]:
        """(rank, local layer) pairs held by `peer`, in rank then layer order."""
        return sorted((r, i) for r, places in self.placements.items() for i, w in places.items() if w == peer)

    def bytes_pooled(self, rank: int) -> int:
        return sum(self.layer_bytes[rank][i] for i in self.pooled(rank))

    def describe(self) -> list[str]:
        lines = []
        for rank in sorted(self.placements):
            places = self.placements[rank]
            pooled = self.pooled(rank)
            if not pooled:
                lines.append(f"rank {rank}: all {len(places)} layers resident")
                continue
            where = ", ".join(f"layer {i} -> {'host' if w == HOST else f'peer {w}'}" for i, w in sorted(pooled.items()))
            fetched = self.fetched_bytes.get(rank, self.bytes_pooled(rank))
            lines.append(f"rank {rank}: {len(places) - len(pooled)}/{len(places)} layers resident; "
                         f"{fmt_bytes(fetched)} fetched per step, {fmt_bytes(self.bytes_pooled(rank) - fetched)} "
                         f"bound in place ({where})")
        return lines

    def to_dict(self) -> dict:
        return {"prefetch_depth": self.prefetch_depth,
                "ranks": {str(r): {str(i): w for i, w in p.items()} for r, p in self.placements.items()},
                "bytes_fetched_per_step": {str(r): self.fetched_bytes.get(r, self.bytes_pooled(r))
                                           for r in self.placements},
                "bytes_bound_in_place": {str(r): self.bytes_pooled(r) - self.fetched_bytes.get(r, self.bytes_pooled(r))
                                         for r in self.placements}}


def staging_bytes(pooled_sizes: list[int], depth: int) -> int:
    """Fetch buffers: the layer in use plus `depth` fetched ahead, at most."""
    return sum(sorted(pooled_sizes, reverse=True)[: depth + 1])


def spread(num_layers: int, count: int) -> list[int]:
    """`count` of `num_layers` indices, evenly spaced, ending at the last layer (layer 0 stays
    resident whenever it can, so the first fetch overlaps its compute)."""
    return sorted({(j + 1) * num_layers // count - 1 for j in range(count)}) if count else []


def _where(need: RankNeed, pooled: list[int], spare: dict[int, int], peers: list[Holder],
           host_bytes: int) -> dict[int, int | str | None]:
    """Pooled layer -> the peer holding it, HOST, or None (no room); consumes `spare` (peer -> bytes)."""
    return place_held({i: need.layer_bytes[i] for i in pooled}, need.node, spare, peers, host_bytes)


def place_held(sizes: dict, node: str, spare: dict[int, int], peers: list[Holder],
               host_bytes: int) -> dict:
    """Each pooled item (key -> bytes, in order) -> the peer holding it (same node first, then the
    one with most room), HOST, or None (no room); consumes `spare` (peer -> bytes)."""
    order = sorted(peers, key=lambda h: (h.node != node, -spare[h.peer], h.peer))
    out: dict = {}
    host_left = host_bytes
    for i, size in sizes.items():
        holder = next((h for h in order if spare[h.peer] >= size), None)
        if holder is not None:
            spare[holder.peer] -= size
            out[i] = holder.peer
        elif host_left >= size:
            host_left -= size
            out[i] = HOST
        else:
            out[i] = None
    return out


def _fetched(need: RankNeed, where: dict[int, int | str | None], peers: list[Holder]) -> list[int]:
    """Sizes of the pooled layers that are fetched before use (the others are bound in place)."""
    same_node = {h.peer for h in peers if h.node == need.node}
    return [need.layer_bytes[i] for i, w in where.items()
            if not (need.binds_in_place and w in same_node)]


def _need_bytes(need: RankNeed, pooled: list[int], fetched: list[int], depth: int) -> int:
    resident = sum(b for i, b in enumerate(need.layer_bytes) if i not in pooled)
    return need.fixed_bytes + resident + staging_bytes(fetched, depth)


def _layers_to_pool(need: RankNeed, peers: list[Holder], host_bytes: int, depth: int,
                    force_fraction: float | None) -> list[int]:
    n = len(need.layer_bytes)
    counts = [round(force_fraction * n)] if force_fraction is not None else range(n + 1)
    for count in counts:
        pooled = spread(n, count)
        where = _where(need, pooled, {h.peer: h.spare_bytes for h in peers}, peers, host_bytes)
        if _need_bytes(need, pooled, _fetched(need, where, peers), depth) <= need.budget_bytes:
            return pooled
    pooled = spread(n, counts[-1])
    where = _where(need, pooled, {h.peer: h.spare_bytes for h in peers}, peers, host_bytes)
    total = _need_bytes(need, pooled, _fetched(need, where, peers), depth)
    raise PoolAdmissionError(
        f"rank {need.rank} on node {need.node[:12]} cannot fit its budget of {fmt_bytes(need.budget_bytes)} "
        f"even with {len(pooled)} of {n} layers pooled: it needs {fmt_bytes(total)} resident "
        f"({fmt_bytes(need.fixed_bytes)} for embeddings, head, KV cache and activations, plus layers and "
        f"fetch buffers): {fmt_bytes(total - need.budget_bytes)} missing on node {need.node[:12]}; raise "
        f"the budget, shrink num_blocks or max_tokens_per_step, or use a larger tp or pp")


def plan_pool(needs: list[RankNeed], peers: list[Holder], *, host_bytes: int = 0, prefetch_depth: int = 2,
              force_fraction: float | None = None) -> PoolPlan:
    """Place every rank's layers; raises PoolAdmissionError with the missing bytes per node.

    `peers` advertise their spare bytes (consumed here); `host_bytes` is the host memory each
    rank may use for its own pooled layers; `force_fraction` pools that share of every rank's
    layers whatever its budget (for benchmarks).
    """
    if prefetch_depth < 0:
        raise ValueError(f"prefetch_depth must be >= 0, got {prefetch_depth}")
    plan = PoolPlan(prefetch_depth=prefetch_depth)
    missing: dict[str, int] = {}
    for need in needs:
        pooled = _layers_to_pool(need, peers, host_bytes, prefetch_depth, force_fraction)
        spare = {h.peer: h.spare_bytes for h in peers}
        where = _where(need, pooled, spare, peers, host_bytes)
        for h in peers:
            h.spare_bytes = spare[h.peer]
        places: dict[int, int | str] = {i: "resident" for i in range(len(need.layer_bytes))}
        for i, w in where.items():
            if w is None:
                missing[need.node] = missing.get(need.node, 0) + need.layer_bytes[i]
            else:
                places[i] = w
        plan.placements[need.rank] = places
        plan.layer_bytes[need.rank] = need.layer_bytes
        plan.fetched_bytes[need.rank] = sum(_fetched(need, where, peers))
    if missing:
        spare = ", ".join(f"peer {h.peer} on node {h.node[:12]}: {fmt_bytes(h.spare_bytes)} left" for h in peers)
        where = "; ".join(f"{fmt_bytes(b)} missing for ranks on node {n[:12]}" for n, b in missing.items())
        raise PoolAdmissionError(
            f"not enough pooled memory for the deployment: {where} (peers: {spare or 'none'}; host pool "
            f"{fmt_bytes(host_bytes)} per rank). Add memory peers, raise their budget or the host pool, or "
            f"use a larger tp or pp")
    return plan
