"""PeerStore: the memory a peer lends — other ranks' layers, loaded from the checkpoint.

For each (rank, local layer) the plan gives it, the peer builds that rank's model on the meta
device (shapes only), allocates one flat buffer for the layer (reserved in the peer's own ledger
first), and fills it with that rank's slices straight from the checkpoint, then never writes it
again. A same-node owner maps the buffer (a shared-memory segment on the CPU) read-only and binds
it in place (`map_segment`); an owner elsewhere asks for the tensors (`tensors`).
"""

from __future__ import annotations

import mmap
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shardwright.config import ModelSpec, ParallelLayout
from shardwright.models.checkpoint import CheckpointReader
from shardwright.models.decoder import DecoderModel
from shardwright.models.weights import weight_plan
from shardwright.parallel.context import ParallelContext
from shardwright.pool.fetch import MappedSource, param_slots, views
from shardwright.pool.ledger import MemoryLedger

SHM_DIR = Path("/dev/shm")


def shared_segment(path: Path, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor backed by the shared-memory file `path` (created at that size if new)."""
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)


class PeerStore:
    """Layers held for other ranks, each one flat buffer, within the peer's ledger."""

    def __init__(self, ledger: MemoryLedger, *, shared: bool = True) -> None:
        self.ledger = ledger
        self.shared = shared and SHM_DIR.is_dir()
        self.flat: dict[tuple[int, int], torch.Tensor] = {}
        self.shapes: dict[tuple[int, int], list[tuple[int, ...]]] = {}
        self.paths: dict[tuple[int, int], Path] = {}

    @torch.no_grad()
    def load(self, model_dir: str, spec: ModelSpec, layout: ParallelLayout, items: list[tuple[int, int]]) -> None:
        """Hold local layer `layer` of rank `rank` for every (rank, layer) in `items`."""
        by_rank: dict[int, list[int]] = {}
        for rank, layer in items:
            by_rank.setdefault(rank, []).append(layer)
        with CheckpointReader(model_dir) as reader:
            for rank, layers in sorted(by_rank.items()):
                model = DecoderModel(spec, ParallelContext.coordinates(layout, rank), device="meta")
                for layer in layers:
                    self._hold(reader, model, rank, layer)

    def _hold(self, reader: CheckpointReader, model: DecoderModel, rank: int, layer: int) -> None:
        block = model.blocks[layer]
        slots = param_slots(block)
        shapes = [tuple(m._parameters[n].shape) for m, n in slots]
        dtype = model.dtype
        numel = sum(p.numel() for p in block.parameters())
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self.ledger.reserve("held_for_peers", nbytes)
        if self.shared:
            path = SHM_DIR / f"shardwright-pool-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            flat = shared_segment(path, numel, dtype)
            self.paths[(rank, layer)] = path
        else:
            flat = torch.empty(numel, dtype=dtype)
        for (module, name), view in zip(slots, views(flat, shapes)):
            module._parameters[name] = nn.Parameter(view, requires_grad=False)
        prefix = f"blocks.{layer}."
        for name, param, reads in weight_plan(model, reader):
            if not name.startswith(prefix):
                continue
            parts = [reader.read(r) for r in reads]
            value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"checkpoint gives {name} shape {tuple(value.shape)} for rank {rank}, "
                                 f"expected {tuple(param.shape)}")
            param.copy_(value)
        self.flat[(rank, layer)] = flat
        self.shapes[(rank, layer)] = shapes

    def handles(self) -> dict[tuple[int, int], dict]:
        """What an owner needs to read each held layer: shapes, dtype and (same node) the segment."""
        out = {}
        for key, flat in self.flat.items():
            path = self.paths.get(key)
            out[key] = {"shapes": self.shapes[key], "dtype": str(flat.dtype).removeprefix("torch."),
                        "numel": flat.numel(), "path": str(path) if path else None}
        return out

    def tensors(self, rank: int, layer: int) -> list[torch.Tensor]:
        """The layer's tensors (for an owner on another node)."""
        key = (rank, layer)
        return views(self.flat[key], self.shapes[key])

    def unlink(self) -> None:
        """Remove the segments' names once owners mapped them (the memory lives while mapped)."""
        for path in self.paths.values():
            path.unlink(missing_ok=True)
        self.paths.clear()

    def close(self) -> None:
        self.unlink()
        for flat in self.flat.values():
            self.ledger.release("held_for_peers", flat.numel() * flat.element_size())
        self.flat.clear()


def map_segment(handle: dict) -> MappedSource:
    """An owner's read-only mapping of a same-node peer's segment (`handles()`), copying nothing.

    The pages are mapped PROT_READ (a write faults rather than changes the peer's layer); the
    mapping stays open while the returned source or any view of it lives, also after the peer
    unlinks the segment's name or exits.
    """
    dtype = getattr(torch, handle["dtype"])
    nbytes = handle["numel"] * torch.empty((), dtype=dtype).element_size()
    with open(handle["path"], "rb") as f:
        mapping = mmap.mmap(f.fileno(), nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    with warnings.catch_warnings():  # read-only on purpose: torch has no read-only tensors to say so
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        raw = torch.from_numpy(np.frombuffer(mapping, dtype=np.uint8))  # pins the mapping open
    return MappedSource(raw.view(dtype), handle["shapes"], mapping)
