"""Penalties in the engine: greedy output with presence, frequency and repetition penalties
equals a single-process reference that applies the same definitions to the full-sequence
logits of the same weights, at tp=1, tp=2, pp=2 and with async scheduling (fed-back tokens),
several requests batched together."""

from __future__ import annotations

import pytest
import torch

from shardwright.actors.engine import EngineConfig, InferenceEngine
from shardwright.serving.sampling import SamplingParams, apply_penalties
from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.parallel.context import ParallelContext

PARAMS = [SamplingParams(max_tokens=24, ignore_eos=True, frequency_penalty=0.7),
          SamplingParams(max_tokens=24, ignore_eos=True, presence_penalty=1.5, repetition_penalty=1.3),
          SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=2.0),
          SamplingParams(max_tokens=24, ignore_eos=True)]  # no penalty, batched with the others
PROMPTS = [[5, 6, 7, 5, 6, 7], [9] * 12, list(range(1, 30)), [3, 1, 4, 1, 5]]


@torch.inference_mode()
def reference(model, prompt: list[int], p: SamplingParams) -> list[int]:
    """Greedy with penalties, one uncached forward of the whole sequence per token (float64
    penalties on the fp32 logits, as the sampler does)."""
    tokens = list(prompt)
    for step in range(p.max_tokens):
        ids = torch.tensor([tokens])
        logits = model.full_logits(model(ids, torch.arange(len(tokens)).unsqueeze(0)))[0, -1].double()
        tokens.append(int(torch.argmax(apply_penalties(logits, tokens, step, p))))
    return tokens[len(prompt):]


@pytest.fixture(scope="module")
def expected(served_models):
    _, model = load_model(served_models["llama"], ParallelContext.single("cpu"))
    out = [reference(model, prompt, p) for prompt, p in zip(PROMPTS, PARAMS)]
    plain = [reference(model, prompt, p.model_copy(update={"frequency_penalty": 0.0, "presence_penalty": 0.0,
                                                             "repetition_penalty": 1.0}))
             for prompt, p in zip(PROMPTS[:3], PARAMS[:3])]
    assert all(a != b for a, b in zip(out[:3], plain)), "the penalties must change these continuations"
    return out


@pytest.mark.parametrize("tp, pp, async_scheduling", [(1, 1, False), (2, 1, False), (1, 2, False), (1, 1, True)])
def test_greedy_with_penalties_equals_the_reference(ray_cluster, served_models, expected, tp, pp, async_scheduling):
    config = EngineConfig(model_dir=served_models["llama"], layout=ParallelLayout(tp=tp, pp=pp), block_size=8,
                          num_blocks=128, async_scheduling=async_scheduling)
    engine = InferenceEngine(config).start()
    try:
        streams = [engine.submit(prompt, p) for prompt, p in zip(PROMPTS, PARAMS)]
        assert [s.result(timeout_s=300).token_ids for s in streams] == expected
    finally:
        engine.shutdown()


@torch.inference_mode()
def test_logprobs_equal_the_log_softmax_of_the_reference_logits(ray_cluster, served_models):
    """Chosen and top-5 logprobs of a greedy run at tp=2 equal the log-softmax of the
    single-process logits (1e-4: tp=2 sums partial products in another order)."""
    _, model = load_model(served_models["llama"], ParallelContext.single("cpu"))
    prompt, params = [4, 8, 15, 16, 23, 42], SamplingParams(max_tokens=10, ignore_eos=True, logprobs=5)
    config = EngineConfig(model_dir=served_models["llama"], layout=ParallelLayout(tp=2), block_size=8, num_blocks=64)
    engine = InferenceEngine(config).start()
    try:
        out = engine.submit(prompt, params).result(timeout_s=300)
        plain = engine.submit(prompt, params.model_copy(update={"logprobs": None})).result(timeout_s=300)
    finally:
        engine.shutdown()
    assert len(out.logprobs) == len(out.token_ids) == 10 and plain.logprobs == []
    assert out.token_ids == plain.token_ids
    tokens = list(prompt)
    for token, (chosen, top) in zip(out.token_ids, out.logprobs):
        logits = model.full_logits(model(torch.tensor([tokens]), torch.arange(len(tokens)).unsqueeze(0)))[0, -1]
        expected = torch.log_softmax(logits.double(), dim=-1)
        assert abs(chosen - float(expected[token])) < 1e-4
        assert [t for t, _ in top] == torch.topk(expected, 5).indices.tolist() and top[0][0] == token
        assert all(abs(lp - float(expected[t])) < 1e-4 for t, lp in top)
        tokens.append(token)
