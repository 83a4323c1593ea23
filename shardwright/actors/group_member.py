"""GroupMember: what every gang worker does before its own work — join the torch.distributed
world of its gang and build the ParallelContext — as a plain object (testable without Ray).

Start-up runs in named phases; a failure names the phase and the rank (StartupError).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from shardwright.config import ParallelLayout
from shardwright.parallel.context import ParallelContext, default_backend, default_device


class StartupError(RuntimeError):
    """A worker failed in a named start-up phase."""


class GroupMember:
    """One rank of a gang: rendezvous, process groups, a real probe through the world."""

    def __init__(self, rank: int, layout: ParallelLayout, *, threads_per_worker: int | None = None) -> None:
        self.rank, self.layout = rank, layout
        self.ctx: ParallelContext | None = None
        self._store: dist.TCPStore | None = None
        if not torch.cuda.is_available():
            torch.set_num_threads(threads_per_worker or max(1, (os.cpu_count() or 1) // layout.world_size))

    def _phase(self, name: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise StartupError(f"rank {self.rank} failed in start-up phase '{name}': {err}") from err

    def open_store(self, host: str, timeout_s: float) -> int:
        """Rank 0 only: host the gang's rendezvous store on a free port (chosen by the OS)."""
        self._store = dist.TCPStore(host, 0, self.layout.world_size, is_master=True,
                                    timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
        return self._store.port

    def init_group(self, host: str, port: int, timeout_s: float) -> None:
        """Phase 1: join the gang's torch.distributed world and build the ParallelContext."""
        self._phase("init_group", self._init_group, host, port, timeout_s)

    def _init_group(self, host: str, port: int, timeout_s: float) -> None:
        if self.layout.world_size > 1:
            store = self._store or dist.TCPStore(host, port, self.layout.world_size, is_master=False,
                                                 timeout=timedelta(seconds=timeout_s))
            dist.init_process_group(default_backend(), store=store, rank=self.rank,
                                    world_size=self.layout.world_size, timeout=timedelta(seconds=timeout_s))
            self.ctx = ParallelContext.from_initialized(self.layout, default_device())
        else:
            self.ctx = ParallelContext.single()

    def ping(self) -> float:
        """A real probe through the gang: an all-reduce over the whole world (1.0 per rank)."""
        t = torch.ones(1, device=self.ctx.device)
        if self.layout.world_size > 1:
            dist.all_reduce(t)
        return float(t)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
