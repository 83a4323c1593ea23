"""Speculative decoding on plain objects: the n-gram proposer, verification against plain
decoding, the rejection sampler's distribution (chi-square), and the scheduler's verified chunks."""

from __future__ import annotations

import random

import pytest
import torch

from shardwright.serving.batching import Request, StepScheduler
from shardwright.serving.kv_blocks import BlockManager
from shardwright.serving.sampling import SamplingParams, apply_penalties, filtered_probs, sample_tokens, uniform
from shardwright.serving.speculative import (
    DRAFT_STREAM, NgramProposer, draw, propose_ngram, rejection_step, stream_seed, verify_chunk,
)


# ------------------------------------------------------------------------------------ proposer
def test_ngram_proposes_what_followed_the_most_recent_match_longest_suffix_first():
    tokens = [5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7]
    assert propose_ngram(tokens, 3, max_n=3) == [9, 2, 6]  # [6, 7] last seen before [9, ...]
    assert propose_ngram(tokens, 1, max_n=3) == [9]
    assert propose_ngram([1, 2, 3, 9, 2, 3, 4, 1, 2, 3], 2, max_n=3) == [9, 2]  # 3-gram [1,2,3] beats 2-gram
    assert propose_ngram([1, 2, 3], 4) == []  # no earlier occurrence of any suffix
    assert propose_ngram([4, 4], 4) == [4]  # the match may end right before the suffix
    assert propose_ngram([1, 2, 1, 2, 1, 2], 3) == [1, 2]  # the one 3-gram match: 2 tokens follow
    assert propose_ngram([1, 2, 1, 2, 1, 2], 3, max_n=1) == [1, 2, 1]  # an older match that has k wins
    assert propose_ngram([1, 2, 1], 4, max_n=2, min_n=2) == []  # min_n bounds the suffix
    assert propose_ngram([1, 2, 1], 0) == []
    assert NgramProposer(k=2).propose([3, 1, 2, 3], 5) == [1, 2]  # the proposer's own k caps


# -------------------------------------------------------------------------------- verification
def test_greedy_verification_accepts_the_argmax_prefix_then_the_targets_token():
    logits = torch.full((4, 10), -1.0)
    for j, t in enumerate([3, 4, 5, 6]):
        logits[j, t] = 2.0
    greedy = SamplingParams(max_tokens=8)
    assert verify_chunk(logits, [3, 4, 5], greedy, 0, 0) == [3, 4, 5, 6]  # all accepted + bonus
    assert verify_chunk(logits, [3, 9, 5], greedy, 0, 0) == [3, 4]  # first mismatch: target's token
    assert verify_chunk(logits, [7, 4, 5], greedy, 0, 0) == [3]


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=8),
    SamplingParams(max_tokens=8, temperature=0.9, top_k=5, top_p=0.9),
    SamplingParams(max_tokens=8, temperature=1.3, repetition_penalty=1.5, frequency_penalty=0.4),
    SamplingParams(max_tokens=8, presence_penalty=1.0, repetition_penalty=2.0),  # greedy, penalised
])
def test_point_mass_verification_equals_plain_seeded_decoding_token_for_token(params):
    """With a deterministic draft the verified tokens are exactly those plain decoding draws at the
    same (seed, step) over the same history, penalties included: exact equality (same float64 ops)."""
    gen = torch.Generator().manual_seed(0)
    accepted_total = 0
    for trial in range(200):
        k, vocab, seed, step = 4, 12, 1000 + trial, trial % 7
        logits = torch.randn(k + 1, vocab, generator=gen) * 2
        history = [int(t) for t in torch.randint(vocab, (5 + step,), generator=gen)]
        plain = []  # what plain decoding would draw at each position if fed the drafts so far
        draft = []
        for j in range(k + 1):
            row = logits[j:j + 1]
            if params.penalized:
                row = apply_penalties(row[0].double(), history + draft, step + j, params)[None]
                t = sample_tokens(row, [params.model_copy(update={"presence_penalty": 0.0, "frequency_penalty": 0.0,
                                                                  "repetition_penalty": 1.0})],
                                  [seed], [step + j])[0]
            else:
                t = sample_tokens(row, [params], [seed], [step + j])[0]
            plain.append(t)
            if j < k:  # half the drafts are the plain token (so runs of accepts happen)
                draft.append(t if (trial + j) % 3 else (t + 1) % vocab)
        got = verify_chunk(logits, draft, params, seed, step, history)
        n = next((j for j in range(k) if draft[j] != plain[j]), k)
        assert got == plain[:n + 1]
        accepted_total += len(got) - 1
    assert accepted_total > 100  # the test exercised acceptance, not only rejections


