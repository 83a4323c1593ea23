"""Launch N torch.distributed ranks as local processes and collect what each returns.

Used by the multi-process tests, by the bare-torch baselines in `benchmarks/`, and by anything
that needs a gloo (CPU) or NCCL (GPU) world without Ray:

    results = run_ranks(my_fn, world_size=4, args=(x,))   # my_fn(rank, world_size, x) -> value

`my_fn` must be importable (module level) because ranks are started with the `spawn` method.
Rendezvous uses a file store in a private temporary directory, so no port is ever hard-coded
and parallel test runs cannot collide.

Teardown (issue 21: a rank now and then died with "terminate called without an active exception",
a C++ thread destroyed while still running). A rank that returns does not close its world at once:
1. a barrier over the world, then a second rendezvous through a file store (no sockets): when a
   rank passes it, every rank has left the barrier, so no gloo message is in flight to or from
   anyone and closing the sockets cannot cut a peer off mid-collective;
2. `destroy_process_group` shuts every group down, and a garbage collection destroys the groups
   left in Python reference cycles while the interpreter is whole, so their gloo threads are
   joined now rather than during interpreter shutdown. (A cycle through C++, such as a trainer's
   gradient hooks, no collector breaks: `TrainerRank.close` removes those hooks before `fn`
   returns.) On torch 2.13 one gloo group is still referenced from inside torch after this;
   its threads end with the process (tests/training/test_rank_teardown.py counts them);
3. the rank then ends with `os._exit(0)` after its atexit handlers (`leave_without_finalizing`),
   so interpreter finalization never destroys those threads.
`scripts/teardown_loop.py` launches each training layout's ranks as `bench train` does and counts
how they end: on the code before this teardown it caught the abort once, at dp2 (1 of 75 dp2
launches, 0 of 27 at tp2/pp2/cp2/dp2-offload); with it, 0 aborts in 99 dp2 and 34 other launches.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from shardwright.parallel.context import default_backend


def _rank_main(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    args: tuple,
    workdir: str,
    backend: str,
    num_threads: int,
    timeout_s: float,
) -> None:
    torch.set_num_threads(num_threads)
    dist.init_process_group(
        backend=backend,
        init_method=f"file://{workdir}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    returned = False
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, Path(workdir) / f"result-{rank}.pt")
        returned = True
    finally:
        close_world(rank, world_size, workdir, timeout_s, quiesce=returned)
    leave_without_finalizing()


def leave_without_finalizing() -> None:
    """End a rank that has returned and closed its world: run the atexit handlers, flush, then
    `os._exit(0)`, skipping interpreter finalization, where native threads still alive (the gloo
    group torch keeps, see the module doc) would be destroyed in an arbitrary order: the one place
    left where a joinable std::thread could be destroyed (std::terminate, SIGABRT)."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def close_world(rank: int, world_size: int, workdir: str, timeout_s: float, *, quiesce: bool = True) -> None:
    """Leave the world without cutting a peer off (see the module doc). `quiesce=False` (this rank
    failed: its peers are being stopped) skips the rendezvous and only tears down."""
    try:
        if quiesce and world_size > 1:
            dist.barrier()
            store = dist.FileStore(f"{workdir}/teardown", world_size)
            store.set(f"left-barrier-{rank}", "1")
            store.wait([f"left-barrier-{r}" for r in range(world_size)], timedelta(seconds=timeout_s))
    finally:
        dist.destroy_process_group()
        gc.collect()


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    *,
    backend: str | None = None,
    num_threads: int | None = None,
    timeout_s: float = 300.0,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` processes; return results by rank.

    A failure in any rank raises in the caller with that rank's traceback.
    `num_threads` defaults to the machine's cores divided evenly among the ranks.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    threads = num_threads or max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory(prefix="shardwright-ranks-") as workdir:
        mp.start_processes(
            _rank_main,
            args=(fn, world_size, args, workdir, backend or default_backend(), threads, timeout_s),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return [
            torch.load(Path(workdir) / f"result-{r}.pt", weights_only=False)
            for r in range(world_size)
        ]
