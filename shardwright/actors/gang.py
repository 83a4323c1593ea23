"""A job's gang of ShardWorker actors: placement, start-up, typed worker calls, step dispatch, death.

One worker per (logical) GPU, all in one Ray placement group (bundle i = rank i, packed so a TP
group, which is a run of consecutive ranks, lands on one node whenever the gang allows it).

Every call to a worker is a typed method of a gang (`WorkerGang` for what every gang does,
`ServingGang` for a deployment's, `TrainingGang` in actors/training.py for a training job's), and
each goes through one place, `WorkerGang._call`, which turns a worker's death or error into a
GangError naming the rank and node. `ShardWorker.call` is the gang's private entry into a worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import ray
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from shardwright.actors.shard_runner import ShardRunner, StepMessage
from shardwright.config import ParallelLayout

log = logging.getLogger(__name__)


class ChannelStep:
    """One step in flight through the gang's step channel (its replies come back in order)."""


def placement_advice(needed: float, free: float, total: float) -> str:
    """What to do about a gang of `needed` GPUs that did not place, given the cluster's GPUs."""
    have = f"the cluster has {free:g} free of {total:g} GPUs, the gang needs {needed:g}"
    if total == 0:
        return (f"{have}; on a CPU-only machine declare logical GPUs: `ray start --head --num-gpus N` or "
                "ray.init(num_gpus=N)")
    if total < needed:
        return f"{have}; add GPUs to the cluster or lower tp*pp"
    return f"{have}; wait for running jobs to free them, or stop some"


class GangError(RuntimeError):
    """A worker of the gang died or failed; the message names the rank and node."""

    def __init__(self, message: str, rank: int | None = None) -> None:
        super().__init__(message)
        self.rank = rank


@ray.remote
class ShardWorker:
    """Thin Ray shell: one process per (logical) GPU around a plain runner object.

    `runner_cls(rank, layout, **kwargs)` must be importable and derive from GroupMember.
    """

    def __init__(self, runner_cls, rank: int, layout: dict, kwargs: dict) -> None:
        from shardwright.actors.compute_thread import ComputeThread

        self.runner = runner_cls(rank, ParallelLayout(**layout), **kwargs)
        # A gang member's torch work all runs on one thread (see compute_thread.py); pool peers
        # answer several callers at once on Ray's threads instead (max_concurrency > 1).
        self.compute = None
        if hasattr(self.runner, "enter_thread"):
            self.compute = ComputeThread(f"shardwright-rank-{rank}", self.runner.enter_thread)

    def where(self) -> dict:
        import os

        return {"node_id": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "pid": os.getpid()}

    def serve_steps(self, host: str, port: int, token: str, rank: int) -> None:
        """Connect this worker to its controller's step channel; steps run on the compute thread."""
        from shardwright.actors.step_channel import connect_worker

        connect_worker(self.runner, host, port, token, rank, self.compute)

    def call(self, method: str, *args):
        """The gang's entry into this worker (only WorkerGang calls it, through its typed methods)."""
        fn = getattr(self.runner, method)
        return fn(*args) if self.compute is None else self.compute.call(fn, *args)

    def __ray_shutdown__(self) -> None:
        """Ray's graceful exit (an actor out of scope, `exit_actor`) finalizes the interpreter:
        the runner destroys its process groups first, so no gloo thread is left running to be
        destroyed there (issue 21). `ray.kill` (WorkerGang.kill) ends the process at once
        (`_Exit`, no destructors run) and does not come here."""
        self.call("shutdown")


@dataclass(frozen=True)
class GangConfig:
    layout: ParallelLayout
    gpus_per_worker: float = 1.0
    collective_timeout_s: float = 30.0
    placement_timeout_s: float = 60.0
    threads_per_worker: int | None = None
    # Ray node id per rank, from the scheduler's placement; None lets Ray pack the gang itself.
    bundle_nodes: tuple[str, ...] | None = None
    # Memory peers (shardwright.actors.pool_peer): ranks world_size.. of the gang, one GPU each,
    # that lend their memory to the compute ranks and join no process group.
    peers: int = 0