def test_rollback_keeps_drafts_the_target_finds_likely_enough():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8]]))
    greedy = SamplingParams(max_tokens=8)
    # exact: draft 1 at row 0 is not the argmax -> rejected
    assert verify_chunk(logits, [1, 1], greedy, 0, 0) == [0]
    # BiLD rollback 1.5 nats: -log 0.3 = 1.20 kept, -log 0.7 kept, bonus argmax 2
    assert verify_chunk(logits, [1, 1], greedy, 0, 0, rollback_threshold=1.5) == [1, 1, 2]
    # -log 0.1 = 2.30 > 1.5: rolled back to the target's token at row 1
    assert verify_chunk(logits, [1, 2], greedy, 0, 0, rollback_threshold=1.5) == [1, 1]


# ---------------------------------------------------------------------------- chi-square tests
def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square goodness of fit p-value (survival function of chi2 with df = bins - 1)."""
    expected = probs * counts.sum()
    stat = float(((counts - expected) ** 2 / expected).sum())
    df = counts.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


P = torch.tensor([0.05, 0.30, 0.10, 0.25, 0.20, 0.10], dtype=torch.float64)
Q = torch.tensor([0.30, 0.10, 0.25, 0.05, 0.10, 0.20], dtype=torch.float64)
# 20000 draws: every expected count >= 1000, so the chi-square approximation holds and a bias of
# 1.5 percentage points in one bin (the size of a plausible bug) gives p < 1e-6; p > 0.01 fails a
# correct sampler 1% of the time, but the draws are seeded, so the outcome is fixed, not flaky.
N = 20000


def rejection_sampled(p: torch.Tensor, q: torch.Tensor, n: int, accept_all: bool = False) -> torch.Tensor:
    counts = torch.zeros_like(p)
    for i in range(n):
        x = draw(q, uniform(stream_seed(i, DRAFT_STREAM), 0))
        ok, token = rejection_step(p, q, x, -1.0 if accept_all else uniform(7 * i + 1, 0), uniform(i, 0))
        counts[token] += 1
    return counts


def test_rejection_sampling_keeps_the_target_distribution():
    p_value = chi_square_p(rejection_sampled(P, Q, N), P)
    assert p_value > 0.01, f"rejection-sampled tokens do not follow p (chi-square p = {p_value:.3g})"


def test_chi_square_rejects_a_sampler_that_returns_the_draft_distribution():
    """The check above can fail: accepting every draft yields q, which it must reject."""
    assert chi_square_p(rejection_sampled(P, Q, N, accept_all=True), P) < 1e-6


def test_filtered_probs_is_the_distribution_sample_tokens_draws_from():
    params = SamplingParams(max_tokens=8, temperature=0.7, top_k=5, top_p=0.95)
    row = torch.log(P * 3).float()
    probs = filtered_probs(row, params)
    counts = torch.zeros(6, dtype=torch.float64)
    for seed in range(N // 2):
        counts[sample_tokens(row[None], [params], [seed], [0])[0]] += 1
    kept = probs > 0
    assert counts[~kept].sum() == 0
    assert chi_square_p(counts[kept], probs[kept]) > 0.01


def test_soft_draft_verification_follows_the_filtered_target_distribution():
    """verify_chunk with a draft distribution (a sampled draft model): the first token it returns
    follows the target's temperature / top-k filtered p, whatever q proposes."""
    params = SamplingParams(max_tokens=8, temperature=0.7, top_k=5)
    logits = torch.log(P * 3).float()[None].repeat(3, 1)
    target = filtered_probs(logits[0], params)
    assert target[0] == 0.0  # top_k = 5 removed the least likely token
    q = Q[None].repeat(2, 1)
    counts = torch.zeros(6, dtype=torch.float64)
    for seed in range(N // 2):  # verify_chunk is slower per call than rejection_step: 10000 draws
        x = draw(Q, uniform(stream_seed(seed, DRAFT_STREAM), 3))
        first = verify_chunk(logits, [x, 0], params, seed, 3, draft_probs=q)[0]
        counts[first] += 1
    assert counts[0] == 0
    p_value = chi_square_p(counts[1:], target[1:])
    assert p_value > 0.01, f"chi-square p = {p_value:.3g}"


# ------------------------------------------------------------------------------- the scheduler
def target_next(tokens: list[int]) -> int:
    """The 'model': repeats the token 3 back, bumped every 13th position (so drafts sometimes miss)."""
    if len(tokens) < 3:
        return 1 + len(tokens)
    return tokens[-3] % 40 + 1 if len(tokens) % 13 == 0 else tokens[-3]


def run_scheduler(prompts: list[list[int]], params: SamplingParams, proposer=None, budget=16, block_size=4):
    blocks = BlockManager(64, block_size)
    sched = StepScheduler(blocks, budget, 4, [0], 512, proposer=proposer)
    for i, p in enumerate(prompts):
        sched.add(Request(f"r{i}", p, params))
    fed: dict[int, list[int]] = {}
    kv: dict[int, tuple[int, int, int]] = {}
    outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while sched.has_unfinished():
        plan = sched.schedule()
        sampled = {}
        for c in plan.chunks:
            seq = fed.setdefault(c.seq_id, [])
            assert len(seq) >= c.start_pos
            del seq[c.start_pos:]  # rolled-back drafts are overwritten
            seq.extend(c.token_ids)
            for pos, tok, slot in zip(range(c.start_pos, c.start_pos + len(c.token_ids)), c.token_ids, c.slots):
                kv[slot] = (c.seq_id, pos, tok)
            for pos in range(c.start_pos + len(c.token_ids)):  # the context read is this sequence's own
                slot = c.block_table[pos // block_size] * block_size + pos % block_size
                assert kv[slot] == (c.seq_id, pos, seq[pos])
            if c.num_draft:
                before = seq[:c.start_pos + 1]
                out = []
                for d in c.token_ids[1:]:
                    out.append(target_next(before + out))
                    if out[-1] != d:
                        break
                else:
                    out.append(target_next(before + out))
                sampled[c.seq_id] = out
            elif c.sample:
                sampled[c.seq_id] = target_next(seq)
        for e in sched.update(plan, sampled):
            if e.token_id is not None:
                outputs[e.request_id].append(e.token_id)
        assert len(plan.token_ids()) <= budget
    assert blocks.num_used == 0
    return [outputs[f"r{i}"] for i in range(len(prompts))], sched


def test_scheduler_with_ngram_drafts_yields_plain_decoding():
    prompts = [[5, 9, 2, 5, 9, 2, 5], [7, 8], list(range(1, 12))]
    params = SamplingParams(max_tokens=40, ignore_eos=True)
    plain, _ = run_scheduler(prompts, params)
    spec, sched = run_scheduler(prompts, params, NgramProposer(k=4))
    assert spec == plain and all(len(o) == 40 for o in spec)
    counts = sched.spec_counts
    assert counts["accepted"] > 30 and counts["proposed"] > counts["accepted"]  # accepts and rejects happened


def test_drafts_never_pass_max_tokens_or_the_step_budget():
    """k is capped by what is left of max_tokens (so the reservation) and by the step budget after
    one token for every running sequence; a stop id inside the accepted tokens ends the request."""
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    out, sched = run_scheduler([[3, 4, 5, 3, 4, 5, 3]], params, NgramProposer(k=8))
    assert len(out[0]) == 6
    out, _ = run_scheduler([[3, 4, 5, 3, 4, 5, 3]] * 4, params, NgramProposer(k=8), budget=5)
    assert all(len(o) == 6 for o in out)
    plain, _ = run_scheduler([[3, 4, 5, 3, 4, 5, 3]], SamplingParams(max_tokens=30, ignore_eos=True))
    stop = plain[0][9]
    stopping = SamplingParams(max_tokens=30, ignore_eos=True, stop_token_ids=[stop])
    out, _ = run_scheduler([[3, 4, 5, 3, 4, 5, 3]], stopping, NgramProposer(k=8))
    assert out[0] == plain[0][:plain[0].index(stop) + 1]


def test_a_verified_chunk_must_return_a_prefix_of_its_drafts():
    sched = StepScheduler(BlockManager(16, 4), 16, 2, [0], 128, proposer=NgramProposer(k=3))
    # prompt + 2 = [.., 2, 1, 2]: its 3-gram recurs at 1 (then 1, 2, 1) and 3 (then only 1, 2)
    sched.add(Request("r", [1, 2, 1, 2, 1, 2, 1], SamplingParams(max_tokens=10)))
    plan = sched.schedule()
    sched.update(plan, {0: 2})
    plan = sched.schedule()
    (chunk,) = plan.chunks
    assert chunk.num_draft == 3 and chunk.token_ids == (2, 1, 2, 1)
    with pytest.raises(ValueError, match="accepted drafts"):
        sched.update(plan, {0: [2, 9, 4]})


def test_lookahead_and_a_proposer_are_refused_together():
    with pytest.raises(ValueError, match="lookahead"):
        StepScheduler(BlockManager(16, 4), 16, 2, [0], 128, lookahead=True, proposer=NgramProposer(k=3))


def test_fill_drafts_puts_the_drafts_in_and_drops_unused_placeholders():
    """A prompt chunk, then two decode chunks with 3 and 2 placeholders that got 1 and 0 drafts."""
    from shardwright.serving.draft_model import fill_drafts

    ids = [1, 2, 3, 9, -1, -1, -1, 4, -1, -1]
    pos = [0, 1, 2, 5, 6, 7, 8, 3, 4, 5]
    slots = [10, 11, 12, 25, 26, 27, 28, 33, 34, 35]
    out = fill_drafts(ids, pos, slots, [3, 4, 3], [2, 6, 9], [1, 2], [[7], []])
    assert out == ([1, 2, 3, 9, 7, 4], [0, 1, 2, 5, 6, 3], [10, 11, 12, 25, 26, 33], [3, 2, 1], [2, 4, 5], [0, 1, 0])
