"""Context parallelism in the engine: the KV cache sharded over cp ranks, ring prefill, split-KV decode.

With cp = 2 each rank stores every other KV block and computes the prompt tokens of its blocks
(ring attention over the ranks' shards); decode attends over each rank's keys and one
all-gather of (out, lse) and the exact merge give the full attention (tests/models/
test_paged_cp.py checks the division of work and the communication in a gloo world). Greedy tokens after a 2,000-token
prompt must equal cp = 1 for 64 new tokens (the merge is exact up to fp32 rounding, far below
the logit gaps of this model).
"""

from __future__ import annotations

import pytest

from model_helpers import tiny_spec
from shardwright.actors.engine import EngineConfig, InferenceEngine
from shardwright.serving.sampling import SamplingParams
from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.models.random_init import write_random_checkpoint
from shardwright.parallel.context import ParallelContext

NEW_TOKENS = 64


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    spec = tiny_spec("llama", num_kv_heads=2, num_layers=2, max_position_embeddings=4096)
    return write_random_checkpoint(tmp_path_factory.mktemp("cp") / "llama", spec, seed=21, std=0.15)


def generate(model_dir, prompts, **layout):
    cfg = EngineConfig(model_dir=model_dir, layout=ParallelLayout(**layout), block_size=16, num_blocks=300,
                       max_tokens_per_step=512)
    with InferenceEngine(cfg).start() as eng:
        outs = eng.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True), timeout_s=600)
        memory = eng.memory()
        assert eng.blocks_in_use == 0
    return [o.token_ids for o in outs], memory


def test_cp2_after_a_2000_token_prompt_equals_cp1_and_shards_the_cache(ray_cluster, long_model):
    prompt = [(37 * i + 11) % 200 + 1 for i in range(2000)]
    short = [5, 6, 7]
    cp1, mem1 = generate(long_model, [prompt, short])
    cp2, mem2 = generate(long_model, [prompt, short], cp=2)
    assert len(set(cp1[0])) > 4, "continuation too repetitive to be a test"
    assert cp2 == cp1
    kv1 = [m["by_kind"]["kv_cache"] for m in mem1["workers"].values()]
    kv2 = [m["by_kind"]["kv_cache"] for m in mem2["workers"].values()]
    assert len(kv2) == 2 and all(k * 2 == kv1[0] for k in kv2), (kv1, kv2)
    # With the reference too (cp = 1 is itself checked elsewhere; this pins the long prompt).
    _, model = load_model(long_model, ParallelContext.single("cpu"))
    assert cp1[1] == greedy_generate(model, short, NEW_TOKENS)


def test_cp2_with_tp2_equals_the_reference(ray_cluster, long_model):
    _, model = load_model(long_model, ParallelContext.single("cpu"))
    prompts = [[3, 14, 15, 92, 65, 35] * 50, [7]]
    refs = [greedy_generate(model, p, NEW_TOKENS) for p in prompts]
    out, _ = generate(long_model, prompts, tp=2, cp=2)
    assert out == refs
