"""Nodes and GPUs of the Ray cluster, as plain per-node GPU counts keyed by Ray node id.

The scheduler builds its `ClusterInventory` from `GpuCounts`; this module knows nothing of the
scheduler (`cluster/` sits below it and imports only `config`).

GPUs are Ray's `GPU` resource: physical devices on GPU machines, *logical* ones on CPU machines
(a local cluster started by `cluster.ray_connect.connect` or `ray start --num-gpus N` advertises
them; workers then compute on CPU with gloo). Memory is Ray's schedulable `memory` resource of the
node (host memory not reserved for the object store), total and currently unreserved.

Free GPUs of a node for the scheduler = min(total - GPUs of the scheduler's own placements there,
GPUs Ray reports available). The second term keeps the scheduler from planning on GPUs that
something else holds (another Ray workload, or a gang of a stopped job whose placement group Ray has
not released yet); the first keeps the policy's invariant that running jobs' GPUs are taken.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import ray


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One Ray node: its id, address, liveness, GPUs and schedulable memory (bytes)."""

    node_id: str
    address: str
    alive: bool
    gpus_total: float
    gpus_free: float
    memory_total_bytes: int
    memory_free_bytes: int


class NoGpusError(RuntimeError):
    """The Ray cluster advertises no GPU resource at all."""


def list_nodes() -> list[NodeInfo]:
    """Every node Ray knows (dead ones with alive=False and nothing free), sorted by node id."""
    available = _available_per_node()
    nodes = []
    for node in ray.nodes():
        node_id, alive = node["NodeID"], bool(node.get("Alive"))
        total, free = node.get("Resources", {}), available.get(node_id, {}) if alive else {}
        nodes.append(NodeInfo(
            node_id=node_id, address=node.get("NodeManagerAddress", ""), alive=alive,
            gpus_total=float(total.get("GPU", 0.0)), gpus_free=float(free.get("GPU", 0.0)),
            memory_total_bytes=int(total.get("memory", 0)), memory_free_bytes=int(free.get("memory", 0))))
    return sorted(nodes, key=lambda n: n.node_id)


def _available_per_node() -> dict[str, dict[str, float]]:
    """Node id -> available resources. Ray exposes this per node only through its state module
    (the public `ray.util.state` needs the dashboard, which Shardwright does not require)."""
    from ray._private import state

    return state.available_resources_per_node()


@dataclass(frozen=True, slots=True)
class GpuCounts:
    """Whole GPUs per live node with at least one: the total, and the free ones for the scheduler."""

    total_by_node: dict[str, int]
    free_by_node: dict[str, int]


def gpu_counts(nodes: list[NodeInfo], used_by_node: Mapping[str, int] | None = None) -> GpuCounts:
    """The live nodes with at least one whole GPU, with free GPUs as the module docstring says.

    `used_by_node` is the GPUs of the scheduler's own placements; GPUs on nodes that are gone are
    ignored (their jobs' runners fail and are handled by the scheduler). With no `used_by_node`,
    `free_by_node` still subtracts what Ray reports as taken; use `total_by_node` for an empty
    cluster (what submission checks a job against).
    """
    used = used_by_node or {}
    totals = {n.node_id: int(n.gpus_total) for n in nodes if n.alive and n.gpus_total >= 1}
    if not totals:
        raise NoGpusError(
            f"the Ray cluster has no GPUs ({len(nodes)} nodes, none alive with a GPU resource); on CPU "
            "machines start Ray with logical GPUs (`ray start --head --num-gpus 4`), or let Shardwright "
            "start a local cluster by leaving SHARDWRIGHT_RAY_ADDRESS unset")
    free = {}
    for node in nodes:
        if node.node_id in totals:
            total = totals[node.node_id]
            ours = min(total, used.get(node.node_id, 0))
            free[node.node_id] = max(0, min(total - ours, math.floor(node.gpus_free + 1e-9)))
    return GpuCounts(total_by_node=totals, free_by_node=free)
