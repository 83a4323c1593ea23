"""ParallelContext: the one explicit object that owns a rank's process groups.

A job's ranks form a dp x pp x cp x ep x tp mesh, tp varying fastest:

    rank = (((dp_rank * pp + pp_rank) * cp + cp_rank) * ep + ep_rank) * tp + tp_rank

so each TP group is a run of consecutive ranks (one node), an EP group (the ranks that split one
MoE layer's experts, holding the same TP slice of each) the next stride, then PP stages. With
ep = 1 the order is the dp x pp x cp x tp one of before.
The context is built once per process, after `torch.distributed` is initialised with
world size `layout.world_size`, and passed explicitly to every layer that communicates.
`ParallelContext.single()` is the one-process context (every group None, every size 1); the
same model code then runs with no communication at all, which is the reference for tests.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shardwright.config import ParallelLayout

AXES = ("dp", "pp", "cp", "ep", "tp")  # mesh order, slowest to fastest


class StartupError(RuntimeError):
    """A rank failed in a named start-up phase (a gang worker's or a trainer's); the message names
    the rank and the phase."""


def default_device(local_rank: int = 0) -> torch.device:
    """CUDA device `local_rank` when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def default_backend() -> str:
    """NCCL when CUDA is present, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def mesh_coords(rank: int, layout: ParallelLayout) -> dict[str, int]:
    """The (dp, pp, cp, ep, tp) coordinates of a global rank."""
    coords = {}
    for axis in reversed(AXES):
        size = getattr(layout, axis)
        coords[axis] = rank % size
        rank //= size
    return coords


def mesh_rank(coords: dict[str, int], layout: ParallelLayout) -> int:
    """The global rank at mesh coordinates `coords` (inverse of `mesh_coords`)."""
    rank = 0
    for axis in AXES:
        rank = rank * getattr(layout, axis) + coords[axis]
    return rank


def axis_groups(layout: ParallelLayout, axis: str) -> list[list[int]]:
    """Every group along `axis`: lists of global ranks that differ only in that coordinate."""
    others = [a for a in AXES if a != axis]
    groups = []
    for fixed in itertools.product(*(range(getattr(layout, a)) for a in others)):
        coords = dict(zip(others, fixed))
        groups.append(
            [mesh_rank({**coords, axis: i}, layout) for i in range(getattr(layout, axis))]
        )
    return groups


@dataclass(frozen=True)
class ParallelContext:
    """A rank's place in the mesh and its process groups (None where the axis has size 1)."""

    layout: ParallelLayout
    rank: int
    device: torch.device
    backend: str
    tp_rank: int = 0
    pp_rank: int = 0
    cp_rank: int = 0
    dp_rank: int = 0
    ep_rank: int = 0
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    cp_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    ep_group: dist.ProcessGroup | None = None
    # Ranks that differ only in dp and cp (they hold the same parameters: gradients are summed
    # over it); the dp or cp group when the other axis has size 1.
    dp_cp_group: dist.ProcessGroup | None = None
    # Global ranks of each group this rank belongs to, in group-rank order.
    group_ranks: dict[str, list[int]] = field(default_factory=dict)
    # For every divisor d of tp with 1 < d < tp: the group of d consecutive TP ranks holding
    # this rank (used when kv heads are replicated across d ranks).
    tp_block_groups: dict[int, dist.ProcessGroup] = field(default_factory=dict)

    @property
    def tp(self) -> int:
        return self.layout.tp

    @property
    def pp(self) -> int:
        return self.layout.pp

    @property
    def cp(self) -> int:
        return self.layout.cp

    @property
    def dp(self) -> int:
        return self.layout.dp

    @property
    def ep(self) -> int:
        return self.layout.ep

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    def tp_subgroup(self, size: int) -> dist.ProcessGroup | None:
        """Group of `size` consecutive TP ranks containing this rank (None when size is 1)."""
        if size == 1:
            return None
        if size == self.tp:
            return self.tp_group
        if size not in self.tp_block_groups:  # (a coordinates() context maps sizes to None)
            raise ValueError(f"tp={self.tp} has no sub-groups of size {size}")
        return self.tp_block_groups[size]

    @classmethod
    def single(cls, device: torch.device | str | None = None) -> ParallelContext:
        """One process, no communication: the reference context."""
        dev = torch.device(device) if device is not None else default_device()
        return cls(layout=ParallelLayout(), rank=0, device=dev, backend="none",
                   group_ranks={axis: [0] for axis in AXES})

    @classmethod
    def coordinates(cls, layout: ParallelLayout, rank: int, device: torch.device | str = "meta") -> ParallelContext:
        """Rank `rank`'s place in the mesh with no process groups.

        For sizing a rank's shard and for loading another rank's slices (a memory peer does);
        a model built on it must never run a collective.
        """
        coords = mesh_coords(rank, layout)
        blocks = {d: None for d in range(2, layout.tp) if layout.tp % d == 0}
        return cls(layout=layout, rank=rank, device=torch.device(device), backend="none",
                   tp_rank=coords["tp"], pp_rank=coords["pp"], cp_rank=coords["cp"], dp_rank=coords["dp"],
                   ep_rank=coords["ep"], tp_block_groups=blocks)

    @classmethod
    def from_initialized(
        cls, layout: ParallelLayout, device: torch.device | str | None = None
    ) -> ParallelContext:
        """Build every group of the mesh. Collective: all ranks of the world must call it.

        `torch.distributed` must already be initialised with world size `layout.world_size`.
        """
        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised; call dist.init_process_group first "
                "(or use ParallelContext.single() for one process)"
            )
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != layout.world_size:
            raise ValueError(
                f"world size {world} != tp*pp*cp*dp*ep = {layout.world_size} for layout {layout}"
            )
        coords = mesh_coords(rank, layout)
        groups: dict[str, dist.ProcessGroup | None] = {}
        members: dict[str, list[int]] = {}
        for axis in AXES:
            for ranks in axis_groups(layout, axis):
                # new_group is collective over the whole world: every rank creates every group.
                group = dist.new_group(ranks) if len(ranks) > 1 else None
                if rank in ranks:
                    groups[axis], members[axis] = group, ranks
        blocks = _tp_block_groups(layout, rank)
        dp_cp = groups["dp"] if layout.cp == 1 else groups["cp"] if layout.dp == 1 else _dp_cp_group(layout, rank)
        dev = torch.device(device) if device is not None else default_device(rank)
        return cls(
            layout=layout,
            rank=rank,
            device=dev,
            backend=dist.get_backend(),
            tp_rank=coords["tp"],
            pp_rank=coords["pp"],
            cp_rank=coords["cp"],
            dp_rank=coords["dp"],
            ep_rank=coords["ep"],
            tp_group=groups["tp"],
            pp_group=groups["pp"],
            cp_group=groups["cp"],
            dp_group=groups["dp"],
            ep_group=groups["ep"],
            dp_cp_group=dp_cp,
            group_ranks=members,
            tp_block_groups=blocks,
        )


def _dp_cp_group(layout: ParallelLayout, rank: int) -> dist.ProcessGroup:
    """Collective: every (pp, tp) position's group of dp * cp ranks; returns this rank's."""
    mine = None
    for pp_rank, ep_rank, tp_rank in itertools.product(range(layout.pp), range(layout.ep), range(layout.tp)):
        ranks = [mesh_rank({"dp": d, "pp": pp_rank, "cp": c, "ep": ep_rank, "tp": tp_rank}, layout)
                 for d in range(layout.dp) for c in range(layout.cp)]
        group = dist.new_group(ranks)
        if rank in ranks:
            mine = group
    return mine


def _tp_block_groups(layout: ParallelLayout, rank: int) -> dict[int, dist.ProcessGroup]:
    mine: dict[int, dist.ProcessGroup] = {}
    for size in range(2, layout.tp):
        if layout.tp % size:
            continue
        for tp_ranks in axis_groups(layout, "tp"):
            for start in range(0, layout.tp, size):
                block = tp_ranks[start : start + size]
                group = dist.new_group(block)
                if rank in block:
                    mine[size] = group
    return mine
