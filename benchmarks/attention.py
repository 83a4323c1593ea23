"""Context-parallel attention beside single-process tiled attention: forward time and peak memory.

Run: `shardwright bench attention [--quick] [--json]` from a source checkout, or
`python benchmarks/attention.py [--quick] [--json]`. Through `benchmarks/runner.py`: a human table,
notes (configuration, targets, machine load), then (with --json) one JSON line.

Problem: one sequence (batch 1) of seq_len tokens, 8 query heads and 2 kv heads (GQA) of dim 64,
fp32, inputs uniform in [0, 1), tiles of 256 x 256 tokens (the library default) everywhere.

Methods (each a gloo world of `cp` local processes started with `run_ranks`, each rank holding its
shard of q, k and v):
    ring     ring attention, contiguous split
    zigzag   ring attention, zigzag split (causal work balanced)
    ulysses  Ulysses (all-to-all over heads), u = cp
    hybrid   Ulysses inside groups of 2 x ring across them (cp = 4 only), zigzag split
    splitkv  split-KV decode: ONE new query token (the last position) over a KV cache of seq_len
             tokens cut into cp contiguous equal shards; its reference is the same decode step
             over the whole cache in one process (`reference_attention` with 1 query).
The reference (`ref_*`) is `reference_attention` (flash-style tiled, never an N x N score matrix)
on the whole problem in ONE process, run in the same benchmark run.

Threads: each CP rank gets max(1, cores // cp) intra-op threads, the reference all cores (on two
cores: 1 thread per rank at cp = 2, and at cp = 4 four one-thread ranks share two cores).
SHARDWRIGHT_BENCH_ATTENTION_LENGTHS="1024,2048" replaces the sequence lengths (smoke tests;
both masks at each length). The
reference is also timed with one thread (`ref_1t_time_s`) to separate the algorithm's speed-up from
how well two threads scale on a shared machine (OpenMP threads degrade badly when another process
holds a core; the machine's load average is in the notes).

time_s: wall time of ONE forward call (median of three at seq_len <= 4096 and for splitkv),
started after a barrier, slowest rank; each process first warms up on a small problem (gloo connections, thread
pools). The optional forward+backward columns (full run, seq_len <= 16k) time out.backward(dout)
after the forward.

peak_bytes_per_rank: the kernel's resident-set high-water mark (VmHWM) during the call, minus the
resident set just before it: inputs are allocated (and every other buffer freed and trimmed back to
the OS with malloc_trim) BEFORE the mark is reset through /proc/self/clear_refs, so the figure is
what attention itself adds: its output and lse, received K/V blocks, all-to-all buffers, tiles.
Worst rank. The reference is measured the same way in its own process. `*_with_inputs` adds the
bytes of the process's own q, k, v (the rank's shard; the whole problem for the reference), i.e.
the attention footprint including its inputs.
"""

from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time
from collections import defaultdict

import torch
import torch.distributed as dist

COLUMNS = ["method", "cp", "seq_len", "causal", "time_s", "ref_time_s", "time_ratio",
           "ref_1t_time_s", "peak_mib", "ref_peak_mib", "mem_ratio", "mem_ratio_with_inputs",
           "fwd_bwd_time_s", "ref_fwd_bwd_time_s"]
