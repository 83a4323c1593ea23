"""The Ray inference engine against the single-process greedy reference, token for token."""

from __future__ import annotations

import pytest

from shardwright.actors.engine import EngineConfig, InferenceEngine
from shardwright.serving.sampling import SamplingParams
from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.parallel.context import ParallelContext

NEW_TOKENS = 64


def reference(model_dir, prompt: list[int], n: int) -> list[int]:
    _, model = load_model(model_dir, ParallelContext.single("cpu"))
    return greedy_generate(model, prompt, n)


def engine(model_dir, tp=1, pp=1, **kw) -> InferenceEngine:
    cfg = EngineConfig(model_dir=model_dir, layout=ParallelLayout(tp=tp, pp=pp), block_size=8,
                       num_blocks=kw.pop("num_blocks", 256), **kw)
    return InferenceEngine(cfg).start()


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_greedy_equals_reference_for_every_layout(ray_cluster, served_models, tp, pp):
    prompts = [[3, 14, 15, 92, 65, 35], [7]]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    for name, model_dir in served_models.items():
        refs = [reference(model_dir, p, NEW_TOKENS) for p in prompts]
        assert len(set(refs[0])) > 4, "reference continuation too repetitive to be a test"
        with engine(model_dir, tp, pp) as eng:
            outs = eng.generate(prompts, greedy, timeout_s=300)
            assert [o.token_ids for o in outs] == refs, f"{name} at tp={tp} pp={pp}"
            assert all(o.finish_reason == "length" for o in outs)
            assert eng.blocks_in_use == 0


@pytest.mark.parametrize("tp", [1, 2])
def test_async_scheduling_equals_reference_greedy_and_seeded(ray_cluster, served_models, tp):
    """Step k+1 dispatched before step k returns, tokens fed back by the workers (on by default
    only with CUDA): greedy equals the reference, seeded sampling equals the synchronous engine,
    and a stop token ends the request exactly there."""
    model_dir = served_models["llama"]
    prompts = [[3, 14, 15, 92, 65, 35], [7], list(range(1, 40))]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    refs = [reference(model_dir, p, NEW_TOKENS) for p in prompts]
    seeded = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=5, ignore_eos=True)
    stop_at = refs[0][10]
    stopping = SamplingParams(max_tokens=NEW_TOKENS, stop_token_ids=[stop_at], ignore_eos=True)
    with engine(model_dir, tp, async_scheduling=False) as eng:
        sync_sampled = [o.token_ids for o in eng.generate(prompts, seeded, timeout_s=300)]
    with engine(model_dir, tp, async_scheduling=True) as eng:
        assert [o.token_ids for o in eng.generate(prompts, greedy, timeout_s=300)] == refs
        assert [o.token_ids for o in eng.generate(prompts, seeded, timeout_s=300)] == sync_sampled
        out = eng.generate([prompts[0]], stopping, timeout_s=300)[0]
        assert out.token_ids == refs[0][: refs[0].index(stop_at) + 1] and out.finish_reason == "stop"
        assert eng.blocks_in_use == 0


@pytest.mark.parametrize("dispatch,name", [("actor-calls", "actor calls")])
def test_other_step_dispatch_equals_reference(ray_cluster, served_models, dispatch, name):
    """Steps sent through plain actor calls (EngineConfig.dispatch; the default step channel runs
    in every other engine test) at tp = 2."""
    model_dir = served_models["llama"]
    _, model = load_model(model_dir, ParallelContext.single("cpu"))
    prompts = [[3, 14, 15, 92], [7, 1]]
    refs = [greedy_generate(model, p, 16) for p in prompts]
    cfg = EngineConfig(model_dir=model_dir, layout=ParallelLayout(tp=2), block_size=8, dispatch=dispatch)
    with InferenceEngine(cfg).start() as eng:
        assert eng.health()["dispatch"] == name
        out = eng.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True), timeout_s=120)
        assert eng.health()["healthy"] is True  # the probe runs between steps
    assert [o.token_ids for o in out] == refs


def test_bf16_engine_with_packed_weights_equals_the_bf16_reference(ray_cluster, served_models):
    """dtype=bfloat16 with the default pack_weights (oneDNN-packed linears, models/packed.py) at
    tp = 1 against the single-process bf16 reference (plain tensors, contiguous cache), token for
    token. At tp = 2 the packed engine equals the unpacked engine at tp = 2: there the partial
    products are all-reduced in bf16, rounded once more than the unsharded GEMM's sums, and the
    gpt2 model's greedy tokens leave the tp = 1 reference at a near tie (token 17, measured) with
    or without packing, so the reference for packing is the same layout unpacked."""
    prompts = [[3, 14, 15, 92, 65, 35], [7]]
    greedy = SamplingParams(max_tokens=32, ignore_eos=True)
    for name, model_dir in served_models.items():
        _, model = load_model(model_dir, ParallelContext.single("cpu"), dtype="bfloat16")
        refs = [greedy_generate(model, p, 32) for p in prompts]
        with engine(model_dir, 1, dtype="bfloat16") as eng:
            assert [o.token_ids for o in eng.generate(prompts, greedy, timeout_s=300)] == refs, f"{name} tp=1"
        with engine(model_dir, 2, dtype="bfloat16", pack_weights=False) as eng:
            plain = [o.token_ids for o in eng.generate(prompts, greedy, timeout_s=300)]
        with engine(model_dir, 2, dtype="bfloat16") as eng:
            assert [o.token_ids for o in eng.generate(prompts, greedy, timeout_s=300)] == plain, f"{name} tp=2"
