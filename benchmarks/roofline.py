"""Memory-bandwidth utilisation (MBU) of a decode step: the one definition every bench uses.

MBU = step_read_bytes / step time / read_bandwidth, where
- `step_read_bytes(spec, contexts, dtype)` counts the bytes one decode step must read from memory:
  every weight the step multiplies by (the attention and MLP projections, their biases, the norms,
  the LM head), plus, of the embedding tables, only the rows of the step's tokens (a decode step
  looks up one row per sequence; the table itself is never streamed), plus the K and V cache
  entries each sequence attends over (its whole context, or its window in a sliding-window layer).
  A tied LM head reads the whole (shared) table: it counts as the head, the lookup as its rows.
- `read_bandwidth()` measures the machine's real streaming read rate: a 2 GiB fp32 tensor (several
  times the last-level cache) read end to end by a reduction and by a matrix-vector product, on
  every core this process may use, in a fresh process; the best pass of either. It is the ceiling
  a memory-bound decode step can reach, so MBU near 1 means the step is as fast as memory allows.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor

from shardwright.config import ModelSpec

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
BANDWIDTH_BYTES = 2 * 2**30
BANDWIDTH_PASSES = 5


def weight_read_bytes(spec: ModelSpec, num_tokens: int, dtype: str) -> int:
    """Bytes of parameters a step over `num_tokens` tokens reads (see the module doc)."""
    h = spec.hidden_size
    tables = spec.vocab_size * h  # the token embedding
    if spec.architecture != "llama":  # GPT-2's learned position embedding: one row per token too
        tables += spec.max_position_embeddings * h
    head = spec.vocab_size * h if spec.tie_word_embeddings else 0  # num_parameters counts it once
    rows = num_tokens * h * (1 if spec.architecture == "llama" else 2)
    return (spec.num_parameters - tables + head + rows) * DTYPE_BYTES[dtype]


def kv_read_bytes(spec: ModelSpec, contexts: list[int], dtype: str) -> int:
    """Bytes of K and V one decode step reads: each sequence's context, per layer (windowed)."""
    per_token = 2 * spec.num_kv_heads * spec.head_dim * DTYPE_BYTES[dtype]
    total = 0
    for layer in range(spec.num_layers):
        window = spec.window_of(layer)
        total += sum(c if window is None else min(c, window) for c in contexts)
    return total * per_token


def step_read_bytes(spec: ModelSpec, contexts: list[int], dtype: str) -> int:
    """Bytes one decode step reads: one new token per sequence, `contexts[i]` tokens of sequence
    i's context attended over (the new one included)."""
    return weight_read_bytes(spec, len(contexts), dtype) + kv_read_bytes(spec, contexts, dtype)


def _measure(num_bytes: int, passes: int, threads: int) -> float:
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(num_bytes // 4, dtype=torch.float32)
    matrix, vector = x.view(-1, 4096), torch.ones(4096)
    best = float("inf")
    for read in (x.sum, lambda: torch.mv(matrix, vector)):
        read()  # first touch and warm-up
        for _ in range(passes):
            start = time.perf_counter()
            read()
            best = min(best, time.perf_counter() - start)
    return num_bytes / best


def read_bandwidth(num_bytes: int = BANDWIDTH_BYTES, passes: int = BANDWIDTH_PASSES) -> float:
    """Bytes/s of the best streaming read pass (see the module doc), measured in a fresh process."""
    threads = len(os.sched_getaffinity(0))
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(_measure, num_bytes, passes, threads).result()


def mbu(read_bytes: int, step_s: float, bandwidth_bps: float) -> float:
    """The fraction of the measured read bandwidth a step of `step_s` seconds reading `read_bytes` used."""
    return read_bytes / step_s / bandwidth_bps