HEADS, KV_HEADS, DIM = 8, 2, 64
DTYPE = torch.float32
SEED = 0
WARMUP_TOKENS = 1024
MIB = 2**20
TARGET_MEM_RATIO, TARGET_TIME_RATIO = 0.6, 0.6  # issue 6: at cp = 2, 16k tokens; zigzag for time
CP_METHODS = ("ring", "zigzag", "ulysses", "hybrid")
BACKWARD_MAX_TOKENS = 16384  # full run: forward+backward columns up to this length
LENGTHS_ENV = "SHARDWRIGHT_BENCH_ATTENTION_LENGTHS"  # e.g. "1024,2048": override seq_lens


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan_runs(quick: bool) -> dict:
    """What to measure: {(method, cp): [(seq_len, causal, backward), ...]} and the lengths."""
    if quick:  # 4k both masks, 16k causal, cp = 2, forward only
        cps, problems = [2], [(4096, True), (4096, False), (16384, True)]
    else:
        cps = [2, 4]
        problems = [(n, causal) for n in (4096, 16384, 65536) for causal in (True, False)]
    if os.environ.get(LENGTHS_ENV):  # smoke tests of the code path at small sizes
        lengths = [int(x) for x in os.environ[LENGTHS_ENV].split(",")]
        problems = [(n, causal) for n in lengths for causal in (True, False)]
    skipped = sorted({n for n, _ in problems if not fits_in_memory(n, max(cps))})
    problems = [(n, causal) for n, causal in problems if n not in skipped]
    runs = {}
    for cp in cps:
        for method in (*CP_METHODS, "splitkv"):
            if method == "hybrid" and cp < 4:
                continue  # hybrid needs u and ring both > 1; at cp = 2 it is ring or Ulysses
            runs[(method, cp)] = [
                (n, causal, not quick and method != "splitkv" and n <= BACKWARD_MAX_TOKENS)
                for n, causal in problems
            ]
    return {"runs": runs, "skipped_lengths": skipped}


def fits_in_memory(seq_len: int, cp: int) -> bool:
    """Rough bound: every rank builds the whole problem's inputs once, plus output and backward
    buffers (about 6 q-sized tensors per rank); keep it under half of the available memory."""
    q_bytes = seq_len * HEADS * DIM * DTYPE.itemsize
    need = (cp + 1) * 6 * q_bytes
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration):
        return True
    return need < avail / 2


# ---------------------------------------------------------------- inside the measured processes

