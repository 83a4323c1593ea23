"""Helpers shared by test modules (import them from here, never from a conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardwright.config import ModelSpec

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, skipping the test with the reason when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test reads the project's shared data (../shared)")
    return path


def tiny_spec(architecture: str = "llama", **overrides) -> ModelSpec:
    """A model small enough for multi-process tests: 2 layers, width 64, odd vocab (padding)."""
    base = dict(architecture=architecture, vocab_size=203, hidden_size=64, intermediate_size=128,
                num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=256,
                norm_eps=1e-5)
    if architecture == "gpt2":
        base.update(activation="gelu_new", tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
    base.update(overrides)
    return ModelSpec(**base)


def paged_greedy(model, prompts: list[list[int]], n: int, chunk: int, block: int = 4):
    """Greedy decoding of several prompts together over a paged cache: each prompt prefilled in
    chunks of `chunk` tokens (later chunks attend to cached context), then one packed decode
    step per token for every sequence. Returns (tokens per prompt, every step's sampled logits,
    fp32)."""
    import torch

    from shardwright.models.paged import PagedBatch

    per_seq = max(len(p) for p in prompts) + n
    blocks_each = -(-per_seq // block)
    tables = [list(range(s * blocks_each, (s + 1) * blocks_each)) for s in range(len(prompts))]
    cache = model.new_paged_cache(len(prompts) * blocks_each, block)
    seqs = [list(p) for p in prompts]
    done = [0] * len(prompts)  # tokens in the cache
    out: list[list[int]] = [[] for _ in prompts]
    all_logits = []
    with torch.inference_mode():
        while any(len(o) < n for o in out):
            ids, positions, slots, lens, sample = [], [], [], [], []
            for s, seq in enumerate(seqs):
                todo = seq[done[s]:done[s] + (chunk if done[s] < len(prompts[s]) else 1)]
                for j, tok in enumerate(todo):
                    p = done[s] + j
                    ids.append(tok)
                    positions.append(p)
                    slots.append(tables[s][p // block] * block + p % block)
                lens.append(len(todo))
                sample.append(len(ids) - 1)
            batch = PagedBatch.build(ids, positions, slots, lens, tables, block, sample, torch.device("cpu"))
            logits = model.full_logits(model.forward_packed(batch.token_ids, batch, cache)).float()
            all_logits.append(logits)
            for s, row in enumerate(logits):
                done[s] += lens[s]
                if done[s] >= len(prompts[s]):  # the prompt is in: this row's token is generated
                    out[s].append(int(row.argmax()))
                    seqs[s].append(out[s][-1])
    return [o[:n] for o in out], all_logits  # a shorter prompt's sequence ran on while others finished


def shared_prefix_prompts(rng, count: int, longest: int, vocab: int = 999) -> list[list[int]]:
    """`count` prompts sharing prefixes of 0..longest tokens of one random document, each then
    its own 1-20 random tokens (every 7th none: a pure document prefix); ids in [1, vocab]."""
    doc = [rng.randint(1, vocab) for _ in range(longest)]
    prompts = []
    for i in range(count):
        own = [rng.randint(1, vocab) for _ in range(rng.randint(1, 20))] if i % 7 else []
        prompts.append(doc[: rng.randint(0, longest)] + own or doc[:1])
    return prompts


def expected_prefill_saved(prompts, block_size: int, seen: set | None = None) -> int:
    """Prefill tokens prefix caching saves when each prompt, in order, finds the full blocks of
    every earlier prompt (and of `seen`'s keys, updated in place): its longest full-block prefix
    shared with them, short of its last token. Exact for the engine and StepScheduler when
    nothing is evicted and there is one plan in flight (a prompt is admitted only after every
    earlier one is scheduled in full)."""
    from shardwright.serving.prefix_cache import block_hashes

    seen = set() if seen is None else seen
    saved = 0
    for prompt in prompts:
        keys = block_hashes(prompt, block_size)
        hits = 0
        for key in keys[: (len(prompt) - 1) // block_size]:
            if key not in seen:
                break
            hits += 1
        saved += hits * block_size
        seen.update(keys)
    return saved
