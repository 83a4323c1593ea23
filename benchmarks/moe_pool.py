"""Expert pooling: decode with 25% / 50% of the experts pooled, with and without the pre-gate prefetch,
beside all-resident, in the same run.

Run: `shardwright bench moe_pool [--quick] [--json]` from a source checkout.

Model: the random Mixtral-style checkpoint of `bench moe` (hidden 512, 8 experts of width 1024,
top 2, 4 layers; quick: hidden 256, width 512, 2 layers), fp32, one process (ep = 1), the bare
decode loop (contiguous KV cache). Points:
- resident: every expert in the model (no budget);
- pooled_fraction f in {0.25, 0.5} x prefetch in {on, off}: f of the experts (coldest first:
  pool/expert_plan.py) in host memory, a budget of exactly what the planner counts (the resident
  weights, 2 fetch slots per pooled MoE layer, the KV cache), the experts a step uses fetched into
  the slots: ahead, as the pre-gate predicts them from the previous layer's input (prefetch on), or
  on demand when the layer asks (off; a slot still holding the expert is a hit either way).
Each point decodes the same prompts greedily (batch 1 and 8, `steps` tokens after a 16-token
prompt): tokens_per_s over the decode steps (median step), same_tokens = the greedy tokens equal
the resident run's, bytes_moved_per_token = bytes fetched (ahead + on demand) / tokens produced,
hit_rate = pooled experts used that were in a slot / pooled experts used, pregate_hit_rate = the
share of the experts each layer's gate chose that the pre-gate predicted (all experts, resident
or not; layer 0 has no prediction), wait_ms_per_step = compute time spent waiting on prefetches
plus on-demand fetches, peak_resident_bytes = the ledger's high-water mark (<= budget_bytes). Each point
runs in turns with the resident model (resident, pooled, resident, pooled per batch); each side's
faster run counts: resident_tokens_per_s, and slowdown = resident tokens/s over the point's. Every point runs on one core fewer than the machine has (the prefetch thread's).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from benchmarks.runner import measure_point

COLUMNS = ["pooled_fraction", "prefetch", "batch", "tokens_per_s", "resident_tokens_per_s", "slowdown", "same_tokens",
           "bytes_moved_per_token", "hit_rate", "pregate_hit_rate", "wait_ms_per_step", "peak_resident_bytes",
           "budget_bytes"]
FRACTIONS = (0.25, 0.5)
SLOTS = 2
PROMPT_LEN = 16


def _spec(quick: bool):
    from benchmarks.moe import _spec as moe_spec

    return moe_spec(quick)


def decode(model, batch: int, steps: int, vocab: int) -> tuple[list[float], list[list[int]]]:
    """(seconds per decode step, greedy tokens per sequence) after a PROMPT_LEN prefill."""
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, vocab, (batch, PROMPT_LEN), generator=gen)
    cache = model.new_cache(batch, PROMPT_LEN + steps + 1)
    times, tokens = [], []
    with torch.inference_mode():
        logits = model.full_logits(model(ids, torch.arange(PROMPT_LEN).expand(batch, PROMPT_LEN), cache)[:, -1])
        for s in range(steps):
            tok = logits.argmax(dim=-1, keepdim=True)
            tokens.append(tok[:, 0].tolist())
            start = time.perf_counter()
            logits = model.full_logits(model(tok, torch.full((batch, 1), PROMPT_LEN + s), cache)[:, -1])
            times.append(time.perf_counter() - start)
    return times, [list(t) for t in zip(*tokens)]


def _pooled(model_dir: str, resident, fraction: float, prefetch: bool, batches: list[int], steps: int) -> dict:
    """Per batch: the pooled model's (decode, traffic, ledger peak, budget) and the resident
    model's decode, each the faster of two runs made in turns with the other's."""
    from shardwright.config import ModelSpec, ParallelLayout
    from shardwright.parallel.context import ParallelContext
    from shardwright.pool.expert_plan import plan_experts
    from shardwright.pool.experts import expert_sizes, load_expert_pooled
    from shardwright.pool.ledger import MemoryLedger
    from shardwright.pool.sizing import shard_sizes

    ctx = ParallelContext.single("cpu")
    spec = ModelSpec.from_hf_dir(model_dir)
    sizes, other = expert_sizes(spec, ctx)
    kv = shard_sizes(spec, ParallelLayout(), 0).kv_bytes_per_token * max(batches) * (PROMPT_LEN + steps + 1)
    plan = plan_experts(sizes, budget_bytes=1 << 62, fixed_bytes=other + kv, slots=SLOTS, host_bytes=1 << 62,
                        force_fraction=fraction)
    budget = other + kv + plan.resident_expert_bytes() + plan.slot_bytes()
    ledger = MemoryLedger(budget)
    _, model, pool = load_expert_pooled(model_dir, ctx, plan, ledger, prefetch=prefetch)
    ledger.reserve("kv_cache", kv)
    out = {}
    try:
        for b in batches:
            runs = []
            for _ in range(2):
                base = decode(resident, b, steps, spec.vocab_size)
                before = pool.traffic()
                times, tokens = decode(model, b, steps, spec.vocab_size)
                after = pool.traffic()
                delta = {k: after[k] - before[k] for k in ("bytes_fetched", "hits", "misses", "gate_chosen",
                                                            "pregate_predicted", "fetch_wait_s", "on_demand_s")}
                runs.append((base, (times, tokens, delta)))
            best = lambda side: min((r[side] for r in runs), key=lambda r: statistics.median(r[0]))  # noqa: E731
            out[b] = (best(0), best(1), ledger.high_water, budget)
    finally:
        pool.close()
    return out


def _row(fraction, prefetch, batch, times, base_tps, same, delta=None, peak=None, budget=None) -> dict:
    steps = len(times)
    tps = batch / statistics.median(times)
    row = {"pooled_fraction": fraction, "prefetch": prefetch, "batch": batch, "tokens_per_s": tps,
           "resident_tokens_per_s": base_tps, "slowdown": base_tps / tps if base_tps else None, "same_tokens": same, "peak_resident_bytes": peak,
           "budget_bytes": budget}
    if delta is not None:
        used = delta["hits"] + delta["misses"]
        row.update(bytes_moved_per_token=delta["bytes_fetched"] / (batch * (steps + 1)),
                   hit_rate=delta["hits"] / used if used else None,
                   pregate_hit_rate=delta["pregate_predicted"] / delta["gate_chosen"] if delta["gate_chosen"] else None,
                   wait_ms_per_step=1e3 * (delta["fetch_wait_s"] + delta["on_demand_s"]) / (steps + 1))
    return row


def run(quick: bool = False) -> dict:
    from shardwright.models import load_model
    from shardwright.models.random_init import write_random_checkpoint
    from shardwright.parallel.context import ParallelContext

    load_before = os.getloadavg()
    batches, steps = ([1, 8], 8) if quick else ([1, 8], 32)
    results = []
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))  # a core for the prefetch thread, in every point alike
    try:
        with tempfile.TemporaryDirectory(prefix="shardwright-bench-moe-pool-") as tmp:
            model_dir = str(write_random_checkpoint(tmp, _spec(quick), seed=1, std=0.05))
            _, resident = load_model(model_dir, ParallelContext.single("cpu"))
            pooled = {(f, p): measure_point({"pooled_fraction": f, "prefetch": p}, _pooled, model_dir, resident, f, p,
                                            batches, steps)
                      for f in FRACTIONS for p in (True, False)}
    finally:
        compute_threads = torch.get_num_threads()
        torch.set_num_threads(threads)
    for (f, p), got in pooled.items():
        if got is None:
            continue
        for b in batches:
            (base_times, ref), (times, tokens, delta), peak, budget = got[b]
            base = b / statistics.median(base_times)
            results.append(_row(f, p, b, times, base, tokens == ref, delta, peak, budget))
    results.sort(key=lambda r: (r["batch"], r["pooled_fraction"], not r["prefetch"]))
    load_after = os.getloadavg()
    notes = [f"cores: {os.cpu_count()}; torch threads: {compute_threads} in every point (one core left to the "
             "prefetch thread)",
             f"1-minute load average before / after: {load_before[0]:.1f} / {load_after[0]:.1f}",
             f"{SLOTS} fetch slots per pooled MoE layer; pooled experts in host memory (a CPU copy per fetch)",
             "slowdown: resident tokens/s over the point's, each the faster of two runs made in turns; "
             "same_tokens: greedy tokens equal the resident run's"]
    return {"results": results, "columns": COLUMNS, "notes": notes, "load_1m": [load_before[0], load_after[0]]}
