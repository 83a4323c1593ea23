"""Topology-aware gang placement on a `ClusterInventory`.

`place(shape, inventory)` returns a `Placement` (the node of every rank) or `None`; it never mutates
the inventory. Guarantees of a returned placement:

- every TP group (`tp` consecutive ranks) is on one node;
- with expert parallelism (`ep > 1`), every expert-parallel unit (`ep * tp` consecutive ranks: the
  ranks that exchange routed tokens all-to-all at every MoE layer) is kept on one node wherever the
  free GPUs allow it, as a TP group is; only when no placement keeps them whole are they split, TP
  group by TP group;
- the gang spans the fewest nodes possible (pipeline stages packed on as few nodes as possible);
- all-or-nothing: either every rank has a GPU or no placement is returned;
- least fragmentation among those: whole nodes are taken in order of most TP groups they can hold,
  ties to the node with the fewest free GPUs (so it becomes exactly full), and the last part of the
  gang goes to the best-fit node (the fullest node that still holds it).

Feasibility is exact: TP groups are independent, so a gang fits iff the nodes can hold
`pp * cp * dp` groups of `tp` GPUs (`ClusterInventory.group_capacity`). A pass costs
O(max GPUs per node + nodes used), never O(nodes).

Ranks are given to the chosen nodes in order, TP group by TP group, so a pipeline stage
(`tp * cp` consecutive ranks) is split across nodes only where a node is full.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

from shardwright.scheduler.model import ClusterInventory, GangShape


@dataclass(frozen=True, slots=True)
class Bundle:
    """One rank's resource request: `num_gpus` GPUs that must be on node `node_id`.

    A live controller builds one Ray placement-group bundle per `Bundle` (e.g. `{"GPU": 1}` plus a
    node-affinity resource for `node_id`).
    """

    rank: int
    node_id: str
    num_gpus: int = 1


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a gang runs: `node_gpus` lists (node id, GPUs) in rank order, so ranks
    0..k-1 are on the first node, the next ones on the second, and so on (one GPU per rank)."""

    node_gpus: tuple[tuple[str, int], ...]

    @property
    def num_gpus(self) -> int:
        return sum(count for _, count in self.node_gpus)

    @property
    def gpus_by_node(self) -> dict[str, int]:
        """Node id -> GPUs taken on it (a node may appear twice: ranks, then memory peers)."""
        out: dict[str, int] = {}
        for node, count in self.node_gpus:
            out[node] = out.get(node, 0) + count
        return out

    @property
    def rank_nodes(self) -> tuple[str, ...]:
        """`rank_nodes[r]` is the node of rank r."""
        return tuple(node for node, count in self.node_gpus for _ in range(count))

    def bundles(self) -> list[Bundle]:
        """One bundle of 1 GPU per rank, with the node the bundle must go to."""
        return [Bundle(rank, node) for rank, node in enumerate(self.rank_nodes)]

    def tp_groups(self, tp: int) -> list[tuple[str, ...]]:
        """Nodes of each TP group (consecutive runs of `tp` ranks)."""
        ranks = self.rank_nodes
        return [ranks[i : i + tp] for i in range(0, len(ranks), tp)]


@lru_cache(maxsize=256)
def _largest_first_order(tp: int, max_free: int) -> tuple[int, ...]:
    """Free counts that hold >= 1 TP group, by most groups held, then fewest free GPUs."""
    return tuple(sorted(range(tp, max_free + 1), key=lambda free: (-(free // tp), free)))


def _best_fit_node(inv: ClusterInventory, need_gpus: int, taken: set[str]) -> str | None:
    """The node with the fewest free GPUs that still has `need_gpus` free (not already taken)."""
    buckets = inv.buckets
    for free in range(need_gpus, len(buckets)):
        for node in buckets[free]:
            if node not in taken:
                return node
    return None


def _largest_first_nodes(inv: ClusterInventory, tp: int) -> Iterator[str]:
    for free in _largest_first_order(tp, inv.max_node_gpus):
        yield from inv.buckets[free]


def place(shape: GangShape, inventory: ClusterInventory) -> Placement | None:
    """Place a gang (see module docstring for the guarantees); `None` if it does not fit now.

    Memory peers (`shape.peers`) come after the ranks, one GPU each: on the ranks' nodes first
    (a same-node peer is fetched from through shared memory), then on the node with most free
    GPUs, filling it before opening another.
    """
    if shape.num_gpus > inventory.num_free_gpus or shape.tp > inventory.max_node_gpus:
        return None
    ranks = _place_ranks(shape, inventory)
    if ranks is None or not shape.peers:
        return ranks
    free = dict(inventory.free_by_node)
    for node, count in ranks.node_gpus:
        free[node] -= count
    used = [node for node, _ in ranks.node_gpus]
    peers = []
    for _ in range(shape.peers):
        node = next((n for n in used if free[n] > 0), None) or max(free, key=lambda n: (free[n], n))
        if free[node] <= 0:
            return None
        free[node] -= 1
        peers.append((node, 1))
        if node not in used:
            used.append(node)  # the next peers join it while it has room
    return Placement(ranks.node_gpus + tuple(peers))


def _place_ranks(shape: GangShape, inventory: ClusterInventory) -> Placement | None:
    unit = shape.tp * shape.layout.ep  # the ranks of one expert-parallel all-to-all
    if shape.layout.ep > 1 and unit <= inventory.max_node_gpus:
        placed = _place_groups(unit, shape.layout.world_size // unit, inventory)
        if placed is not None:
            return placed
    return _place_groups(shape.tp, shape.num_tp_groups, inventory)


def _place_groups(tp: int, remaining: int, inventory: ClusterInventory) -> Placement | None:
    """`remaining` groups of `tp` consecutive ranks, each group on one node (see the module docstring)."""
    if tp * remaining > inventory.num_free_gpus:
        return None
    if remaining == 1:  # one TP group: the best-fit node, if any
        node = _best_fit_node(inventory, tp, set())
        return None if node is None else Placement(((node, tp),))
    if tp > 1 and inventory.group_capacity(tp) < remaining:
        return None
    groups_by_node: list[tuple[str, int]] = []
    taken: set[str] = set()
    largest = _largest_first_nodes(inventory, tp)
    while remaining:
        node = _best_fit_node(inventory, remaining * tp, taken)
        if node is not None:
            groups_by_node.append((node, remaining))
            break
        node = next(largest)
        held = inventory.free_by_node[node] // tp
        groups_by_node.append((node, held))
        taken.add(node)
        remaining -= held
    return Placement(tuple((node, groups * tp) for node, groups in groups_by_node))


def place_and_allocate(shape: GangShape, inventory: ClusterInventory) -> Placement | None:
    """`place`, then take the GPUs from `inventory` if it fits."""
    placement = place(shape, inventory)
    if placement is not None:
        inventory.allocate(placement.gpus_by_node)
    return placement
