"""Rank function for tests/models/test_paged_cp.py (module level, for `spawn`).

Two packed serving steps on a tiny model over a paged cache with small blocks (4 tokens), at
any CP size: step 1 prefills two prompts (37 and 10 tokens); step 2 mixes a decode token of the
first, the 9-token continuation of the second (a chunked prefill over cached context) and a new
6-token prompt. Each rank returns the sampled logits of both steps, the rows it computed, and
the collectives it issued, counted by patching torch.distributed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.models.paged import PagedBatch
from shardwright.parallel.context import ParallelContext

BLOCK = 4
PROMPTS = {"a": 37, "b": 19, "c": 6}  # b arrives in two chunks: 10 then 9 tokens
# Blocks interleave between sequences so that ownership (block % cp) is irregular.
TABLES = {"a": [0, 3, 4, 7, 9, 10, 12, 15, 16, 19, 20], "b": [1, 2, 5, 6, 8], "c": [11, 13]}
STEPS = [
    [("a", 0, 37), ("b", 0, 10)],  # (sequence, first position, tokens)
    [("a", 37, 1), ("b", 10, 9), ("c", 0, 6)],
]


def token(seq: str, pos: int) -> int:
    return (ord(seq) * 31 + pos * 7) % 200 + 1


def build_step(parts) -> dict:
    ids, positions, slots, lens, tables, sample = [], [], [], [], [], []
    for seq, start, n in parts:
        for p in range(start, start + n):
            ids.append(token(seq, p))
            positions.append(p)
            slots.append(TABLES[seq][p // BLOCK] * BLOCK + p % BLOCK)
        lens.append(n)
        tables.append(TABLES[seq])
        sample.append(len(ids) - 1)
    return dict(token_ids=ids, positions=positions, slot_mapping=slots, query_lens=lens,
                block_tables=tables, block_size=BLOCK, sample_index=sample)


class _Counting:
    """Counts batch_isend_irecv calls, all-gathers and all-reduces while active."""

    def __init__(self):
        self.seen = {"p2p_batches": 0, "all_gathers": 0, "all_reduces": 0}
        self.saved = {}

    def __enter__(self):
        names = {"batch_isend_irecv": "p2p_batches", "all_gather_into_tensor": "all_gathers",
                 "all_gather_single": "all_gathers", "all_gather": "all_gathers",
                 "all_reduce": "all_reduces"}
        for name, key in names.items():
            if hasattr(dist, name):
                self.saved[name] = fn = getattr(dist, name)
                setattr(dist, name, self._wrap(fn, key))
        return self

    def _wrap(self, fn, key):
        def wrapper(*args, **kwargs):
            self.seen[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(dist, name, fn)


def paged_cp_main(rank: int, world: int, model_dir: str) -> dict:
    if world == 1:
        ctx = ParallelContext.single("cpu")
    else:
        ctx = ParallelContext.from_initialized(ParallelLayout(cp=world), device="cpu")
    _, model = load_model(model_dir, ctx)
    cache = model.new_paged_cache(24, BLOCK)
    result = {"logits": [], "rows": [], "comm": []}
    with torch.inference_mode():
        for parts in STEPS:
            step = build_step(parts)
            batch = PagedBatch.build(**step, device=torch.device("cpu"))
            with _Counting() as counting:
                logits = model.full_logits(model.forward_packed(batch.token_ids, batch, cache))
            result["logits"].append(logits.float())
            rows = batch.cp_share(cache).rows.tolist() if world > 1 else list(range(batch.num_tokens))
            result["rows"].append(rows)
            result["comm"].append(counting.seen)
    return result
