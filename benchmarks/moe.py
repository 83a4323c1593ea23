"""Mixture of experts at ep = 1 and ep = 2: tokens/s and all-to-all time per step.

Run: `shardwright bench moe [--quick] [--json]` from a source checkout.

Model: a random Mixtral-style checkpoint (hidden 512, 8 experts of width 1024, top 2, 4 layers,
8 heads / 4 kv heads, vocab 1024), fp32. Each layout runs in a gloo world of local processes
started by `run_ranks`: ep = 1 with every core, ep = 1 with one thread (on a loaded machine an
OpenMP team whose cores are taken by other processes spins at every barrier: the one-thread run
separates that from the layout), and ep = 2 with the cores split evenly (one thread per rank on two
cores). Measured per layout, in the same run:
    prefill   one forward of a batch of 4 sequences of 128 tokens (512 rows), median of 3;
    decode    32 decode steps of a batch of 16 sequences over a KV cache (16 rows a step), median step.
tokens_per_s = rows / wall time of one step (slowest rank, after a barrier); a2a_ms_per_step = the
step's time in the all-to-alls (counts and payloads, forward: `ExpertCommStats.all_to_all_s`), mean
over ranks; pairs_remote = routed (token, expert) pairs that crossed ranks per step. The ratio
column is tokens/s over the faster of the two ep = 1 points at the same phase. The machine's
load average is in the notes.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

COLUMNS = ["phase", "ep", "threads", "rows_per_step", "step_ms", "tokens_per_s", "ratio_vs_ep1", "a2a_ms_per_step",
           "pairs_remote_per_step"]


def _spec(quick: bool):
    from shardwright.config import ModelSpec

    return ModelSpec(architecture="llama", vocab_size=1024, hidden_size=256 if quick else 512,
                     intermediate_size=512 if quick else 1024, num_layers=2 if quick else 4, num_heads=8,
                     num_kv_heads=4, head_dim=32 if quick else 64, max_position_embeddings=512, norm_eps=1e-5,
                     num_experts=8, experts_per_token=2)


def _timed(model, stats, fn, world) -> tuple[float, float, int]:
    """(wall s of fn, slowest rank; all-to-all s, mean over ranks; remote pairs summed over ranks)."""
    before = (stats.all_to_all_s, stats.pairs_sent_remote)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    fn()
    wall = torch.tensor([time.perf_counter() - start, stats.all_to_all_s - before[0],
                         float(stats.pairs_sent_remote - before[1])], dtype=torch.float64)
    if world > 1:
        most = wall.clone()
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        dist.all_reduce(wall)
        return float(most[0]), float(wall[1]) / world, int(wall[2])
    return float(wall[0]), float(wall[1]), int(wall[2])


def rank_main(rank: int, world: int, model_dir: str, quick: bool) -> dict:
    from shardwright.config import ParallelLayout
    from shardwright.models import load_model
    from shardwright.models.moe import attach_comm_stats
    from shardwright.parallel.context import ParallelContext
    from shardwright.parallel.experts import ExpertCommStats

    ctx = ParallelContext.single("cpu") if world == 1 else ParallelContext.from_initialized(ParallelLayout(ep=world))
    spec, model = load_model(model_dir, ctx)
    stats = ExpertCommStats()
    attach_comm_stats(model, stats)
    gen = torch.Generator().manual_seed(0)
    batch, seq = (2, 64) if quick else (4, 128)
    ids = torch.randint(0, spec.vocab_size, (batch, seq), generator=gen)
    positions = torch.arange(seq).expand(batch, seq)
    out = {}
    with torch.inference_mode():
        model(ids[:, :8], positions[:, :8])  # warm-up
        runs = [_timed(model, stats, lambda: model(ids, positions), world) for _ in range(3)]
        out["prefill"] = (batch * seq, runs)
        rows, steps = (8, 8) if quick else (16, 32)
        cache = model.new_cache(rows, 16 + steps)
        model(torch.randint(0, spec.vocab_size, (rows, 16), generator=gen), torch.arange(16).expand(rows, 16), cache)
        runs = []
        for s in range(steps):
            tok = torch.randint(0, spec.vocab_size, (rows, 1), generator=gen)
            pos = torch.full((rows, 1), 16 + s)
            runs.append(_timed(model, stats, lambda: model(tok, pos, cache), world))
        out["decode"] = (rows, runs)
    return out


def _measure(model_dir: str, ep: int, threads: int, quick: bool) -> dict:
    from shardwright.parallel.launch import run_ranks

    return run_ranks(rank_main, ep, args=(model_dir, quick), num_threads=threads)[0]


def run(quick: bool = False) -> dict:
    from benchmarks.runner import measure_point
    from shardwright.models.random_init import write_random_checkpoint

    load_before = os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory(prefix="shardwright-bench-moe-") as tmp:
        model_dir = write_random_checkpoint(tmp, _spec(quick), seed=1, std=0.05)
        cores = os.cpu_count() or 1
        points = [(1, cores), (1, 1), (2, max(1, cores // 2))]
        by_point = {(ep, t): measure_point({"ep": ep, "threads": t}, _measure, str(model_dir), ep, t, quick)
                    for ep, t in points}
    for phase in ("prefill", "decode"):
        base = max((got[phase][0] / statistics.median(r[0] for r in got[phase][1])
                    for (ep, _), got in by_point.items() if ep == 1 and got is not None), default=None)
        for (ep, threads), got in by_point.items():
            if got is None:
                continue
            rows, runs = got[phase]
            step = statistics.median(r[0] for r in runs)
            tps = rows / step
            results.append({"phase": phase, "ep": ep, "threads": threads, "rows_per_step": rows, "step_ms": 1e3 * step,
                            "tokens_per_s": tps, "ratio_vs_ep1": tps / base if base else None,
                            "a2a_ms_per_step": 1e3 * statistics.mean(r[1] for r in runs),
                            "pairs_remote_per_step": statistics.mean(r[2] for r in runs)})
    load_after = os.getloadavg()
    notes = [f"cores: {os.cpu_count()}; ratio_vs_ep1: tokens/s over the faster ep=1 point of the phase",
             f"1-minute load average before / after: {load_before[0]:.1f} / {load_after[0]:.1f}",
             "a2a time is forward only (no backward here); on CPU it includes waiting for the slower rank"]
    return {"results": results, "columns": COLUMNS, "notes": notes,
            "load_1m": [load_before[0], load_after[0]]}