class WorkerGang:
    """Creates, starts, drives and tears down the workers of one job (inference or training)."""

    def __init__(self, config: GangConfig, runner_cls, runner_kwargs: dict | None = None,
                 peer_kwargs: dict | None = None) -> None:
        self.config = config
        self.runner_cls = runner_cls
        self.runner_kwargs = dict(runner_kwargs or {})
        self.peer_kwargs = dict(peer_kwargs or {})
        self.workers: list = []
        self.nodes: list[dict] = []
        self.pg = None
        self._channel = None  # the step channel (open_channel)

    def start(self) -> None:
        """Place the gang and join the compute ranks' process groups; raises GangError naming the
        rank and node of the first failure."""
        self._place()
        self._create_workers()
        host = self.nodes[0]["ip"]
        if all(n["ip"] == host for n in self.nodes):  # one node: the rendezvous store need not leave it
            host = "127.0.0.1"
        timeout = self.config.collective_timeout_s
        port = self._call([0], "open_store", host, timeout)[0]
        self._call(self.compute_ranks, "init_group", host, port, timeout)

    @property
    def compute_ranks(self) -> list[int]:
        return list(range(self.config.layout.world_size))

    @property
    def peer_ranks(self) -> list[int]:
        return list(range(self.config.layout.world_size, len(self.workers)))

    @property
    def all_ranks(self) -> list[int]:
        return list(range(len(self.workers)))

    # ---- worker calls: every one goes through _call / _call_each (error naming) -----------------
    def _call(self, ranks: list[int], method: str, *args, timeout_s: float | None = None) -> list:
        """`method(*args)` of the runner on each of `ranks`; results in that order (GangError
        naming the rank and node of a worker that died or raised)."""
        return self._get([self.workers[r].call.remote(method, *args) for r in ranks], ranks, timeout_s)

    def _call_each(self, method: str, args_by_rank: dict[int, tuple], timeout_s: float | None = None) -> list:
        """`method(*args)` with each rank's own args; results in the dict's order."""
        ranks = list(args_by_rank)
        refs = [self.workers[r].call.remote(method, *args_by_rank[r]) for r in ranks]
        return self._get(refs, ranks, timeout_s)

    def memory(self, timeout_s: float | None = None) -> list[dict]:
        """Every worker's memory ledger (budget, resident bytes by kind, high-water mark), by rank."""
        return self._call(self.all_ranks, "memory", timeout_s=timeout_s)

    def _place(self) -> None:
        n = self.config.layout.world_size + self.config.peers
        bundles = [{"GPU": self.config.gpus_per_worker, "CPU": 0.001} for _ in range(n)]
        selectors = None
        if self.config.bundle_nodes is not None:
            nodes = list(self.config.bundle_nodes)
            if len(nodes) not in (self.config.layout.world_size, n):
                raise GangError(f"placement names {len(nodes)} nodes for {self.config.layout.world_size} ranks "
                                f"and {self.config.peers} memory peers")
            # Ray labels every node with its id: this pins bundle i (rank i) to the planned node;
            # memory peers the placement does not name go wherever there is room.
            selectors = [{"ray.io/node-id": node} for node in nodes] + [{} for _ in range(n - len(nodes))]
        self.pg = placement_group(bundles, strategy="PACK", bundle_label_selector=selectors)
        try:
            ray.get(self.pg.ready(), timeout=self.config.placement_timeout_s)
        except GetTimeoutError as err:
            remove_placement_group(self.pg)
            total, free = ray.cluster_resources().get("GPU", 0), ray.available_resources().get("GPU", 0)
            raise GangError(
                f"could not place {n} workers of {self.config.gpus_per_worker} GPU each within "
                f"{self.config.placement_timeout_s:.0f} s: {placement_advice(n * self.config.gpus_per_worker, free, total)}"
            ) from err

    def _create_workers(self) -> None:
        from shardwright.actors.pool_peer import PeerRunner

        layout = self.config.layout.model_dump()
        world = self.config.layout.world_size
        for rank in range(world + self.config.peers):
            strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=rank)
            is_peer = rank >= world
            kwargs = {"threads_per_worker": self.config.threads_per_worker,
                      **(self.peer_kwargs if is_peer else self.runner_kwargs)}
            # A peer answers fetches from other nodes while its step calls come in.
            worker = ShardWorker.options(num_gpus=self.config.gpus_per_worker, num_cpus=0.001,
                                        max_concurrency=4 if is_peer else 1, scheduling_strategy=strategy
                                        ).remote(PeerRunner if is_peer else self.runner_cls, rank, layout, kwargs)
            self.workers.append(worker)
        self.nodes = self._get([w.where.remote() for w in self.workers], list(range(len(self.workers))))

    def describe(self, rank: int) -> str:
        node = self.nodes[rank] if rank < len(self.nodes) else {}
        if rank >= self.config.layout.world_size:
            return (f"memory peer {rank - self.config.layout.world_size} (rank {rank}) on node "
                    f"{node.get('ip', '?')} ({str(node.get('node_id', '?'))[:12]})")
        return f"rank {rank} on node {node.get('ip', '?')} ({str(node.get('node_id', '?'))[:12]})"

    def _get(self, refs: list, ranks: list[int], timeout_s: float | None = None,
            poll_s: float = 1.0) -> list:
        """ray.get of worker calls that turns a worker failure into a GangError naming the rank and
        node (the one place every worker call's result passes through).

        The common case is two Ray calls (wait for all, get all). While some results are late,
        the finished ones are checked every `poll_s`, so a dead worker is reported within about
        `poll_s` even though its peers are still blocked in a collective with it.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        rank_of = dict(zip(refs, ranks))
        while True:
            left = poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic()))
            ready, waiting = ray.wait(refs, num_returns=len(refs), timeout=left)
            if not waiting:
                return self._fetch(ready, rank_of, refs)
            self._fetch(ready, rank_of, ready)  # raises for a finished worker that failed
            if deadline is not None and time.monotonic() >= deadline:
                raise GangError(f"gang did not answer within {timeout_s} s (waiting on ranks "
                                f"{sorted(rank_of[r] for r in waiting)})")

    def _fetch(self, ready: list, rank_of: dict, order: list) -> list:
        try:
            values = ray.get(ready)
        except Exception as err:
            self._raise_dead_worker(err)  # a dead peer explains its live peers' errors
            for ref in ready:  # otherwise name the worker that raised
                self._fetch_one(ref, rank_of[ref])
            raise
        by_ref = dict(zip(ready, values))
        return [by_ref[r] for r in order]

    def _get_channel(self, timeout_s: float | None) -> list:
        """Every worker's reply to the oldest step in flight through the step channel, by rank.
        A worker that died has closed its socket, which ends the wait at once (its live peers
        may be stuck in a collective with it); it is then named."""
        from shardwright.actors.step_channel import ChannelClosed

        channel, n = self._channel, len(self.workers)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results, pending = [None] * n, list(range(n))
        while pending:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise GangError(f"gang did not answer within {timeout_s} s (waiting on "
                                f"{', '.join(self.describe(r) for r in pending)})", pending[0])
            for rank in channel.wait_ready(pending, left):
                try:
                    status, value = channel.read(rank)
                except (ChannelClosed, OSError) as err:
                    self._raise_dead_worker(err)  # names it "died" once Ray knows
                    raise GangError(f"worker {self.describe(rank)} closed its step channel: the worker "
                                    f"process exited ({err})", rank) from err
                if status != "ok":
                    raise GangError(f"worker {self.describe(rank)} failed: {value}", rank)
                results[rank] = value
                pending.remove(rank)
        return results

    def check_alive(self, timeout_s: float = 5.0) -> None:
        """Raise GangError naming the first worker that died (a busy one counts as alive)."""
        self._raise_dead_worker(GangError("liveness check"), timeout_s)

    def _raise_dead_worker(self, cause: Exception, timeout_s: float = 5.0) -> None:
        """Raise GangError for the first worker that no longer answers, if any."""
        probes = [w.where.remote() for w in self.workers]
        ready, waiting = ray.wait(probes, num_returns=len(probes), timeout=timeout_s)
        for rank, probe in enumerate(probes):
            if probe in waiting:
                continue  # busy (maybe stuck in a collective): alive as far as we know
            try:
                ray.get(probe)
            except RayActorError as err:
                raise GangError(f"worker {self.describe(rank)} died: {type(err).__name__}", rank) from cause

    def _fetch_one(self, ref, rank: int):
        try:
            return ray.get(ref)
        except RayActorError as err:
            raise GangError(f"worker {self.describe(rank)} died: {type(err).__name__}", rank) from err
        except Exception as err:  # the worker raised: keep its own message, add where
            cause = getattr(err, "cause", None) or err
            raise GangError(f"worker {self.describe(rank)} failed: {cause}", rank) from err

    def open_channel(self, timeout_s: float = 60.0) -> None:
        """Connect every worker to a step channel of this process (shardwright.actors.step_channel):
        from now on `dispatch` writes each step once per worker socket, which the worker's
        compute thread reads, and `get` reads the replies. Raises if it cannot be set up."""
        from shardwright.actors.step_channel import StepChannel

        here = ray.util.get_node_ip_address()
        # listen where the workers reach this process, and nowhere else: loopback when all are here
        host = "127.0.0.1" if all(n["ip"] == here for n in self.nodes) else here
        channel = StepChannel(host, len(self.workers))
        try:
            ranks = list(range(len(self.workers)))
            self._get([w.serve_steps.remote(channel.host, channel.port, channel.token, r)
                      for r, w in zip(ranks, self.workers)], ranks, timeout_s=timeout_s)
            channel.accept_all(timeout_s)
        except BaseException:
            channel.close()
            raise
        self._channel = channel

    @property
    def dispatch_mode(self) -> str:
        """How steps reach the workers: 'step channel' or 'actor calls'."""
        return "step channel" if self._channel is not None else "actor calls"

    def dispatch(self, msg: StepMessage):
        """Send one step to every worker; returns a handle for `step_results` (the step channel
        when `open_channel` ran, else one actor call per worker). Replies to channel steps come
        back in dispatch order."""
        if self._channel is not None:
            from shardwright.actors.step_channel import ChannelClosed

            try:
                self._channel.send(msg)
            except ChannelClosed as err:  # a worker died since the last step: name it
                self._raise_dead_worker(err)
                raise GangError(f"could not send the step to {self.describe(err.rank)}: {err}", err.rank) from err
            return ChannelStep()
        return [w.call.remote("step", msg) for w in self.workers]

    def step_results(self, handle, timeout_s: float | None = None) -> list:
        """Every worker's reply to the step `dispatch` returned `handle` for, by rank."""
        if isinstance(handle, ChannelStep):
            return self._get_channel(timeout_s)
        return self._get(handle, self.all_ranks, timeout_s)

    def sampler_rank(self) -> int:
        """Rank whose step returns the sampled tokens: TP rank 0 of the last pipeline stage."""
        from shardwright.parallel.context import AXES, mesh_rank

        layout = self.config.layout
        return mesh_rank({**dict.fromkeys(AXES, 0), "pp": layout.pp - 1}, layout)

    def ping(self, timeout_s: float = 10.0) -> None:
        """A real probe: an all-reduce through the compute ranks; the peers answer `memory`."""
        ranks = self.compute_ranks
        values = self._call(ranks, "ping", timeout_s=timeout_s)
        self._call(self.peer_ranks, "memory", timeout_s=timeout_s)
        expected = float(len(ranks))
        if any(v != expected for v in values):
            raise GangError(f"gang ping returned {values}, expected {expected} on every rank")

    def shutdown_runners(self, timeout_s: float | None = None) -> None:
        """Every compute rank's runner releases what holds its process groups (its `shutdown`), as
        Ray's graceful exit does through `ShardWorker.__ray_shutdown__`; the workers stay up."""
        self._call(self.compute_ranks, "shutdown", timeout_s=timeout_s)

    def kill(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None:
            channel.close()
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers.clear()
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


class ServingGang(WorkerGang):
    """A deployment's gang: ShardRunner compute ranks, then PeerRunner memory peers."""

    def __init__(self, config: GangConfig, runner_kwargs: dict | None = None, peer_kwargs: dict | None = None) -> None:
        super().__init__(config, ShardRunner, runner_kwargs, peer_kwargs)

    def load_shards(self, model_dir: str, dtype: str | None, pooled_by_rank: dict[int, dict], prefetch_depth: int,
                    quant: tuple[str, int] | None) -> None:
        """Every compute rank loads its shard (its pooled layers, if any, from where the plan put them)."""
        self._call_each("load", {r: (model_dir, dtype, pooled_by_rank.get(r), prefetch_depth, quant)
                                 for r in self.compute_ranks})

    def load_draft(self, model_dir: str, dtype: str | None) -> None:
        """The sampler rank loads the speculative draft model."""
        self._call([self.sampler_rank()], "load_draft", model_dir, dtype)

    def load_on_peer(self, peer_rank: int, model_dir: str, dtype: str | None, items: list) -> dict:
        """Memory peer `peer_rank` loads the pooled (rank, layer) `items`; their handles by item."""
        return self._call([peer_rank], "load", model_dir, dtype, items)[0]

    def unlink_peers(self) -> None:
        """Every owner has mapped its peers' segments: the peers drop their names."""
        self._call(self.peer_ranks, "unlink")

    def peer_tensors(self, peer_rank: int, rank: int, layer: int):
        """The tensors memory peer `peer_rank` holds for (rank, layer)."""
        return self._call([peer_rank], "tensors", rank, layer)[0]

    def allocate_cache(self, num_blocks: int, block_size: int, spill_blocks: int = 0) -> None:
        self._call(self.compute_ranks, "allocate_cache", num_blocks, block_size, spill_blocks)

    def prompt_logits(self, token_ids: list[int], timeout_s: float | None = None):
        """Full-vocabulary logits of one prompt (the sampler rank's answer; every rank takes part)."""
        return self._call(self.all_ranks, "prompt_logits", token_ids, timeout_s=timeout_s)[self.sampler_rank()]

