"""Prefix caching in the Ray engine: shared prompt blocks, outputs unchanged, prefill counted.

32 concurrent requests share prefixes of 0-600 tokens of one document (block_size 16). Greedy
tokens must equal the single-process reference with prefix caching on and off, at tp = 1, 2,
pp = 2 and cp = 2: a request that finds its prefix cached attends over K/V another request
wrote, computed in another chunking of the same tokens, which moves logits by float32 rounding
only, far below this model's greedy logit gaps (the same margin chunked prefill relies on).
The prefill tokens saved are counted exactly (tests/model_helpers.expected_prefill_saved) where
one plan is in flight (pp = 1, no async scheduling); with pp = 2 admission interleaves with
plans in flight, so only "some saved" is asserted there. Every block is returned at the end.
"""

from __future__ import annotations

import random

import pytest

from model_helpers import expected_prefill_saved, shared_prefix_prompts
from shardwright.actors.engine import EngineConfig, InferenceEngine
from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.parallel.context import ParallelContext
from shardwright.serving.sampling import SamplingParams

NEW_TOKENS = 8
BLOCK = 16


@pytest.fixture(scope="module")
def prompts_and_refs(served_models):
    prompts = shared_prefix_prompts(random.Random(18), 32, 600, vocab=200)
    _, model = load_model(served_models["llama"], ParallelContext.single("cpu"))
    return prompts, [greedy_generate(model, p, NEW_TOKENS) for p in prompts]


def run(model_dir, prompts, *, prefix_caching=True, rounds=1, **layout):
    # 1536 blocks hold every request's blocks at once: nothing is evicted, so the count is exact.
    cfg = EngineConfig(model_dir=model_dir, layout=ParallelLayout(**layout), block_size=BLOCK, num_blocks=1536,
                       prefix_caching=prefix_caching, async_scheduling=False)
    greedy = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    outs, stats = [], []
    with InferenceEngine(cfg).start() as eng:
        for _ in range(rounds):
            outs.append([o.token_ids for o in eng.generate(prompts, greedy, timeout_s=600)])
            stats.append(eng.health(probe=False)["prefix_cache"])
            assert eng.blocks_in_use == 0
    return outs, stats


def test_prefix_caching_on_and_off_equal_the_reference_and_count_saved_tokens(
        ray_cluster, served_models, prompts_and_refs):
    prompts, refs = prompts_and_refs
    assert len({tuple(r) for r in refs}) > 16, "continuations too alike to be a test"
    (off,), (off_stats,) = run(served_models["llama"], prompts, prefix_caching=False)
    assert off == refs
    assert off_stats["prefill_tokens_saved"] == 0 and not off_stats["enabled"]
    (first, again), (s1, s2) = run(served_models["llama"], prompts, rounds=2)
    assert first == refs and again == refs
    seen: set = set()
    saved = expected_prefill_saved(prompts, BLOCK, seen)
    assert saved > 4000, "prompts should share much"
    assert s1["prefill_tokens_saved"] == saved and s1["evictions"] == 0
    # Second round: every prompt's blocks are idle in the cache, found again (all but the last token).
    assert s2["prefill_tokens_saved"] - saved == expected_prefill_saved(prompts, BLOCK, seen) \
        == sum((len(p) - 1) // BLOCK * BLOCK for p in prompts)
    assert s2["cached_blocks"] == s2["idle_cached_blocks"] > 0


@pytest.mark.parametrize("layout", [{"tp": 2}, {"pp": 2}, {"cp": 2}], ids=["tp2", "pp2", "cp2"])
def test_prefix_caching_with_tp_pp_cp_equals_the_reference(ray_cluster, served_models, prompts_and_refs, layout):
    prompts, refs = prompts_and_refs
    (out,), (stats,) = run(served_models["llama"], prompts, **layout)
    assert out == refs
    if layout.get("pp", 1) == 1:
        assert stats["prefill_tokens_saved"] == expected_prefill_saved(prompts, BLOCK)
    else:
        assert stats["prefill_tokens_saved"] > 0
