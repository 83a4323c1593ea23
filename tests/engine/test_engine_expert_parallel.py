"""Mixture-of-experts models served by the Ray engine with expert parallelism (ep gangs) equal the
single-process greedy reference, token for token."""

from __future__ import annotations

import pytest

from model_helpers import tiny_spec
from shardwright.actors.engine import EngineConfig, InferenceEngine
from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.models.random_init import write_random_checkpoint
from shardwright.parallel.context import ParallelContext
from shardwright.serving.sampling import SamplingParams

NEW_TOKENS = 32
MODELS = {  # Mixtral-style (4 experts, top 2) and Qwen2-MoE-style (shared expert, unnormalised, layer 1 dense)
    "mixtral": dict(num_experts=4, experts_per_token=2),
    "qwen2_moe": dict(num_experts=4, experts_per_token=2, moe_intermediate_size=32, moe_renormalize=False,
                      shared_expert_intermediate_size=48, dense_layers=[1], qkv_bias=True),
}


@pytest.mark.parametrize("name, ep, tp, pp", [("mixtral", 2, 1, 2), ("qwen2_moe", 2, 2, 1)])
def test_ep_gang_greedy_equals_reference(ray_cluster, tmp_path, name, ep, tp, pp):
    """Three prompts batched (prefill and decode rows split unevenly over the EP ranks); EP inside
    each pipeline stage (ranks 0, 1 the first stage's EP group, 2, 3 the second's), and EP x TP."""
    spec = tiny_spec("llama", num_kv_heads=2, **MODELS[name])
    model_dir = write_random_checkpoint(tmp_path / name, spec, seed=23, std=0.2)
    _, model = load_model(model_dir, ParallelContext.single("cpu"))
    prompts = [[3, 14, 15, 92, 65, 35, 89, 79, 32], [7], [2, 71, 82]]
    refs = [greedy_generate(model, p, NEW_TOKENS) for p in prompts]
    assert len(set(refs[0])) > 4, "reference continuation too repetitive to be a test"
    cfg = EngineConfig(model_dir=model_dir, layout=ParallelLayout(ep=ep, tp=tp, pp=pp), block_size=4, num_blocks=64)
    with InferenceEngine(cfg).start() as eng:
        outs = eng.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True), timeout_s=300)
    assert [o.token_ids for o in outs] == refs, f"{name} at ep={ep} tp={tp} pp={pp}"
