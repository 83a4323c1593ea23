"""The draft-model path of speculative decoding in one process: a ShardRunner (tp = 1, no Ray)
driven by the StepScheduler and the DraftTracker exactly as the engine drives its gang.

Checks greedy output against the single-process reference, BiLD's fallback (a threshold of 1
stops every draft), and, end to end, that sampled tokens verified against a sampled draft
follow the target's distribution (chi-square)."""

from __future__ import annotations

import math

import pytest
import torch

from model_helpers import tiny_spec
from shardwright.actors.shard_runner import ShardRunner, StepMessage
from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.models.random_init import write_random_checkpoint
from shardwright.parallel.context import ParallelContext
from shardwright.serving.batching import Request, StepScheduler
from shardwright.serving.draft_model import DraftPlaceholders, DraftTracker
from shardwright.serving.kv_blocks import BlockManager
from shardwright.serving.sampling import SamplingParams, filtered_probs

PROMPTS = [[3, 14, 15, 92, 3, 14, 15, 92, 3, 14], [7, 8, 9, 7, 8, 9, 7], [5]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec")
    target = write_random_checkpoint(root / "target", tiny_spec("llama", num_kv_heads=2, num_layers=3,
                                                                 max_position_embeddings=512), seed=11, std=0.15)
    draft = write_random_checkpoint(root / "draft", tiny_spec("llama", num_kv_heads=2, num_layers=1,
                                                               max_position_embeddings=512), seed=3, std=0.15)
    return target, draft


def runner_with(target, draft, num_blocks=512, block_size=8) -> ShardRunner:
    runner = ShardRunner(0, ParallelLayout(), threads_per_worker=1)
    runner.init_group("127.0.0.1", 0, 30)
    runner.load(str(target), None)
    runner.load_draft(str(draft), None)
    runner.allocate_cache(num_blocks, block_size)
    return runner


def drive(runner: ShardRunner, requests: list[tuple[list[int], SamplingParams]], k: int = 3,
          fallback: float = 0.0, max_running: int = 8, num_blocks=512, block_size=8):
    """Generate every request as the engine does (one plan in flight); outputs and the counts."""
    sched = StepScheduler(BlockManager(num_blocks, block_size), 1024, max_running, [], 512,
                          proposer=DraftPlaceholders(k))
    tracker = DraftTracker(block_size, fallback)
    for i, (prompt, params) in enumerate(requests):
        sched.add(Request(f"r{i}", prompt, params))
    out: dict[str, list[int]] = {f"r{i}": [] for i in range(len(requests))}
    while sched.has_unfinished():
        plan = sched.schedule()
        draft = tracker.plan(plan, lambda rid: sched.sequence(rid).tokens)
        reply = runner.step(StepMessage.from_plan(plan, draft=draft))
        tokens, _, drafted = reply if draft is not None else (reply, None, None)
        sampled = dict(zip(plan.sampled_seq_ids(), tokens))
        for event in sched.update(plan, sampled):
            out[event.request_id].append(event.token_id)
        if draft is not None:
            tracker.update(plan, draft, drafted, sampled, lambda rid: sched.sequence(rid) is not None)
    assert sched.blocks.num_used == 0 and not tracker.cached
    counts = dict(sched.spec_counts, drafted=tracker.num_drafted)
    return [out[f"r{i}"] for i in range(len(requests))], counts


def test_greedy_with_a_draft_model_equals_the_reference_and_fallback_stops_drafting(models):
    target, draft = models
    _, model = load_model(target, ParallelContext.single("cpu"))
    refs = [greedy_generate(model, p, 40) for p in PROMPTS]
    greedy = SamplingParams(max_tokens=40, ignore_eos=True)
    requests = [(p, greedy) for p in PROMPTS]
    same = runner_with(target, target)  # the target as its own draft: every draft is accepted
    out, counts = drive(same, requests)
    assert out == refs
    assert counts["accepted"] == counts["drafted"] == counts["proposed"] > 60, counts
    out, counts = drive(runner_with(target, draft), requests)
    assert out == refs and counts["drafted"] > 60 and counts["accepted"] < counts["drafted"], counts
    # BiLD fallback: a draft whose confidence is below the threshold is not proposed; at 1.0 none is
    out, counts = drive(runner_with(target, target), requests, fallback=1.0)
    assert out == refs and counts["drafted"] == 0 and counts["verified_chunks"] > 0, counts
    out, counts = drive(runner_with(target, draft), requests, fallback=0.05)
    assert out == refs and 0 < counts["drafted"] < counts["proposed"], counts


def test_tokens_verified_against_a_sampled_draft_follow_the_targets_distribution(models):
    """The second new token of each request is the first verified one (its chunk is the first
    token plus one draft from the poor 1-layer draft, whose q is far from p). Over N seeded
    requests its distribution must be the target's: the mixture over the first token t1 of
    p(t2 | prompt, t1), both filtered by temperature 1.0 and top_k 4 (at most 16 outcomes)."""
    target, draft = models
    params = dict(max_tokens=3, temperature=1.0, top_k=4, ignore_eos=True)
    prompt = [3, 14, 15, 92]
    n = 3000  # 16 outcomes, the rarest expected ~80 times (measured); seeded, so p > 0.01 is fixed, not flaky
    runner = runner_with(target, draft, num_blocks=1024, block_size=4)
    requests = [(prompt, SamplingParams(seed=s, **params)) for s in range(n)]
    out, counts = drive(runner, requests, k=1, max_running=256, num_blocks=1024, block_size=4)
    assert counts["drafted"] > n // 2 and counts["accepted"] < counts["drafted"], counts
    _, model = load_model(target, ParallelContext.single("cpu"))
    p = SamplingParams(**params)
    with torch.inference_mode():
        first = filtered_probs(model.full_logits(model(torch.tensor([prompt]), torch.arange(4)[None]))[0, -1], p)
        expected = {}
        for t1 in torch.nonzero(first).flatten().tolist():
            ids = prompt + [t1]
            second = filtered_probs(model.full_logits(model(torch.tensor([ids]), torch.arange(5)[None]))[0, -1], p)
            for t2 in torch.nonzero(second).flatten().tolist():
                expected[(t1, t2)] = float(first[t1] * second[t2])
    seen: dict[tuple[int, int], int] = {}
    for o in out:
        seen[(o[0], o[1])] = seen.get((o[0], o[1]), 0) + 1
    assert set(seen) <= set(expected)
    stat = sum((seen.get(key, 0) - n * e) ** 2 / (n * e) for key, e in expected.items())
    df = len(expected) - 1
    p_value = float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                            torch.tensor(stat / 2, dtype=torch.float64)))
    assert min(expected.values()) * n >= 5 and math.isclose(sum(expected.values()), 1.0)  # chi-square valid
    assert p_value > 0.01, f"chi-square p = {p_value:.3g} over {len(expected)} outcomes"
