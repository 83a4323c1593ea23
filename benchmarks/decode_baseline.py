"""The decode baseline: the same model and paged cache in a bare torch.distributed loop.

No Ray and no controller (the same step as the engine's: weights packed as its default
`pack_weights` packs them): `tp * pp` processes from torch.multiprocessing run the prefill and then
`steps` greedy decode steps in lock-step. Pipeline stages pass hidden states with send/recv and
the last stage sends the sampled tokens back to the first (one batch in flight: the plain loop a
user would write). Returns the time of each decode step after a warm-up step.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.models.packed import pack_model
from shardwright.models.paged import PagedBatch
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.launch import run_ranks

BLOCK = 16


def _step(model, ctx, cache, tokens, positions, tables, query_lens):
    slots = [tables[i][p // BLOCK] * BLOCK + p % BLOCK
             for i, (start, n) in enumerate(zip(positions, query_lens)) for p in range(start, start + n)]
    flat_pos = [p for start, n in zip(positions, query_lens) for p in range(start, start + n)]
    sample, acc = [], 0
    for n in query_lens:
        acc += n
        sample.append(acc - 1)
    batch = PagedBatch.build(tokens, flat_pos, slots, query_lens, tables, BLOCK, sample, ctx.device)
    if ctx.is_first_stage:
        x = batch.token_ids
    else:
        x = torch.empty(batch.num_tokens, model.spec.hidden_size, dtype=model.dtype)
        dist.recv(x, src=ctx.group_ranks["pp"][ctx.pp_rank - 1])
    out = model.forward_packed(x, batch, cache)
    first, last = ctx.group_ranks["pp"][0], ctx.group_ranks["pp"][-1]
    next_tokens = torch.empty(len(query_lens), dtype=torch.long)
    if not ctx.is_last_stage:
        dist.send(out.contiguous(), dst=ctx.group_ranks["pp"][ctx.pp_rank + 1])
    else:
        next_tokens = model.full_logits(out).argmax(dim=-1)
        if ctx.pp > 1:
            dist.send(next_tokens, dst=first)
    if ctx.pp > 1 and ctx.is_first_stage:
        dist.recv(next_tokens, src=last)
    return next_tokens.tolist()


@torch.inference_mode()
def _rank(rank: int, world: int, directory: str, layout: dict, batches: list[int], steps: int, prompt_len: int,
          dtype: str | None):
    lay = ParallelLayout(**layout)
    ctx = ParallelContext.single() if world == 1 else ParallelContext.from_initialized(lay)
    _, model = load_model(directory, ctx, dtype=dtype)
    pack_model(model)  # the engine's step: its default pack_weights
    per_seq = -(-(prompt_len + steps + 2) // BLOCK)
    cache = model.new_paged_cache(per_seq * max(batches), BLOCK)
    times = {}
    for b in batches:
        tables = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(b)]
        prompts = [[(7 * i + j) % 1000 + 1 for j in range(prompt_len)] for i in range(b)]
        tokens = _step(model, ctx, cache, sum(prompts, []), [0] * b, tables, [prompt_len] * b)
        tokens = _step(model, ctx, cache, tokens, [prompt_len] * b, tables, [1] * b)  # warm-up
        times[b], last = [], time.perf_counter()
        for s in range(steps):
            tokens = _step(model, ctx, cache, tokens, [prompt_len + 1 + s] * b, tables, [1] * b)
            now = time.perf_counter()
            times[b].append(now - last)
            last = now
    return times


def baseline_decode(directory: str, layout: ParallelLayout, batches: list[int], steps: int,
                    prompt_len: int, dtype: str | None = None) -> dict[int, list[float]]:
    """Seconds of each decode step after the warm-up, per batch size, from the first rank (all
    ranks run in lock-step; every step advances each sequence of the batch by one token), with
    the weights and cache in `dtype` (None: the checkpoint's)."""
    args = (directory, layout.model_dump(), batches, steps, prompt_len, dtype)
    return run_ranks(_rank, layout.world_size, args=args)[0]
