"""Speculative decoding at batch 1: tokens/s beside plain decoding, and the acceptance rate, for
n-gram prompt lookup and a trained draft model (BiLD-style), on a trained byte-level pair.

Run: `shardwright bench speculative [--quick] [--json]` from a source checkout.

Models (trained here with the project's trainer on the bundled corpus minus the held-out files,
cached under SHARDWRIGHT_BENCH_DIR like `bench quant`'s): the target is `bench quant`'s ~0.9M
byte-level quality model (width 128, 4 layers, GQA 4/2 heads, MLP 384), the draft a ~0.1M one
(width 64, 2 layers, 2/1 heads, MLP 192), same byte vocabulary, corpus and recipe. (Larger pairs
did not train in the time a 2-core run allows; both are small enough that a step costs mostly
its fixed overheads, which is where a draft model gains least.)

Measure: one Ray engine per method at tp = 1 (one worker each), all started first; greedy, batch
1: each prompt (the first 64 bytes of held-out windows) generates `new` tokens alone, the methods
taking turns prompt by prompt (so load drifting on a shared machine hits each alike); tokens/s =
the median over a method's requests of tokens / wall time, after a warm-up request; one compute
thread per worker (batch 1 of a model this small gains nothing from a second, and on a loaded
machine an OpenMP team waiting at its barriers only adds noise). `vs_plain` = tokens/s / plain
decoding's, same run, same prompts. `acceptance` = accepted drafts / drafts proposed (the draft
model: drafts it made); `tokens_per_step` = new tokens per engine step (plain decoding: 1).
`identical`: the outputs equal plain decoding's (greedy must).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from benchmarks.quant import CORPUS, HELD_OUT, trained_model, windows
from benchmarks.runner import measure_point

COLUMNS = ["method", "k", "tokens_per_s", "vs_plain", "acceptance", "tokens_per_step", "identical"]
DRAFT = dict(architecture="llama", vocab_size=256, hidden_size=64, intermediate_size=192, num_layers=2,
             num_heads=2, num_kv_heads=1, head_dim=32, max_position_embeddings=512, norm_eps=1e-5)
PROMPT_BYTES = 64


def prompts(count: int) -> list[list[int]]:
    held = windows([CORPUS / f for f in HELD_OUT], 128)
    return [row[:PROMPT_BYTES].tolist() for row in held[:count]]


def measure(target: Path, methods: list[tuple[str, dict]], prompt_ids: list[list[int]], new: int,
            rounds: int) -> dict[str, dict]:
    """Every method's engine started at once (one logical GPU each), then `rounds` rounds in which
    each method decodes each prompt alone, the methods interleaved (load that drifts on a shared
    machine hits all alike)."""
    from contextlib import ExitStack

    from shardwright.actors.engine import EngineConfig, InferenceEngine
    from shardwright.config import ParallelLayout, SpeculativeOptions
    from shardwright.serving.sampling import SamplingParams

    greedy = SamplingParams(max_tokens=new, ignore_eos=True)
    with ExitStack() as stack:
        engines = {}
        for name, options in methods:
            cfg = EngineConfig(model_dir=target, layout=ParallelLayout(), block_size=16, num_blocks=256,
                               max_running=4, threads_per_worker=1, speculative=SpeculativeOptions(**options))
            engines[name] = stack.enter_context(InferenceEngine(cfg).start())
            engines[name].generate([prompt_ids[0]], SamplingParams(max_tokens=8, ignore_eos=True), timeout_s=600)
        stats = {name: {"rates": [], "tokens": 0, "outputs": [], "steps": -eng.steps,
                        "counts": eng.speculative_counts()}
                 for name, eng in engines.items()}
        for r in range(rounds):
            for p in prompt_ids:
                for name, eng in engines.items():
                    start = time.perf_counter()
                    out = eng.generate([p], greedy, timeout_s=600)[0].token_ids
                    stats[name]["rates"].append(len(out) / (time.perf_counter() - start))
                    stats[name]["tokens"] += len(out)
                    if r == 0:
                        stats[name]["outputs"].append(out)
        for name, eng in engines.items():
            st, before = stats[name], stats[name]["counts"]
            counts = {k: v - before.get(k, 0) for k, v in eng.speculative_counts().items()}
            st.update(tokens_per_s=statistics.median(st["rates"]),
                      tokens_per_step=st["tokens"] / (eng.steps + st["steps"]),
                      acceptance=counts["accepted"] / counts["proposed"] if counts.get("proposed") else None,
                      proposed=counts.get("proposed", 0))
    return stats


def run(quick: bool) -> dict:
    import ray

    target_steps = draft_steps = 400  # quick too: the same cached pair (bench quant trains the same target)
    target, losses = measure_point({"phase": "train target"}, trained_model, target_steps) or (None, [])
    draft, _ = measure_point({"phase": "train draft"}, trained_model, draft_steps, DRAFT,
                             "spec-draft-0.1m") or (None, [])
    if target is None:
        return {"results": [], "notes": ["training the target failed"]}
    ids, new = prompts(2 if quick else 4), 64 if quick else 128
    methods = [("plain", {}), ("ngram", {"method": "ngram", "num_draft_tokens": 4})]
    if draft is not None:
        methods += [(f"draft k={k}", {"method": "draft", "draft_model": draft, "num_draft_tokens": k}) for k in (2, 4)]
        methods += [("draft+fallback", {"method": "draft", "draft_model": draft, "num_draft_tokens": 4,
                                        "fallback_threshold": 0.5})]
    if not ray.is_initialized():  # one logical GPU per engine: they are all alive at once
        ray.init(address="local", num_gpus=len(methods), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    got = measure_point({"phase": "decode", "methods": len(methods)}, measure, target, methods, ids, new,
                        1 if quick else 2) or {}
    plain = got.get("plain")
    results = []
    for (name, options) in methods:
        r = got.get(name)
        if r is None:
            continue
        results.append({"method": name, "k": options.get("num_draft_tokens"), "tokens_per_s": r["tokens_per_s"],
                        "vs_plain": r["tokens_per_s"] / plain["tokens_per_s"] if plain else None,
                        "acceptance": r["acceptance"], "tokens_per_step": r["tokens_per_step"],
                        "identical": r["outputs"] == plain["outputs"] if plain else None})
    notes = [f"target: bench quant's byte-level llama (0.9M) trained {target_steps} steps"
             + (f" (loss {losses[0]:.2f} -> {losses[-1]:.2f})" if losses else " (cached)")
             + f"; draft: byte-level llama {sum_params(DRAFT) / 1e6:.2f}M trained {draft_steps} steps",
             f"batch 1, greedy, tp=1 on the Ray engine; {len(ids)} held-out prompts of {PROMPT_BYTES} bytes, "
             f"{new} new tokens each; draft+fallback: BiLD fallback threshold 0.5"]
    return {"results": results, "notes": notes, "target_steps": target_steps, "draft_steps": draft_steps,
            "new_tokens": new, "prompts": len(ids)}


def sum_params(spec: dict) -> int:
    from shardwright.config import ModelSpec

    return ModelSpec(**spec).num_parameters
