"""Speculative decoding on the Ray engine: greedy output equals the single-process reference and
seeded sampling equals the engine without speculation, token for token, with drafts accepted."""

from __future__ import annotations

import pytest

from shardwright.actors.engine import EngineConfig, InferenceEngine
from shardwright.config import ParallelLayout, SpeculativeOptions
from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.parallel.context import ParallelContext
from shardwright.serving.sampling import SamplingParams

NEW_TOKENS = 64
# Repetitive prompts, so that n-gram lookup finds matches from the first decode step; the tiny
# random models also fall into loops of their own, which lookup then predicts.
PROMPTS = [[3, 14, 15, 92, 3, 14, 15, 92, 3, 14], [7, 8, 9, 7, 8, 9, 7], list(range(1, 30))]


def engine(model_dir, tp: int, speculative: SpeculativeOptions | None = None, **kw) -> InferenceEngine:
    cfg = EngineConfig(model_dir=model_dir, layout=ParallelLayout(tp=tp), block_size=8, num_blocks=128,
                       speculative=speculative or SpeculativeOptions(), **kw)
    return InferenceEngine(cfg).start()


@pytest.mark.parametrize("tp", [1, 2])
def test_ngram_speculation_greedy_equals_plain_decoding_and_sampling_is_unchanged(ray_cluster, served_models, tp):
    """Greedy equals the reference with drafts accepted; seeded sampling, with and without
    penalties, equals the engine without speculation token for token (n-gram drafts are verified
    by the target's own seeded draw); a stop id inside accepted drafts ends the request there;
    a request asking for logprobs (never drafted) still gets one per token."""
    model_dir = served_models["llama"]
    _, model = load_model(model_dir, ParallelContext.single("cpu"))
    refs = [greedy_generate(model, p, NEW_TOKENS) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    seeded = SamplingParams(max_tokens=32, temperature=0.8, top_p=0.95, seed=5, ignore_eos=True)
    penalised = SamplingParams(max_tokens=32, temperature=0.7, seed=9, repetition_penalty=1.3, ignore_eos=True)
    stop_at = refs[0][20]
    stopping = SamplingParams(max_tokens=NEW_TOKENS, stop_token_ids=[stop_at], ignore_eos=True)
    with engine(model_dir, tp) as eng:
        plain_sampled = [o.token_ids for o in eng.generate(PROMPTS, seeded, timeout_s=300)]
        plain_penalised = [o.token_ids for o in eng.generate(PROMPTS, penalised, timeout_s=300)]
    spec = SpeculativeOptions(method="ngram", num_draft_tokens=4)
    with engine(model_dir, tp, spec) as eng:
        outs = eng.generate(PROMPTS, greedy, timeout_s=300)
        assert [o.token_ids for o in outs] == refs  # exact: a draft is kept only if it is the argmax
        counts = eng.speculative_counts()
        assert counts["accepted"] > 0, counts  # drafts were accepted: the test is not vacuous
        assert [o.token_ids for o in eng.generate(PROMPTS, seeded, timeout_s=300)] == plain_sampled
        assert [o.token_ids for o in eng.generate(PROMPTS, penalised, timeout_s=300)] == plain_penalised
        out = eng.generate([PROMPTS[0]], stopping, timeout_s=300)[0]
        assert out.token_ids == refs[0][: refs[0].index(stop_at) + 1] and out.finish_reason == "stop"
        logged = eng.submit(PROMPTS[0], SamplingParams(max_tokens=16, logprobs=2, ignore_eos=True))
        drafted = eng.submit(PROMPTS[1], greedy)  # in the same steps as the logprobs request
        assert drafted.result(300).token_ids == refs[1]
        assert logged.result(300).token_ids == refs[0][:16] and len(logged.result(300).logprobs) == 16
        assert eng.blocks_in_use == 0


def test_ngram_speculation_with_pipeline_stages(ray_cluster, served_models):
    """pp = 2 (two plans in flight, a verified chunk's sequence in one of them): greedy equals the reference."""
    model_dir = served_models["gpt2"]
    _, model = load_model(model_dir, ParallelContext.single("cpu"))
    refs = [greedy_generate(model, p, 32) for p in PROMPTS]
    cfg = EngineConfig(model_dir=model_dir, layout=ParallelLayout(pp=2), block_size=8, num_blocks=128,
                       speculative=SpeculativeOptions(method="ngram", num_draft_tokens=3))
    with InferenceEngine(cfg).start() as eng:
        outs = eng.generate(PROMPTS, SamplingParams(max_tokens=32, ignore_eos=True), timeout_s=300)
        assert [o.token_ids for o in outs] == refs
        assert eng.speculative_counts()["verified_chunks"] > 0


def test_speculative_options_are_checked():
    with pytest.raises(ValueError, match="ngram_min=3 > ngram_max=2"):
        SpeculativeOptions(method="ngram", ngram_min=3, ngram_max=2)
    with pytest.raises(ValueError, match="needs draft_model"):
        SpeculativeOptions(method="draft")
    with pytest.raises(ValueError, match="async_scheduling"):
        EngineConfig(model_dir="x", speculative=SpeculativeOptions(method="ngram"), async_scheduling=True)


@pytest.fixture(scope="module")
def small_draft(served_models, tmp_path_factory):
    """A one-layer random model with the llama test model's vocabulary (a poor draft: many rejects)."""
    from model_helpers import tiny_spec
    from shardwright.models.random_init import write_random_checkpoint

    spec = tiny_spec("llama", num_kv_heads=2, num_layers=1, max_position_embeddings=1024)
    return write_random_checkpoint(tmp_path_factory.mktemp("draft") / "draft", spec, seed=3, std=0.15)


@pytest.mark.parametrize("tp", [1, 2])
def test_draft_model_speculation_greedy_equals_plain_decoding(ray_cluster, served_models, small_draft, tp):
    """BiLD-style drafting in the sampler worker. With the target itself as the draft nearly every
    draft is accepted (the draft's decode path and the target's verify path may round apart at a
    near tie, hence not all); with a random one-layer draft nearly all are rejected. Greedy output equals the
    reference either way, and seeded sampling is reproducible."""
    model_dir = served_models["llama"]
    _, model = load_model(model_dir, ParallelContext.single("cpu"))
    refs = [greedy_generate(model, p, NEW_TOKENS) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)
    seeded = SamplingParams(max_tokens=24, temperature=0.8, top_k=20, seed=5, ignore_eos=True)
    for draft, accepts in ((model_dir, True), (small_draft, False)):
        spec = SpeculativeOptions(method="draft", draft_model=draft, num_draft_tokens=4)
        with engine(model_dir, tp, spec) as eng:
            assert [o.token_ids for o in eng.generate(PROMPTS, greedy, timeout_s=300)] == refs, draft
            counts = eng.speculative_counts()
            if accepts:  # the target as its own draft: >= 90% accepted (a near tie may round apart)
                assert counts["accepted"] >= 0.9 * counts["proposed"] > 0, counts
            else:  # a random 1-layer draft: rejections, the target's tokens take over
                assert counts["accepted"] < 0.5 * counts["proposed"], counts
            first = [o.token_ids for o in eng.generate(PROMPTS, seeded, timeout_s=300)]
            assert first == [o.token_ids for o in eng.generate(PROMPTS, seeded, timeout_s=300)]
            assert eng.blocks_in_use == 0
        print(f"tp={tp} draft={draft.name} counts {counts}")
