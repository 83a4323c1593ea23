"""GroupMember: what every gang worker does before its own work — join the torch.distributed
world of its gang and build the ParallelContext — as a plain object (testable without Ray).

Start-up runs in named phases; a failure names the phase and the rank (StartupError).
"""

from __future__ import annotations

import gc
import os
import socket
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from shardwright.config import ParallelLayout
from shardwright.parallel.context import ParallelContext, StartupError, default_backend, default_device


def bind_cores(rank: int, world_size: int, threads: int) -> tuple[int, ...] | None:
    """Bind every thread of this process (and the threads it starts later) to the `threads` cores
    rank `rank` owns: when the gang's ranks together need no more cores than this process may
    use, rank r takes the r-th run of `threads` usable cores. Returns those cores, or None
    (nothing bound) when ranks would share cores (more ranks than runs: a gang spread over nodes,
    or oversubscribed) or the platform cannot bind. A rank's OpenMP team then stays on its own
    cores instead of migrating onto its neighbour's (tp = 2 on 2 cores: one core each); a rank
    given every usable core (tp = 1 here) is left as it is."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    usable = sorted(os.sched_getaffinity(0))
    runs = len(usable) // threads
    if runs == 0 or runs < world_size:
        return None
    cores = tuple(usable[rank * threads:(rank + 1) * threads])
    if len(cores) == len(usable):
        return cores  # the whole usable set already
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else ["0"]:
        try:
            os.sched_setaffinity(int(task), cores)
        except OSError:  # a thread that ended meanwhile
            pass
    return cores


class GroupMember:
    """One rank of a gang: rendezvous, process groups, a real probe through the world."""

    def __init__(self, rank: int, layout: ParallelLayout, *, threads_per_worker: int | None = None) -> None:
        self.rank, self.layout = rank, layout
        self.ctx: ParallelContext | None = None
        self._store: dist.TCPStore | None = None
        self.num_threads: int | None = None  # intra-op threads of every thread that runs work here
        self.cores: tuple[int, ...] | None = None  # the CPU cores this worker is bound to
        if not torch.cuda.is_available():
            self.num_threads = threads_per_worker or max(1, (os.cpu_count() or 1) // layout.world_size)
            torch.set_num_threads(self.num_threads)
            self.cores = bind_cores(rank, layout.world_size, self.num_threads)
        self._threads_entered: set[int] = {threading.get_ident()}

    def enter_thread(self) -> None:
        """Apply this worker's per-thread settings (intra-op thread count; CUDA device) on the
        calling thread, once per thread: the worker's compute thread (`compute_thread.py`)
        would otherwise start with the process defaults."""
        ident = threading.get_ident()
        if ident in self._threads_entered:
            return
        self._threads_entered.add(ident)
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        if self.ctx is not None and self.ctx.device.type == "cuda":
            torch.cuda.set_device(self.ctx.device)

    def set_num_threads(self, threads: int) -> None:
        """Change the intra-op thread count here and on every thread that enters later."""
        self.num_threads = threads
        self._threads_entered = {threading.get_ident()}
        torch.set_num_threads(threads)

    def _phase(self, name: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as err:
            raise StartupError(f"rank {self.rank} failed in start-up phase '{name}': {err}") from err

    def open_store(self, host: str, timeout_s: float) -> int:
        """Rank 0 only: host the gang's rendezvous store on a free port (chosen by the OS).

        torch's TCPStore listens on every interface whatever `host` says; it is given a socket
        bound to `host` alone instead (the address the other ranks use: loopback for a one-node
        gang), so the store cannot be reached through the node's other addresses."""
        listener = socket.create_server((host, 0))
        port = listener.getsockname()[1]
        self._store = dist.TCPStore(host, port, self.layout.world_size, is_master=True,
                                    timeout=timedelta(seconds=timeout_s), wait_for_workers=False,
                                    master_listen_fd=listener.detach())  # the store owns the socket now
        return port

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
        self._threads_entered = set()  # the device is known now: threads that entered before
        self.enter_thread()  # (the compute thread at its start) apply it at their next entry

    def ping(self) -> float:
        """A real probe through the gang: an all-reduce over the whole world (1.0 per rank)."""
        t = torch.ones(1, device=self.ctx.device)
        if self.layout.world_size > 1:
            dist.all_reduce(t)
        return float(t)

    def shutdown(self) -> None:
        """Leave the world so that no gloo thread outlives it (issue 21): destroy the process
        groups, drop the references to them (a subclass drops its own first: model, trainer), and
        collect, so each group's C++ object is freed and joins its threads now rather than during
        interpreter finalization, where a std::thread destroyed while running aborts the process
        (std::terminate). Called by ShardWorker's graceful exit; idempotent."""
        if dist.is_initialized():
            dist.destroy_process_group()
        self.ctx = None
        self._store = None
        gc.collect()
