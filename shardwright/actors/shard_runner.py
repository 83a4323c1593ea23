"""ShardRunner: the work of one ShardWorker, as a plain object (testable without Ray).

Start-up runs in named phases — `init_group`, `load`, `allocate_cache` — and a failure names the
phase and the rank. A step receives the controller's plan (plain lists), runs this rank's shard
over the packed tokens, passes hidden states to the next pipeline stage worker to worker
(torch.distributed send/recv, never through the controller), and on the last stage samples.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from shardwright.actors.sampling import SamplingParams, sample_tokens
from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.models.paged import PagedBatch
from shardwright.parallel.context import ParallelContext, default_backend, default_device


class StartupError(RuntimeError):
    """A worker failed in a named start-up phase."""


@dataclass
class StepMessage:
    """One step of the controller's plan, as sent to every worker of the gang."""

    token_ids: list[int]
    positions: list[int]
    slot_mapping: list[int]
    query_lens: list[int]
    block_tables: list[list[int]]
    sample_index: list[int]
    sampling: list[SamplingParams] = field(default_factory=list)  # one per sampled token
    seeds: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)


class ShardRunner:
    """One rank of a deployment's gang: process groups, weight shard, paged KV cache."""

    def __init__(self, rank: int, layout: ParallelLayout, *, threads_per_worker: int | None = None) -> None:
        self.rank, self.layout = rank, layout
        self.ctx: ParallelContext | None = None
        self.model = None
        self.cache = None
        self.block_size = 0
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

    def load(self, model_dir: str, dtype: str | None) -> int:
        """Phase 2: read this rank's slice of the checkpoint; returns the shard's bytes."""
        _, self.model = self._phase("load", load_model, model_dir, self.ctx, dtype=dtype)
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def allocate_cache(self, num_blocks: int, block_size: int) -> int:
        """Phase 3: allocate the paged KV cache; returns its bytes."""
        self.cache = self._phase("allocate_cache", self.model.new_paged_cache, num_blocks, block_size)
        self.block_size = block_size
        return self.cache.nbytes

    @torch.inference_mode()
    def step(self, msg: StepMessage) -> list[int] | None:
        """Run one packed step; the last stage's TP rank 0 returns the sampled token ids."""
        ctx = self.ctx
        batch = PagedBatch.build(msg.token_ids, msg.positions, msg.slot_mapping, msg.query_lens,
                                 msg.block_tables, self.block_size, msg.sample_index, ctx.device)
        if ctx.is_first_stage:
            x = batch.token_ids
        else:
            x = torch.empty(batch.num_tokens, self.model.spec.hidden_size, dtype=self.model.dtype,
                            device=ctx.device)
            dist.recv(x, src=ctx.group_ranks["pp"][ctx.pp_rank - 1])
        out = self.model.forward_packed(x, batch, self.cache)
        if not ctx.is_last_stage:
            dist.send(out.contiguous(), dst=ctx.group_ranks["pp"][ctx.pp_rank + 1])
            return None
        logits = self.model.full_logits(out).float()
        if ctx.tp_rank != 0:
            return None
        return sample_tokens(logits, msg.sampling, msg.seeds, msg.steps)

    def ping(self) -> float:
        """A real probe through the gang: an all-reduce over the whole world (1.0 per rank)."""
        t = torch.ones(1, device=self.ctx.device)
        if self.layout.world_size > 1:
            dist.all_reduce(t)
        return float(t)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
