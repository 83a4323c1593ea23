"""Decode speed of each model family beside Hugging Face generate on the same checkpoint (issue 19).

Run: `shardwright bench families [--quick] [--json]` from a source checkout (needs `transformers`).

Models: one randomly initialised checkpoint per family, written by `transformers` itself
(`save_pretrained`) and cached under SHARDWRIGHT_BENCH_DIR (default ~/.cache/shardwright/bench), all
of one shape so the families compare: width 512, 8 layers (4 with --quick), 8 query / 4 key-value
heads of 64, MLP 1536, vocabulary 32,000, fp32. The mixture-of-experts families have 8 experts of
width 768 with 2 chosen per token (Qwen2-MoE adds its shared expert of width 1536), so a token
reads about as many expert weights as a dense token reads MLP weights.

Measure, per family and batch size: `tokens_per_s` is Shardwright's decode step (the paged serving
path the engine's worker runs, in the bare loop of `bench decode`: no Ray, one process, both cores;
exactly the step the engine runs at tp = 1) after the prefill of a 32-token prompt;
`hf_tokens_per_s` is Hugging Face `generate` (greedy, same checkpoint, same prompts, its decode rate
without the prefill, in a fresh process); each side runs 3 times (2 with --quick), the two taking
turns, and keeps its best; `vs_hf` = their ratio, same run. `load_1m`: the 1-minute
load average when the family's points ended (the machine may be shared; the ratio is the figure).
That the tokens are the same is tested, not measured here (tests/models/test_families.py).
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from benchmarks.runner import measure_point, say

COLUMNS = ["family", "batch", "tokens_per_s", "hf_tokens_per_s", "vs_hf", "load_1m"]
PROMPT_LEN = 32
SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1536, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=2048, bos_token_id=None,
             eos_token_id=None, tie_word_embeddings=False)
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "mixtral", "qwen2_moe")


def _config(family: str, layers: int):
    import transformers

    shape = dict(SHAPE, num_hidden_layers=layers)
    if family == "llama":
        return transformers.LlamaConfig(**shape)
    if family == "qwen2":
        return transformers.Qwen2Config(**shape)
    if family == "qwen3":
        return transformers.Qwen3Config(**shape)
    if family == "mistral":
        return transformers.MistralConfig(**shape, sliding_window=1024)
    if family == "phi3":
        return transformers.Phi3Config(**shape, pad_token_id=0)
    if family == "gemma2":
        return transformers.Gemma2Config(**shape, sliding_window=1024, query_pre_attn_scalar=64, pad_token_id=0)
    if family == "mixtral":
        return transformers.MixtralConfig(**dict(shape, intermediate_size=768), num_local_experts=8,
                                          num_experts_per_tok=2)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**shape, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=768,
                                           shared_expert_intermediate_size=1536, mlp_only_layers=[])
    raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")


def checkpoint(family: str, layers: int) -> Path:
    """The family's random checkpoint, written by transformers once and reused."""
    import torch
    import transformers

    root = Path(os.environ.get("SHARDWRIGHT_BENCH_DIR", Path.home() / ".cache" / "shardwright" / "bench"))
    directory = root / f"family-{family}-l{layers}"
    if (directory / "config.json").exists() and any(directory.glob("*.safetensors")):
        return directory
    say(f"writing a random {family} checkpoint ({layers} layers) to {directory}")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family, layers))
    staging = directory.with_name(directory.name + ".partial")
    model.save_pretrained(staging)
    staging.rename(directory)
    return directory


def run(quick: bool) -> dict:
    from benchmarks.decode_baseline import baseline_decode
    from benchmarks.hf_baseline import hf_decode_rates
    from shardwright.config import ModelSpec, ParallelLayout

    layers, steps, batches, repeats = (4, 16, [1, 8], 2) if quick else (8, 32, [1, 8, 32], 3)
    results, notes = [], []
    for family in FAMILIES:
        directory = measure_point({"family": family, "measure": "checkpoint"}, checkpoint, family, layers)
        if directory is None:
            continue
        ours, hf = {}, {}
        for repeat in range(repeats):  # the sides alternate, so load that drifts hits both alike
            got = measure_point({"family": family, "side": "shardwright", "run": repeat + 1}, baseline_decode,
                                str(directory), ParallelLayout(), batches, steps, PROMPT_LEN)
            for b, times in (got or {}).items():
                ours[b] = max(ours.get(b, 0.0), b / statistics.median(times))
            got = measure_point({"family": family, "side": "hf", "run": repeat + 1}, hf_decode_rates,
                                str(directory), batches, steps, PROMPT_LEN)
            for b, rate in (got or {}).items():
                hf[b] = max(hf.get(b, 0.0), rate)
        load = os.getloadavg()[0]
        spec = ModelSpec.from_hf_dir(directory)
        notes.append(f"{family}: {spec.num_parameters / 1e6:.0f}M parameters")
        for b in batches:
            row = {"family": family, "batch": b, "load_1m": load}
            if b in ours:
                row["tokens_per_s"] = ours[b]
            if b in hf:
                row["hf_tokens_per_s"] = hf[b]
            if b in ours and b in hf:
                row["vs_hf"] = ours[b] / hf[b]
            results.append(row)
    notes.append(f"{steps} decode steps per point after a {PROMPT_LEN}-token prompt, fp32, tp = 1, best of {repeats} "
                 "runs per side, the sides alternating; tokens_per_s: batch / median step of Shardwright's paged decode step (the engine worker's); hf_tokens_per_s: "
                 "transformers generate, same checkpoint, without the prefill")
    return {"results": results, "notes": notes}
