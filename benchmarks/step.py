"""The worker's step on its own: one packed decode step of the benchmark model, per step variant.

Run: `shardwright bench step [--quick] [--json]` from a source checkout.

In one process on every core (the threads a (1,1) worker gets), the model of `bench decode`
(llama-110m, random weights) runs `DecoderModel.forward_packed` over a paged cache for batches
of 1, 8 and 32 decode rows with 48 tokens of context each, in four variants:
- fp32: the checkpoint as it is, plain tensors (the reference; `pack_weights=False`);
- fp32-packed: fp32 with the linear weights packed for oneDNN where that pays (models/packed.py;
  the engine's default on AVX-512 machines);
- bf16: weights and activations bf16, plain tensors (`EngineConfig(dtype="bfloat16", pack_weights=False)`);
- bf16-packed: bf16 with the linear weights packed for oneDNN (models/packed.py; the engine's default).
The variants take turns step by step (A, B, C, D, A, B, ...), so a burst of other load on a
shared machine falls on all of them; each reports its median and best step. `vs_fp32` is the
fp32 median over the variant's median, from the same run.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.runner import measure_point

from benchmarks.decode import model_dir

COLUMNS = ["variant", "batch", "median_ms", "best_ms", "vs_fp32"]
BLOCK = 16
CONTEXT = 48


def decode_batch(batch: int):
    from shardwright.models.paged import PagedBatch

    per_seq = -(-(CONTEXT + 1) // BLOCK)
    tables = [list(range(s * per_seq, (s + 1) * per_seq)) for s in range(batch)]
    positions = [CONTEXT - 1] * batch
    slots = [tables[s][p // BLOCK] * BLOCK + p % BLOCK for s, p in enumerate(positions)]
    return PagedBatch.build([(7 * s) % 1000 + 1 for s in range(batch)], positions, slots, [1] * batch,
                            tables, BLOCK, list(range(batch)), torch.device("cpu")), per_seq * batch


def variants(directory) -> dict:
    from shardwright.models import load_model
    from shardwright.models.packed import pack_model
    from shardwright.parallel.context import ParallelContext

    ctx = ParallelContext.single("cpu")
    fp32 = load_model(directory, ctx)[1]
    fp32_packed = load_model(directory, ctx)[1]
    pack_model(fp32_packed)
    bf16 = load_model(directory, ctx, dtype="bfloat16")[1]
    packed = load_model(directory, ctx, dtype="bfloat16")[1]
    pack_model(packed)
    return {"fp32": fp32, "fp32-packed": fp32_packed, "bf16": bf16, "bf16-packed": packed}


@torch.inference_mode()
def _batch_rows(models: dict, batch: int, steps: int) -> list[dict]:
    plan, blocks = decode_batch(batch)
    caches = {name: m.new_paged_cache(blocks, BLOCK) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}
    for i in range(steps + 2):  # the first two rounds warm up
        for name, model in models.items():
            start = time.perf_counter()
            model.full_logits(model.forward_packed(plan.token_ids, plan, caches[name]))
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["fp32"])
    return [{"variant": name, "batch": batch, "median_ms": statistics.median(ts) * 1e3,
             "best_ms": min(ts) * 1e3, "vs_fp32": base / statistics.median(ts)} for name, ts in times.items()]


def run(quick: bool) -> dict:
    steps = 10 if quick else 40
    models = variants(str(model_dir()))
    results = []
    for batch in (1, 8, 32):
        results += measure_point({"batch": batch}, _batch_rows, models, batch, steps) or []
    notes = [f"llama-110m, {CONTEXT} tokens of context per row, {steps} steps per variant taken in turns, "
             f"{torch.get_num_threads()} threads; vs_fp32 = fp32 median / variant median (same run)"]
    return {"results": results, "notes": notes}


if __name__ == "__main__":
    import sys

    from benchmarks.runner import main

    sys.exit(main("step", "--quick" in sys.argv, "--json" in sys.argv))
