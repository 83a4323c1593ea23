"""ShardRunner: the work of one ShardWorker, as a plain object (testable without Ray).

Start-up runs in named phases — `init_group`, `load`, `allocate_cache` — and a failure names the
phase and the rank. A step receives the controller's plan (plain lists), runs this rank's shard
over the packed tokens, passes hidden states to the next pipeline stage worker to worker
(torch.distributed send/recv, never through the controller), and on the last stage samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from shardwright.actors.group_member import GroupMember
from shardwright.actors.sampling import SamplingParams, sample_tokens
from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.models.paged import PagedBatch


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


class ShardRunner(GroupMember):
    """One rank of a deployment's gang: process groups, weight shard, paged KV cache."""

    def __init__(self, rank: int, layout: ParallelLayout, *, threads_per_worker: int | None = None) -> None:
        super().__init__(rank, layout, threads_per_worker=threads_per_worker)
        self.model = None
        self.cache = None
        self.block_size = 0

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