def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> int | None:
    """Free what can be freed, give it back to the OS, reset VmHWM; the resident bytes now."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_bytes("VmRSS")


def _inputs(seq_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    q = torch.rand(seq_len, HEADS, DIM, generator=gen, dtype=DTYPE)
    k = torch.rand(seq_len, KV_HEADS, DIM, generator=gen, dtype=DTYPE)
    v = torch.rand(seq_len, KV_HEADS, DIM, generator=gen, dtype=DTYPE)
    return q, k, v


def _method_call(method: str, seq_len: int, causal: bool, rank: int, world: int, groups):
    """(this process's inputs (q, k, v), fn(q, k, v) -> (out, lse)) for one measured problem."""
    from shardwright.parallel.attention import (
        make_shard_plan,
        reference_attention,
        ring_attention,
        shard_tokens,
        splitkv_attention,
        ulysses_attention,
    )

    q, k, v = _inputs(seq_len)
    if method == "reference":
        return (q, k, v), lambda q, k, v: reference_attention(q, k, v, [0, seq_len], causal=causal)
    if method == "reference_decode":
        return (q[-1:].clone(), k, v), lambda q, k, v: reference_attention(
            q, k, v, [0, 1], [0, seq_len], causal=causal)
    if method == "splitkv":
        start, stop = seq_len * rank // world, seq_len * (rank + 1) // world
        mine = (q[-1:].clone(), k[start:stop].clone(), v[start:stop].clone())
        return mine, lambda q, k, v: splitkv_attention(
            q, k, v, cu_seqlens_q=[0, 1], cu_seqlens_k=[0, stop - start], kv_positions=[start],
            q_positions=[seq_len - 1] if causal else None, group=dist.group.WORLD)
    split = "contiguous" if method in ("ring", "ulysses") else "zigzag"
    ulysses = {"ring": 1, "zigzag": 1, "ulysses": world, "hybrid": 2}[method]
    plan = make_shard_plan([0, seq_len], world, split=split, ulysses_size=ulysses)
    mine = tuple(shard_tokens(t, plan, rank) for t in (q, k, v))
    if ulysses == 1:
        return mine, lambda q, k, v: ring_attention(q, k, v, plan, dist.group.WORLD, causal=causal)
    return mine, lambda q, k, v: ulysses_attention(q, k, v, plan, groups[ulysses], causal=causal)


def _measure(method, seq_len, causal, backward, rank, world, groups) -> dict:
    """Time and peak memory of this process's part of one problem (see the module docstring)."""
    inputs, fn = _method_call(method, seq_len, causal, rank, world, groups)
    input_bytes = sum(t.numel() * t.element_size() for t in inputs)
    result = {"input_bytes": input_bytes, "times": [], "cpu_s": []}
    repeats = 3 if method in ("splitkv", "reference_decode") or seq_len <= 4096 else 1
    for i in range(repeats):
        before = _reset_peak()
        dist.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        out = fn(*inputs)
        result["times"].append(time.perf_counter() - start)
        result["cpu_s"].append(time.process_time() - cpu)
        if i == 0:
            peak = _status_bytes("VmHWM")
            result["peak_bytes"] = None if before is None or peak is None else peak - before
        del out
    if backward:
        leaves = [t.clone().requires_grad_() for t in inputs]
        dout = torch.rand(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
        before = _reset_peak()
        dist.barrier()
        start = time.perf_counter()
        out, _ = fn(*leaves)
        out.backward(dout)
        result["fwd_bwd_time_s"] = time.perf_counter() - start
        peak = _status_bytes("VmHWM")
        result["fwd_bwd_peak_bytes"] = None if before is None or peak is None else peak - before
        del out, leaves, dout
    return result


def bench_rank_main(rank: int, world: int, method: str, configs: list, threads: int) -> list[dict]:
    """One process of a launch: warm up, then measure every (seq_len, causal, backward) config."""
    from shardwright.parallel.attention import make_hybrid_groups

    torch.set_num_threads(threads)
    groups = {}
    if method in ("ulysses", "hybrid"):
        u = world if method == "ulysses" else 2
        groups[u] = make_hybrid_groups(dist.group.WORLD, u)
    warm_inputs, warm = _method_call(method, WARMUP_TOKENS, True, rank, world, groups)
    if any(bwd for _, _, bwd in configs):  # also start autograd's engine before measuring
        warm_inputs = [t.clone().requires_grad_() for t in warm_inputs]
        warm(*warm_inputs)[0].sum().backward()
    else:
        warm(*warm_inputs)
    del warm_inputs, warm
    return [_measure(method, n, causal, bwd, rank, world, groups) for n, causal, bwd in configs]


# ---------------------------------------------------------------- the parent

def launch(method: str, world: int, configs: list, threads: int) -> list[dict]:
    """Run one launch; per config, the figures of the slowest / largest rank."""
    from shardwright.parallel.launch import run_ranks

    per_rank = run_ranks(bench_rank_main, world, args=(method, configs, threads),
                         backend="gloo", num_threads=threads, timeout_s=7200)
    merged = []
    for i in range(len(configs)):
        ranks = [r[i] for r in per_rank]
        times = [max(t) for t in zip(*(r["times"] for r in ranks))]
        peaks = [r["peak_bytes"] for r in ranks]
        row = {
            "time_s": statistics.median(times),
            "cpu_s": sum(statistics.median(r["cpu_s"]) for r in ranks),
            "peak_bytes": None if None in peaks else max(peaks),
            "peak_bytes_with_inputs": None if None in peaks else
            max(r["peak_bytes"] + r["input_bytes"] for r in ranks),
        }
        if "fwd_bwd_time_s" in ranks[0]:  # backward configs
            row["fwd_bwd_time_s"] = max(r["fwd_bwd_time_s"] for r in ranks)
            fb = [r["fwd_bwd_peak_bytes"] for r in ranks]
            row["fwd_bwd_peak_bytes"] = None if None in fb else max(fb)
        merged.append(row)
    return merged


NOT_MEASURED = defaultdict(lambda: None)  # a reference whose launch failed: every figure None


def measure_launch(point: dict, configs: list, threads: int) -> list[dict]:
    """One launch as one benchmark point: its figures per config, or [] if it failed."""
    from benchmarks.runner import measure_point

    return measure_point({**point, "configs": len(configs)}, launch, point["method"], point["cp"],
                         configs, threads) or []


def run(quick: bool) -> dict:
    ncores = cores()
    plan = plan_runs(quick)
    load_before = os.getloadavg()
    # References: one process, all cores (and one thread for ref_1t_time_s), same run.
    cp_configs = {cfg for (m, _), cfgs in plan["runs"].items() if m != "splitkv" for cfg in cfgs}
    ref_configs = sorted({(n, c, any(b for n2, c2, b in cp_configs if (n2, c2) == (n, c)))
                          for n, c, _ in cp_configs})
    ref = dict(zip([(n, c) for n, c, _ in ref_configs],
                   measure_launch({"method": "reference", "cp": 1, "threads": ncores}, ref_configs, ncores)))
    fwd_configs = [(n, c, False) for n, c, _ in ref_configs]
    ref_1t = dict(zip([(n, c) for n, c, _ in fwd_configs],
                      measure_launch({"method": "reference", "cp": 1, "threads": 1}, fwd_configs, 1)))
    dec_configs = sorted({(n, c, False) for (m, _), cfgs in plan["runs"].items() if m == "splitkv"
                          for n, c, _ in cfgs})
    ref_dec = dict(zip(dec_configs, measure_launch({"method": "reference_decode", "cp": 1, "threads": ncores},
                                                   dec_configs, ncores)))
    results = []
    for (method, cp), configs in plan["runs"].items():
        threads = max(1, ncores // cp)
        for (n, causal, bwd), got in zip(configs, measure_launch({"method": method, "cp": cp, "threads": threads},
                                                                 configs, threads)):
            base = ref_dec.get((n, causal, False), NOT_MEASURED) if method == "splitkv" \
                else ref.get((n, causal), NOT_MEASURED)
            base_1t = None if method == "splitkv" else ref_1t.get((n, causal))
            results.append(row(method, cp, n, causal, threads, ncores, got, base, base_1t))
    load_after = os.getloadavg()
    return {"results": results, "notes": notes(results, quick, ncores, load_before, load_after,
                                                  plan["skipped_lengths"]),
            "config": {"heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "dtype": "float32",
                       "batch": 1, "block_size": 256, "cores": ncores, "seed": SEED,
                       "splitkv_new_tokens": 1, "load_avg_before": load_before,
                       "load_avg_after": load_after}}


def row(method, cp, n, causal, threads, ncores, got, base, base_1t) -> dict:
    def ratio(a, b):
        return None if a is None or b is None or b == 0 else a / b

    def mib(x):
        return None if x is None else x / MIB

    r = {"method": method, "cp": cp, "seq_len": n, "causal": causal, "threads_per_rank": threads,
         "ref_threads": ncores, "time_s": got["time_s"], "peak_bytes_per_rank": got["peak_bytes"],
         "ref_time_s": base["time_s"], "ref_peak_bytes": base["peak_bytes"],
         "peak_bytes_with_inputs_per_rank": got["peak_bytes_with_inputs"],
         "ref_peak_bytes_with_inputs": base["peak_bytes_with_inputs"],
         "cpu_s": got["cpu_s"], "ref_cpu_s": base["cpu_s"],
         "ref_1t_time_s": None if base_1t is None else base_1t["time_s"]}
    r["time_ratio"] = ratio(r["time_s"], r["ref_time_s"])
    r["time_ratio_vs_1t"] = ratio(r["time_s"], r["ref_1t_time_s"])
    r["mem_ratio"] = ratio(r["peak_bytes_per_rank"], r["ref_peak_bytes"])
    r["mem_ratio_with_inputs"] = ratio(r["peak_bytes_with_inputs_per_rank"],
                                       r["ref_peak_bytes_with_inputs"])
    r["peak_mib"], r["ref_peak_mib"] = mib(r["peak_bytes_per_rank"]), mib(r["ref_peak_bytes"])
    if "fwd_bwd_time_s" in got:
        r["fwd_bwd_time_s"], r["ref_fwd_bwd_time_s"] = got["fwd_bwd_time_s"], base["fwd_bwd_time_s"]
        r["fwd_bwd_peak_bytes_per_rank"] = got["fwd_bwd_peak_bytes"]
        r["ref_fwd_bwd_peak_bytes"] = base["fwd_bwd_peak_bytes"]
    return r


def notes(results: list[dict], quick: bool, ncores: int, load_before, load_after,
          skipped: list[int]) -> list[str]:
    out = [
        f"config: batch 1 sequence, {HEADS} heads / {KV_HEADS} kv heads (GQA), head_dim {DIM}, fp32, "
        f"tiles 256; time_s = one forward call (slowest rank; median of 3 at <= 4k tokens and for "
        f"splitkv); splitkv = decode of 1 new token over a seq_len cache sharded over cp ranks; "
        f"threads: {ncores} cores, max(1, cores // cp) per CP rank, all {ncores} for the reference "
        f"(ref_1t_time_s: the reference on 1 thread)",
        "peak = VmHWM during the call minus VmRSS just before it (inputs allocated before the reset, "
        "rest trimmed); per rank, worst rank; mem_ratio_with_inputs adds each process's own q/k/v",
        f"machine load average (1, 5, 15 min) before {tuple(round(x, 2) for x in load_before)}, "
        f"after {tuple(round(x, 2) for x in load_after)} (the CPU is shared; OpenMP threads of the "
        "2-thread reference slow down sharply when another process holds a core)",
    ]
    if quick:
        out.append("quick: cp = 2; 4k causal and full, 16k causal; forward only (hybrid needs "
                   "cp = 4, 64k and forward+backward: full run)")
    if skipped:
        out.append(f"skipped (not enough free memory): seq_len {skipped}")
    for r in results:
        if r["cp"] == 2 and r["seq_len"] == 16384 and r["causal"] and r["method"] in ("ring", "zigzag"):
            mem, mem_in = r["mem_ratio"], r["mem_ratio_with_inputs"]
            out.append(
                f"target (issue 6) {r['method']} cp=2 16k causal: peak memory per rank / single "
                f"process = {_f(mem)} (with inputs {_f(mem_in)}); target <= {TARGET_MEM_RATIO}: "
                f"{_met(mem, TARGET_MEM_RATIO)} ({_met(mem_in, TARGET_MEM_RATIO)} with inputs)")
            if r["method"] == "zigzag":
                out.append(
                    f"target (issue 6) zigzag cp=2 16k causal: time / single process = "
                    f"{_f(r['time_ratio'])} (vs 1-thread reference {_f(r['time_ratio_vs_1t'])}); "
                    f"target <= {TARGET_TIME_RATIO}: {_met(r['time_ratio'], TARGET_TIME_RATIO)}")
                out.append(bounds_note(r))
    return out


def bounds_note(r: dict) -> str:
    """What the cp=2 ratios can be at best here, from the configuration and the measured speed-up.

    Memory: beyond its inputs, a ring rank must hold its output (1/cp of the reference's) and the
    two K/V chunks of the forward (the one in hand and the next, DEFAULT_KV_CHUNK_TOKENS each);
    the tile workspace and allocator slack come on top of both sides. Time: a perfectly balanced
    ring rank on 1 thread does 1/cp of the 1-thread work.
    """
    from shardwright.parallel.attention.reference import DEFAULT_KV_CHUNK_TOKENS

    cp, n = r["cp"], r["seq_len"]
    chunk_share = 2 * 2 * min(DEFAULT_KV_CHUNK_TOKENS, n // cp) * KV_HEADS / (n * HEADS)
    floor = 1 / cp + chunk_share
    inputs = 1 + 2 * KV_HEADS / HEADS  # q, k, v in units of the output's size
    floor_in = (inputs / cp + 1 / cp + chunk_share) / (inputs + 1)
    speedup = None if not r["ref_time_s"] else r["ref_1t_time_s"] / r["ref_time_s"]
    best_time = None if speedup is None else speedup / cp
    return (f"bounds at cp={cp} with {HEADS}/{KV_HEADS} heads, {n} tokens: memory ratio >= "
            f"{floor:.3f} (out + two received K/V chunks of {DEFAULT_KV_CHUNK_TOKENS} tokens; "
            f"{floor_in:.3f} counting inputs) before the tile workspace and allocator slack; the "
            f"reference's {r['ref_threads']}-thread speed-up here is {_f(speedup)}, so an ideal "
            f"balanced ring on 1 thread per rank reaches a time ratio of {_f(best_time)}")


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _met(x, limit) -> str:
    return "n/a" if x is None else ("met" if x <= limit else "missed")


if __name__ == "__main__":
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.runner import main

    sys.exit(main("attention", "--quick" in sys.argv, "--json" in sys.argv))
