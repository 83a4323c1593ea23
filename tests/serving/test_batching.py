"""StepScheduler: packing, chunked prefill, reservation, stop rules, cancellation, pipelining.

The simulated engine below stands in for the workers: it keeps a slot -> (seq, position, token)
map as the KV cache, writes every planned token into its slot, and checks that each chunk's
context (read through its block table) holds exactly that sequence's earlier tokens. A wrong
slot, a block shared by two live sequences or a missing write fails the check.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwright.serving.batching import Request, StepPlan, StepScheduler, TokenEvent
from shardwright.serving.kv_blocks import BlockManager
from shardwright.serving.sampling import SamplingParams, sample_tokens


def fake_token(request_id: str, step: int) -> int:
    """The 'model' output: a fixed function of (request, step), never an eos id (eos = 0)."""
    return 1 + (hash((request_id, step)) % 997)


def make(num_blocks=64, block_size=4, budget=16, max_running=8, max_model_len=1024, **kw):
    blocks = BlockManager(num_blocks, block_size)
    return StepScheduler(blocks, budget, max_running, [0], max_model_len, **kw)


class FakeEngine:
    """Runs plans against a dict KV cache and checks every context read (see module docstring)."""

    def __init__(self, sched: StepScheduler, depth: int = 1) -> None:
        self.sched, self.depth = sched, depth
        self.kv: dict[int, tuple[int, int, int]] = {}
        self.tokens: dict[int, list[int]] = {}  # seq_id -> every token fed so far, by position
        self.outputs: dict[str, list[int]] = {}
        self.finish: dict[str, str] = {}
        self.plans: list[StepPlan] = []

    def run_plan(self, plan: StepPlan) -> dict[int, int]:
        bs = self.sched.blocks.block_size
        for c in plan.chunks:
            fed = self.tokens.setdefault(c.seq_id, [])
            assert len(fed) == c.start_pos, "chunks of a sequence must be contiguous"
            fed.extend(c.token_ids)
            for pos, tok, slot in zip(range(c.start_pos, c.start_pos + len(c.token_ids)), c.token_ids, c.slots):
                assert slot == c.block_table[pos // bs] * bs + pos % bs
                self.kv[slot] = (c.seq_id, pos, tok)
            for pos in range(c.start_pos + len(c.token_ids)):  # the whole context is ours
                slot = c.block_table[pos // bs] * bs + pos % bs
                assert self.kv[slot] == (c.seq_id, pos, fed[pos])
        return {c.seq_id: fake_token(c.request_id, c.step) for c in plan.sampled_chunks()}

    def loop(self, max_steps: int = 10_000, cancel_at: dict[int, list[str]] | None = None) -> None:
        """Keep up to `depth` plans in flight; cancel_at[k] lists requests cancelled at step k."""
        in_flight: deque[tuple[StepPlan, dict[int, int]]] = deque()
        for step in range(max_steps):
            for rid in (cancel_at or {}).get(step, []):
                if (event := self.sched.cancel(rid)) is not None:
                    self.record([event])
            while len(in_flight) < self.depth and (plan := self.sched.schedule()) is not None:
                self._check_plan(plan, in_flight)
                in_flight.append((plan, self.run_plan(plan)))
                self.plans.append(plan)
            if not in_flight:
                assert not self.sched.has_unfinished(), "stuck: nothing scheduled, work left"
                return
            self.record(self.sched.update(*in_flight.popleft()))
        raise AssertionError("did not finish")

    def _check_plan(self, plan: StepPlan, in_flight) -> None:
        assert 0 < len(plan.token_ids()) <= self.sched.max_tokens_per_step
        assert len(plan.chunks) <= self.sched.max_running
        busy = {c.seq_id for p, _ in in_flight for c in p.chunks}
        assert not busy & {c.seq_id for c in plan.chunks}, "a sequence in two plans in flight"

    def record(self, events: list[TokenEvent]) -> None:
        for e in events:
            if e.token_id is not None:
                self.outputs.setdefault(e.request_id, []).append(e.token_id)
            if e.finish_reason:
                self.finish[e.request_id] = e.finish_reason


# --------------------------------------------------------------------------- by hand
def test_chunked_prefill_positions_and_slots_by_hand():
    sched = make(num_blocks=8, block_size=4, budget=6, max_running=4)
    sched.add(Request("A", list(range(10, 20)), SamplingParams(max_tokens=4)))  # 10 tokens
    sched.add(Request("B", [7, 8, 9], SamplingParams(max_tokens=4)))
    p0 = sched.schedule()  # A's first 6 prompt tokens: blocks [0, 1]; B waits (budget spent)
    assert p0.token_ids() == list(range(10, 16)) and p0.positions() == list(range(6))
    assert p0.slot_mapping() == [0, 1, 2, 3, 4, 5] and p0.sample_indices() == []
    assert sched.update(p0, {}) == []
    p1 = sched.schedule()  # A's last 4 (block 2 added, sampled) + B's first 2 (block 3)
    assert [c.block_table for c in p1.chunks] == [(0, 1, 2), (3,)]
    assert p1.token_ids() == [16, 17, 18, 19, 7, 8] and p1.positions() == [6, 7, 8, 9, 0, 1]
    assert p1.slot_mapping() == [6, 7, 8, 9, 12, 13]
    assert (p1.query_lens, p1.context_lens, p1.sample_indices()) == ([4, 2], [10, 2], [3])
    assert [(c.sample, c.step) for c in p1.chunks] == [(True, 0), (False, 0)]
    events = sched.update(p1, {0: 500})
    assert events == [TokenEvent("A", 500, "", None)]
    p2 = sched.schedule()  # decode of A first (position 10 -> block 2, offset 2), then B's last
    assert p2.token_ids() == [500, 9] and p2.positions() == [10, 2]
    assert p2.slot_mapping() == [10, 14] and p2.sample_indices() == [0, 1]
    assert (sched.blocks.num_used, sched.blocks.num_committed) == (4, 4 + 2)


def test_decode_first_then_running_prefill_then_admission_in_arrival_order():
    sched = make(budget=8, max_running=8, block_size=4)
    for rid, n in [("a", 1), ("b", 12), ("c", 3)]:
        sched.add(Request(rid, [5] * n, SamplingParams(max_tokens=5)))
    p = sched.schedule()  # a: 1 (sampled), b: 7 of 12
    assert [(c.request_id, len(c.token_ids)) for c in p.chunks] == [("a", 1), ("b", 7)]
    sched.update(p, {0: 3})
    p = sched.schedule()  # a decodes, b finishes its prompt (5), c starts with the rest (2)
    assert [(c.request_id, len(c.token_ids), c.sample) for c in p.chunks] == \
        [("a", 1, True), ("b", 5, True), ("c", 2, False)]


# ----------------------------------------------------------------- the simulated loop
@pytest.mark.parametrize("depth", [1, 2, 4])
def test_32_concurrent_requests_all_complete_within_budget(depth):
    rng = random.Random(depth)
    lengths = [1, 300] + [rng.randint(1, 300) for _ in range(30)]
    max_tokens = [rng.randint(1, 40) for _ in lengths]
    # 96 blocks x 16 = 1536 slots, far less than the ~5500 all requests need at once
    sched = make(num_blocks=96, block_size=16, budget=128, max_running=12, max_model_len=400)
    for i, (n, m) in enumerate(zip(lengths, max_tokens)):
        sched.add(Request(f"r{i}", [rng.randint(1, 999) for _ in range(n)], SamplingParams(max_tokens=m)))
    engine = FakeEngine(sched, depth)
    engine.loop()
    for i, m in enumerate(max_tokens):
        assert engine.outputs[f"r{i}"] == [fake_token(f"r{i}", s) for s in range(m)]
        assert engine.finish[f"r{i}"] == "length"
    assert sched.blocks.num_used == 0 and sched.blocks.num_committed == 0
    assert 0 < sched.blocks.high_water <= 96
    assert sched.num_in_flight == 0
    mixed = [p for p in engine.plans if {len(c.token_ids) > 1 for c in p.chunks} == {True, False}]
    assert mixed, "prefill chunks and decode tokens should share some steps"
    split = [c for p in engine.plans for c in p.chunks if not c.sample]  # a prompt's non-last chunk
    assert split, "some prompt should be split over several steps (chunked prefill)"


def test_pipelined_sequence_waits_for_its_token():
    sched = make()
    sched.add(Request("a", [1, 2, 3], SamplingParams(max_tokens=3)))
    p0 = sched.schedule()
    assert sched.schedule() is None  # a's first token is not known yet
    sched.add(Request("b", [4], SamplingParams(max_tokens=3)))
    p1 = sched.schedule()
    assert [c.request_id for c in p1.chunks] == ["b"]
    with pytest.raises(ValueError, match="oldest plan in flight is 0"):
        sched.update(p1, {1: 9})
    sched.update(p0, {0: 8})
    p2 = sched.schedule()
    assert [(c.request_id, c.token_ids) for c in p2.chunks] == [("a", (8,))]
    assert sched.num_in_flight == 2


# ------------------------------------------------------------------------- stopping
def test_eos_stop_ids_and_stop_strings_end_requests_and_free_blocks():
    vocab = ["<eos>", "a", "b", "E", "N", "D"]
    sched = make(decode=lambda ids: "".join(vocab[i] for i in ids))
    sched.add(Request("eos", [1], SamplingParams(max_tokens=10)))
    sched.add(Request("keep", [1], SamplingParams(max_tokens=2, ignore_eos=True)))
    sched.add(Request("str", [1], SamplingParams(max_tokens=10, stop=["END"])))
    feeds = {0: [1, 0], 1: [0, 0], 2: [1, 3, 4, 2, 3, 4, 5, 1]}
    events: dict[str, list[TokenEvent]] = {}
    while (plan := sched.schedule()) is not None:
        sampled = {c.seq_id: feeds[c.seq_id][c.step] for c in plan.sampled_chunks()}
        for e in sched.update(plan, sampled):
            events.setdefault(e.request_id, []).append(e)
    assert [(e.token_id, e.finish_reason) for e in events["eos"]] == [(1, None), (0, "stop")]
    assert [e.finish_reason for e in events["keep"]] == [None, "length"]
    assert "".join(e.text for e in events["str"]) == "aENb"
    assert events["str"][-1].finish_reason == "stop" and len(events["str"]) == 7
    assert sched.blocks.num_used == 0 and not sched.has_unfinished()


# --------------------------------------------------------------------- cancellation
def test_cancel_frees_blocks_at_once_and_drops_in_flight_tokens():
    sched = make(block_size=4)
    sched.add(Request("a", [1] * 9, SamplingParams(max_tokens=5)))
    sched.add(Request("b", [2] * 3, SamplingParams(max_tokens=5)))
    sched.add(Request("w", [3] * 3, SamplingParams(max_tokens=5)))
    sched.max_tokens_per_step = 12  # a (9) + b (3): w waits
    plan = sched.schedule()
    used = sched.blocks.num_used
    assert sched.cancel("a") == TokenEvent("a", None, "", "cancelled")
    assert sched.blocks.num_used == used - 3  # a's 3 blocks back before the plan returns
    assert sched.cancel("w") is not None and sched.num_waiting == 0
    assert sched.cancel("a") is None and sched.cancel("nope") is None
    assert sched.update(plan, {0: 7, 1: 8}) == [TokenEvent("b", 8, "", None)]
    assert sched.sequence("b").generated == [8] and sched.sequence("a") is None


@settings(max_examples=40, deadline=None)
@given(
    requests=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12)), min_size=1, max_size=12),
    cancels=st.dictionaries(st.integers(0, 30), st.lists(st.integers(0, 11), max_size=3), max_size=6),
    depth=st.integers(1, 3),
    budget=st.integers(4, 24),
)
def test_random_cancellations_keep_the_cache_consistent(requests, cancels, depth, budget):
    sched = make(num_blocks=13, block_size=4, budget=budget, max_running=4, max_model_len=64)  # 52 slots
    for i, (n, m) in enumerate(requests):
        sched.add(Request(f"r{i}", [i + 1] * n, SamplingParams(max_tokens=m)))
    engine = FakeEngine(sched, depth)
    engine.loop(cancel_at={k: [f"r{j}" for j in v] for k, v in cancels.items()})
    for i, (_, m) in enumerate(requests):
        want = [fake_token(f"r{i}", s) for s in range(m)]
        got = engine.outputs.get(f"r{i}", [])
        assert got == want[: len(got)]
        assert engine.finish[f"r{i}"] == ("length" if len(got) == m else "cancelled")
    assert sched.blocks.num_used == 0 and sched.blocks.num_committed == 0
    assert not sched.has_unfinished() and sched.num_in_flight == 0


def test_update_rejects_mismatched_tokens_and_changes_nothing():
    sched = make()
    sched.add(Request("a", [1], SamplingParams()))
    plan = sched.schedule()
    with pytest.raises(ValueError, match=r"seq_ids \[5\] not sampled.*none for \[0\]"):
        sched.update(plan, {5: 1})
    assert sched.num_in_flight == 1
    assert [e.token_id for e in sched.update(plan, {0: 4})] == [4]


# ----------------------------------------------------------------------- admission
def test_admission_errors_name_the_numbers():
    sched = make(num_blocks=4, block_size=4, max_model_len=100)
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add(Request("e", [], SamplingParams()))
    with pytest.raises(ValueError, match=r"prompt 90 \+ max_tokens 16 = 106 exceeds max_model_len=100"):
        sched.add(Request("long", [1] * 90, SamplingParams()))
    with pytest.raises(ValueError, match=r"needs 5 KV blocks of 4 tokens .* has 4 \(16 slots\).* <= 7"):
        sched.add(Request("big", [1] * 10, SamplingParams(max_tokens=8)))
    sched.add(Request("ok", [1] * 10, SamplingParams(max_tokens=7)))  # 16 slots: exactly fits
    with pytest.raises(ValueError, match="already queued"):
        sched.add(Request("ok", [1], SamplingParams()))
    with pytest.raises(ValueError, match="needs a decode callable"):
        sched.add(Request("s", [1], SamplingParams(stop=["x"])))
    with pytest.raises(ValueError, match="max_tokens_per_step=4 must be >= max_running=8"):
        make(budget=4, max_running=8)


def test_admission_is_first_come_first_served_under_reservation():
    sched = make(num_blocks=4, block_size=4, budget=64)
    sched.add(Request("big", [1] * 8, SamplingParams(max_tokens=5)))  # 12 slots: 3 blocks
    sched.add(Request("huge", [1] * 8, SamplingParams(max_tokens=9)))  # 4 blocks: waits
    sched.add(Request("tiny", [1], SamplingParams(max_tokens=2)))  # would fit, but queued behind
    plan = sched.schedule()
    assert [c.request_id for c in plan.chunks] == ["big"] and sched.num_waiting == 2
    engine = FakeEngine(sched)
    engine.record(sched.update(plan, engine.run_plan(plan)))
    engine.loop()
    assert sorted(engine.finish) == ["big", "huge", "tiny"] and sched.blocks.num_used == 0


def test_shortest_prompt_first_under_a_prefill_cap_gives_short_prompts_their_first_tokens_first():
    # A burst: long prompts arrive first. A 32-token prefill cap in a 64-token step.
    lengths = {"long0": 40, "long1": 30, "short0": 5, "mid": 12, "short1": 3, "short2": 8}
    sched = make(num_blocks=64, block_size=4, budget=64, max_running=8,
                 max_prefill_tokens=32, shortest_prompt_first=True)
    for rid, n in lengths.items():
        sched.add(Request(rid, [3] * n, SamplingParams(max_tokens=6)))
    engine = FakeEngine(sched)
    engine.loop()
    first_step = {}
    for i, plan in enumerate(engine.plans):
        prefill = sum(len(c.token_ids) for c in plan.chunks if c.start_pos < lengths[c.request_id])
        assert prefill <= 32, "prompt tokens of one step stay within max_prefill_tokens"
        for c in plan.sampled_chunks():
            first_step.setdefault(c.request_id, i)
    # the first step prefills the short prompts in length order, then starts long1 with the rest
    assert [c.request_id for c in engine.plans[0].chunks] == ["short1", "short0", "short2", "mid", "long1"]
    order = sorted(first_step, key=lambda r: (first_step[r], lengths[r]))
    assert order == ["short1", "short0", "short2", "mid", "long1", "long0"]
    # later steps decode the short ones beside the long prompts' chunks
    assert any(len(c.token_ids) == 1 for c in engine.plans[1].chunks)
    for rid in lengths:  # same tokens as any order: the model output does not depend on batching
        assert engine.outputs[rid] == [fake_token(rid, s) for s in range(6)]
    assert sched.blocks.num_used == 0


@pytest.mark.parametrize("max_wait_steps", [4, 10])
def test_max_wait_steps_bounds_how_long_short_prompts_overtake_a_long_one(max_wait_steps):
    # One long prompt, then a new short request every step: shortest first alone would never
    # admit the long one while a short one waits (one sequence runs at a time here).
    sched = make(num_blocks=64, block_size=4, budget=16, max_running=1, shortest_prompt_first=True,
                 max_wait_steps=max_wait_steps)
    sched.add(Request("long", [2] * 20, SamplingParams(max_tokens=1)))
    admitted_at = None
    for step in range(40):
        sched.add(Request(f"s{step}", [2], SamplingParams(max_tokens=1)))
        plan = sched.schedule()
        if admitted_at is None and any(c.request_id == "long" for c in plan.chunks):
            admitted_at = step
        sched.update(plan, {c.seq_id: 5 for c in plan.sampled_chunks()})
    assert admitted_at == max_wait_steps, "admitted in arrival order once it has waited max_wait_steps"


def test_seeded_sampling_is_identical_across_batchings():
    """A toy model whose logits depend only on a sequence's own tokens: outputs must not
    depend on the budget, max_running or pipeline depth (i.e. on batch composition)."""

    def logits_for(tokens: tuple[int, ...]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(hash(tokens[-3:]) % (2**31) + len(tokens))
        return torch.randn(50, generator=gen) * 2

    def run(budget: int, max_running: int, depth: int) -> dict[str, list[int]]:
        sched = make(budget=budget, max_running=max_running, seed=11)
        for i in range(10):
            params = SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=i if i % 2 else None)
            sched.add(Request(f"r{i}", [i + 1] * (1 + 3 * i), params))
        out: dict[str, list[int]] = {}
        queue: deque = deque()
        while sched.has_unfinished() or queue:
            while len(queue) < depth and (plan := sched.schedule()) is not None:
                chunks = plan.sampled_chunks()
                seqs = {s.seq_id: tuple(sched.sequence(s.request_id).tokens) for s in chunks}
                logits = torch.stack([logits_for(seqs[c.seq_id]) for c in chunks]) if chunks else torch.zeros(0, 50)
                toks = sample_tokens(logits, [c.params for c in chunks], [c.seed for c in chunks],
                                     [c.step for c in chunks])
                queue.append((plan, dict(zip(plan.sampled_seq_ids(), toks))))
            for e in sched.update(*queue.popleft()):
                out.setdefault(e.request_id, []).append(e.token_id)
        return out

    base = run(budget=64, max_running=16, depth=1)
    assert run(budget=5, max_running=3, depth=1) == base
    assert run(budget=9, max_running=4, depth=3) == base
    assert len({tuple(v) for v in base.values()}) == 10


def test_micro_batches_split_decode_sequences_across_plans_in_flight():
    from shardwright.serving.batching import Request, StepScheduler
    from shardwright.serving.kv_blocks import BlockManager
    from shardwright.serving.sampling import SamplingParams

    sched = StepScheduler(BlockManager(64, 4), max_tokens_per_step=64, max_running=8, eos_ids=[],
                          max_model_len=64, micro_batches=2)
    for i in range(6):
        sched.add(Request(f"r{i}", [1, 2], SamplingParams(max_tokens=5, ignore_eos=True)))
    prefill = sched.schedule()
    sched.update(prefill, {sid: 7 for sid in prefill.sampled_seq_ids()})
    first, second = sched.schedule(), sched.schedule()
    assert len(first.chunks) == 3 and len(second.chunks) == 3
    assert not set(first.sampled_seq_ids()) & set(second.sampled_seq_ids())
    assert sched.schedule() is None  # every sequence is in flight


# ------------------------------------------------------------ lookahead (async scheduling)
class LookaheadFakeEngine(FakeEngine):
    """The workers of async scheduling: a feedback token (-1 in the plan) is the token this
    'worker' sampled for that sequence in the previous plan, which must have just run."""

    def __init__(self, sched: StepScheduler) -> None:
        super().__init__(sched, depth=2)
        self.last: dict[int, int] = {}
        self.lookahead_chunks = 0

    def run_plan(self, plan: StepPlan) -> dict[int, int]:
        index, seqs = plan.feedback()
        ids = plan.token_ids()
        for i, seq in zip(index, seqs):
            assert ids[i] == -1
            ids[i] = self.last[seq]  # KeyError if the previous plan did not sample it
        self.lookahead_chunks += len(index)
        at, chunks = 0, []
        for c in plan.chunks:
            n = len(c.token_ids)
            chunks.append(dataclasses.replace(c, token_ids=tuple(ids[at:at + n]), feedback=False))
            at += n
        self.last = super().run_plan(dataclasses.replace(plan, chunks=tuple(chunks)))
        return self.last

    def _check_plan(self, plan: StepPlan, in_flight) -> None:
        assert 0 < len(plan.token_ids()) <= self.sched.max_tokens_per_step
        busy = {c.seq_id for p, _ in in_flight for c in p.chunks}
        for c in plan.chunks:  # only a feedback chunk may join a sequence already in flight
            assert c.feedback == (c.seq_id in busy), c


def test_lookahead_produces_the_same_tokens_with_two_plans_in_flight():
    rng = random.Random(7)
    lengths = [1, 40] + [rng.randint(1, 60) for _ in range(10)]
    max_tokens = [rng.randint(1, 20) for _ in lengths]
    sched = make(num_blocks=96, block_size=8, budget=64, max_running=6, max_model_len=200, lookahead=True)
    for i, (n, m) in enumerate(zip(lengths, max_tokens)):
        sched.add(Request(f"r{i}", [rng.randint(1, 999) for _ in range(n)], SamplingParams(max_tokens=m)))
    engine = LookaheadFakeEngine(sched)
    engine.loop()
    for i, m in enumerate(max_tokens):
        assert engine.outputs[f"r{i}"] == [fake_token(f"r{i}", s) for s in range(m)]
    assert engine.lookahead_chunks > 50, "decode steps should be dispatched ahead"
    assert sched.blocks.num_used == 0 and sched.num_in_flight == 0


def test_lookahead_never_passes_max_tokens_and_drops_work_after_a_stop():
    sched = make(lookahead=True)
    sched.add(Request("a", [5, 6], SamplingParams(max_tokens=2)))
    p0 = sched.schedule()  # prompt, samples token 0
    p1 = sched.schedule()  # feeds token 0 back, samples token 1 (the last)
    assert [c.feedback for c in p1.chunks] == [True] and p1.chunks[0].start_pos == 2
    assert sched.schedule() is None  # token 1 is the last: nothing to look ahead to
    sched.update(p0, {0: 7})
    assert sched.schedule() is None
    events = sched.update(p1, {0: 8})
    assert [(e.token_id, e.finish_reason) for e in events] == [(8, "length")]
    # A stop: the chunk dispatched ahead is dropped on update, and the blocks are free at once.
    sched.add(Request("b", [5], SamplingParams(max_tokens=10)))
    q0, q1 = sched.schedule(), sched.schedule()
    assert q1.chunks[0].feedback
    assert [e.finish_reason for e in sched.update(q0, {1: 0})] == ["stop"]  # eos id 0
    assert sched.blocks.num_used == 0
    assert sched.update(q1, {1: 9}) == []


def test_lookahead_needs_one_pipeline_stage():
    with pytest.raises(ValueError, match="micro_batches=1"):
        make(lookahead=True, micro_batches=2)
