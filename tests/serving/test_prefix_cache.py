"""Prefix caching: hash matching, reference counts, LRU eviction and reservation soundness of
the BlockManager, and the StepScheduler prefilling from the first uncached token.

The simulated engine below keeps, per cache slot, the (position, hash of every token up to it)
that the plans wrote there: a chunk whose context holds anything but its own sequence's tokens
(a wrong hit, an evicted block read again, a shared block overwritten) fails the check.
"""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model_helpers import expected_prefill_saved, shared_prefix_prompts
from shardwright.serving.batching import Request, StepPlan, StepScheduler, TokenEvent
from shardwright.serving.kv_blocks import BlockManager
from shardwright.serving.prefix_cache import PrefixCache, block_hashes
from shardwright.serving.sampling import SamplingParams


def cached_bm(num_blocks: int, block_size: int) -> BlockManager:
    return BlockManager(num_blocks, block_size, prefix_caching=True)


def admit(bm: BlockManager, seq: int, prompt: list[int], extra: int = 0) -> list[int]:
    """Reserve prompt + extra tokens, allocate and cache the prompt; the table."""
    assert bm.reserve(seq, len(prompt) + extra, prompt)
    table = bm.ensure(seq, len(prompt))
    bm.cache_full_blocks(seq, len(prompt))
    return list(table)


# --------------------------------------------------------------------------- by hand
def test_hashes_chain_over_predecessors():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # the ninth token is no full block
    assert block_hashes([1, 2, 3, 4], 4) == a[:1]
    b = block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert b[0] != a[0] and b[1] != a[1]  # same second block, other first block: other key


def test_shared_prefix_is_found_counted_once_and_freed_to_idle():
    bm = cached_bm(num_blocks=8, block_size=4)
    prompt = list(range(1, 11))  # 10 tokens: blocks [0, 1] full, block 2 partial
    assert admit(bm, 0, prompt, extra=2) == [0, 1, 2]
    assert bm.num_cached == 2 and bm.num_hit_blocks == 0
    # Same 8 leading tokens: both full blocks found; the rest in new blocks.
    assert bm.reserve(1, 12, prompt[:8] + [50, 51, 52])
    assert bm.block_table(1) == [0, 1]  # 8 tokens already cached
    assert bm.ensure(1, 11) == [0, 1, 3]
    assert (bm.num_used, bm.num_committed) == (4, 4)  # blocks 0, 1 counted once
    assert (bm.num_hit_blocks, bm.num_prefill_tokens_saved, bm.num_hit_sequences) == (2, 8, 1)
    assert bm.free(0) == 3
    assert (bm.num_used, bm.num_idle_cached) == (3, 0)  # 0 and 1 still held by seq 1
    assert bm.free(1) == 3
    assert (bm.num_used, bm.num_free, bm.num_committed) == (0, 8, 0)
    assert (bm.num_cached, bm.num_idle_cached) == (2, 2)  # kept with their hashes
    assert bm.reserve(2, 9, prompt[:9]) and bm.block_table(2) == [0, 1]  # found again when idle


def test_the_whole_prompt_is_never_a_hit():
    bm = cached_bm(num_blocks=8, block_size=4)
    prompt = list(range(1, 9))  # exactly two full blocks
    admit(bm, 0, prompt)
    bm.free(0)
    assert bm.reserve(1, 8, prompt)
    assert bm.block_table(1) == [0]  # the last block is computed again, its last token sampled
    assert bm.ensure(1, 8) == [0, 2]  # a private copy: the cached block 1 is not written
    assert bm.cache_full_blocks(1, 8) == 0  # its hash stays on block 1
    assert bm.block_hash(2) is None and bm.block_hash(1) is not None
    assert bm.reserve(2, 2, prompt[:1] + [9]) and bm.block_table(2) == []  # no full block: no hit


def test_lru_eviction_takes_uncached_blocks_first_then_the_oldest_tail():
    bm = cached_bm(num_blocks=6, block_size=2)
    admit(bm, 0, [1, 2, 3, 4, 5, 6])  # blocks 0, 1, 2 cached
    bm.free(0)
    admit(bm, 1, [7, 8, 9, 10])  # blocks 3, 4 (free list first, nothing evicted)
    bm.free(1)
    assert (bm.num_idle_cached, bm.prefix_stats()["evictions"]) == (5, 0)
    assert bm.reserve(2, 4) and bm.ensure(2, 4) == [5, 2]  # block 5 free, then LRU: seq 0's tail
    assert bm.prefix_stats()["evictions"] == 1 and bm.block_hash(2) is None
    assert bm.reserve(3, 7, [1, 2, 3, 4, 5, 6, 11]) and bm.block_table(3) == [0, 1]  # root kept
    bm.free(2)
    bm.free(3)


def test_idle_hits_count_against_free_blocks_held_ones_do_not():
    bm = cached_bm(num_blocks=5, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    admit(bm, 0, prompt)  # blocks 0, 1 cached, 2 private
    bm.free(0)  # idle: 0, 1; free: 2, 3, 4
    assert bm.reserve(1, 6)  # 3 blocks promised to an unrelated sequence: 2 uncommitted
    assert not bm.reserve(2, 6, prompt)  # 2 idle hits revived + 1 new = 3 > 2
    assert bm.num_sequences == 1 and bm.num_idle_cached == 2  # the refusal changed nothing
    bm.free(1)
    assert bm.reserve(2, 6, prompt) and bm.block_table(2) == [0, 1]
    assert bm.reserve(3, 8, prompt)  # hits held by seq 2 are free to share: 4 - 2 = 2 new blocks
    assert bm.num_committed == 3 + 2 and bm.num_uncommitted == 0
    assert bm.ensure(3, 8) == [0, 1, 2, 3] and bm.ensure(2, 6) == [0, 1, 4]


def test_prefix_cache_keys_are_unique_and_evict_forgets():
    cache = PrefixCache()
    assert cache.insert(3, b"k") and not cache.insert(4, b"k") and not cache.insert(3, b"j")
    assert cache.match([b"k", b"x"]) == [3] and cache.evict() is None  # held, not idle
    assert cache.release(3) and not cache.release(4)
    assert cache.evict() == 3 and cache.match([b"k"]) == [] and cache.num_cached == 0


# ---------------------------------------------------------------- random workloads
_PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [1, 2, 3, 4, 9, 9, 9, 9], [5] * 12]
_ops = st.lists(
    st.tuples(st.sampled_from(["reserve", "reserve", "grow", "free"]), st.integers(0, 7),
              st.integers(0, 2), st.integers(0, 12), st.integers(1, 10)),
    max_size=80,
)


@settings(max_examples=200, deadline=None)
@given(num_blocks=st.integers(1, 14), block_size=st.integers(1, 4), ops=_ops)
def test_random_workloads_keep_sharing_sound_and_reservations_honoured(num_blocks, block_size, ops):
    """Content written per block (position, prefix) is what every hit reads; a shared block is
    never written; counters match the tables; growth within a reservation never fails."""
    bm = cached_bm(num_blocks, block_size)
    live: dict[int, tuple[list[int], int]] = {}  # seq -> (tokens, reserved tokens)
    written: dict[int, int] = {}  # slot -> hash of the token prefix up to and including it
    for op, seq, which, cut, n in ops:
        if op == "reserve" and seq not in live:
            prompt = _PREFIXES[which][:cut] + [100 + seq] * (n % 4 + 1)
            total = len(prompt) + n
            hits = _expected_hits(bm, prompt, total)
            revived = sum(1 for b in hits if b not in _held(bm, live))
            fits = revived + bm.blocks_for(total) - len(hits) <= bm.num_uncommitted
            assert bm.reserve(seq, total, prompt) == fits
            if fits:
                assert bm.block_table(seq) == hits
                for p in range(len(hits) * block_size):  # every hit slot holds our prefix
                    assert written[_slot(bm, seq, p)] == hash(tuple(prompt[:p + 1]))
                live[seq] = (prompt + [200 + seq] * n, total)
                _write(bm, seq, live, written, len(hits) * block_size, len(prompt))
                bm.cache_full_blocks(seq, len(prompt))
        elif op == "grow" and seq in live:
            tokens, total = live[seq]
            done = len(bm.block_table(seq)) * block_size
            _write(bm, seq, live, written, min(done, total), min(total, done + n))
        elif op == "free":
            bm.free(seq)
            live.pop(seq, None)
        _check(bm, live)
    for seq in list(live):
        bm.free(seq)
    assert (bm.num_used, bm.num_free, bm.num_committed) == (0, num_blocks, 0)
    assert bm.num_cached == bm.num_idle_cached


def _expected_hits(bm: BlockManager, prompt: list[int], total: int) -> list[int]:
    by_key = {bm.block_hash(b): b for b in range(bm.num_blocks) if bm.block_hash(b) is not None}
    keys = block_hashes(prompt, bm.block_size)[: min(len(prompt) - 1, total) // bm.block_size]
    hits = []
    for key in keys:
        if key not in by_key:
            break
        hits.append(by_key[key])
    return hits


def _held(bm: BlockManager, live) -> set[int]:
    return {b for s in live for b in bm.block_table(s)}


def _slot(bm: BlockManager, seq: int, p: int) -> int:
    table = bm.block_table(seq)
    return table[p // bm.block_size] * bm.block_size + p % bm.block_size


def _write(bm: BlockManager, seq: int, live, written: dict[int, int], start: int, end: int) -> None:
    """Seq writes positions [start, end) (growing its table): never into a block another holds."""
    tokens, _ = live[seq]
    bm.ensure(seq, end)  # within the reservation: must never raise
    others = {b for s in live if s != seq for b in bm.block_table(s)}
    for p in range(start, end):
        slot = _slot(bm, seq, p)
        assert slot // bm.block_size not in others, "a shared block was written"
        written[slot] = hash(tuple(tokens[:p + 1]))


def _check(bm: BlockManager, live) -> None:
    tables = {s: bm.block_table(s) for s in live}
    held = [b for t in tables.values() for b in t]
    assert len(set(held)) == bm.num_used and bm.num_free + bm.num_used == bm.num_blocks
    assert all(0 <= b < bm.num_blocks for b in held)
    where: dict[int, set[int]] = {}
    for t in tables.values():
        for i, b in enumerate(t):
            where.setdefault(b, set()).add(i)
    for b, idx in where.items():  # a block in two tables: cached, at the same index in both
        if sum(b in t for t in tables.values()) > 1:
            assert bm.block_hash(b) is not None and len(idx) == 1
    promised = sum(max(0, bm.blocks_for(total) - len(tables[s])) for s, (_, total) in live.items())
    assert bm.num_committed == bm.num_used + promised <= bm.num_blocks
    cached = {b for b in range(bm.num_blocks) if bm.block_hash(b) is not None}
    assert bm.num_idle_cached == len(cached - set(held)) and bm.num_cached == len(cached)
    assert bm.high_water >= bm.num_used


# ------------------------------------------------------------------- the scheduler
class ContentEngine:
    """Runs plans against a slot -> (position, prefix hash) cache (see the module docstring)."""

    def __init__(self, sched: StepScheduler, prompts: dict[str, list[int]], depth: int = 1) -> None:
        self.sched, self.prompts, self.depth = sched, prompts, depth
        self.kv: dict[int, tuple[int, int]] = {}
        self.fed: dict[int, list[int]] = {}
        self.outputs: dict[str, list[int]] = {}
        self.finish: dict[str, str] = {}
        self.prompt_tokens_run = 0

    def run_plan(self, plan: StepPlan) -> dict[int, int]:
        bs = self.sched.blocks.block_size
        for c in plan.chunks:
            if c.seq_id not in self.fed:  # its first chunk starts after the cached prefix
                prompt = self.prompts[c.request_id]
                assert c.start_pos % bs == 0 and c.start_pos < len(prompt)
                self.fed[c.seq_id] = list(prompt[:c.start_pos])
            fed = self.fed[c.seq_id]
            assert len(fed) == c.start_pos, "chunks of a sequence must be contiguous"
            fed.extend(c.token_ids)
            self.prompt_tokens_run += max(0, min(len(fed), len(self.prompts[c.request_id])) - c.start_pos)
            for pos, slot in zip(range(c.start_pos, len(fed)), c.slots):
                self.kv[slot] = (pos, hash(tuple(fed[:pos + 1])))
            for pos in range(len(fed)):  # the whole context is our own tokens
                slot = c.block_table[pos // bs] * bs + pos % bs
                assert self.kv[slot] == (pos, hash(tuple(fed[:pos + 1]))), (c.request_id, pos)
        return {c.seq_id: 1 + hash((c.request_id, c.step)) % 997 for c in plan.sampled_chunks()}

    def loop(self, cancel_at: dict[int, list[str]] | None = None) -> None:
        in_flight: deque = deque()
        for step in range(10_000):
            for rid in (cancel_at or {}).get(step, []):
                if (event := self.sched.cancel(rid)) is not None:
                    self.record([event])
            while len(in_flight) < self.depth and (plan := self.sched.schedule()) is not None:
                in_flight.append((plan, self.run_plan(plan)))
            if not in_flight:
                assert not self.sched.has_unfinished(), "stuck"
                return
            self.record(self.sched.update(*in_flight.popleft()))
        raise AssertionError("did not finish")

    def record(self, events: list[TokenEvent]) -> None:
        for e in events:
            if e.token_id is not None:
                self.outputs.setdefault(e.request_id, []).append(e.token_id)
            if e.finish_reason:
                self.finish[e.request_id] = e.finish_reason


def shared_prompts(rng: random.Random, count: int, longest: int) -> dict[str, list[int]]:
    return {f"r{i}": p for i, p in enumerate(shared_prefix_prompts(rng, count, longest))}


def make(num_blocks=256, block_size=4, budget=64, max_running=8, caching=True, **kw) -> StepScheduler:
    return StepScheduler(BlockManager(num_blocks, block_size, prefix_caching=caching), budget, max_running,
                         [0], 1024, **kw)


@pytest.mark.parametrize("caching", [True, False])
def test_32_requests_sharing_prefixes_prefill_only_uncached_tokens(caching):
    rng = random.Random(3)
    prompts = shared_prompts(rng, 32, 150)
    max_tokens = {rid: rng.randint(1, 12) for rid in prompts}
    sched = make(num_blocks=2048, block_size=4, budget=64, max_running=8, caching=caching)
    for rid, p in prompts.items():
        sched.add(Request(rid, p, SamplingParams(max_tokens=max_tokens[rid])))
    engine = ContentEngine(sched, prompts)
    engine.loop()
    for rid, m in max_tokens.items():
        assert engine.outputs[rid] == [1 + hash((rid, s)) % 997 for s in range(m)]
    saved = expected_prefill_saved(prompts.values(), 4) if caching else 0
    assert saved > 1000 or not caching, "prompts should share much"
    assert sched.blocks.num_prefill_tokens_saved == saved
    assert engine.prompt_tokens_run == sum(map(len, prompts.values())) - saved
    assert (sched.blocks.num_used, sched.blocks.num_committed) == (0, 0)
    assert sched.blocks.prefix_stats()["evictions"] == 0


def test_a_small_cache_evicts_and_stays_correct_with_pipelining_and_lookahead():
    rng = random.Random(5)
    prompts = shared_prompts(rng, 32, 120)
    for depth, lookahead, micro in [(2, False, 2), (2, True, 1), (3, False, 3)]:
        sched = make(num_blocks=48, block_size=4, budget=48, max_running=4, lookahead=lookahead,
                     micro_batches=micro)
        for rid, p in prompts.items():
            sched.add(Request(rid, p, SamplingParams(max_tokens=6)))
        engine = (LookaheadContentEngine if lookahead else ContentEngine)(sched, prompts, depth)
        engine.loop()
        for rid in prompts:
            assert engine.outputs[rid] == [1 + hash((rid, s)) % 997 for s in range(6)]
        stats = sched.blocks.prefix_stats()
        assert stats["evictions"] > 0 and stats["prefill_tokens_saved"] > 0, stats
        assert engine.prompt_tokens_run == sum(map(len, prompts.values())) - stats["prefill_tokens_saved"]
        assert sched.blocks.num_used == 0 and sched.blocks.num_committed == 0


class LookaheadContentEngine(ContentEngine):
    """Async scheduling's workers: a feedback token is the one sampled for it the plan before."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.last: dict[int, int] = {}

    def run_plan(self, plan: StepPlan) -> dict[int, int]:
        import dataclasses

        chunks = [dataclasses.replace(c, token_ids=(self.last[c.seq_id],), feedback=False) if c.feedback else c
                  for c in plan.chunks]
        self.last = super().run_plan(dataclasses.replace(plan, chunks=tuple(chunks)))
        return self.last


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    cancels=st.dictionaries(st.integers(0, 40), st.lists(st.integers(0, 11), max_size=3), max_size=6),
    depth=st.integers(1, 3),
    num_blocks=st.integers(16, 40),  # the longest request (50 + 8 tokens) needs 15 blocks
)
def test_random_cancellations_with_shared_prefixes_keep_the_cache_consistent(seed, cancels, depth, num_blocks):
    rng = random.Random(seed)
    prompts = shared_prompts(rng, 12, 30)
    sched = make(num_blocks=num_blocks, block_size=4, budget=16, max_running=4, micro_batches=depth)
    for rid, p in prompts.items():
        sched.add(Request(rid, p, SamplingParams(max_tokens=1 + len(p) % 9)))
    engine = ContentEngine(sched, prompts, depth)
    engine.loop(cancel_at={k: [f"r{j}" for j in v] for k, v in cancels.items()})
    for rid, p in prompts.items():
        got = engine.outputs.get(rid, [])
        assert got == [1 + hash((rid, s)) % 997 for s in range(len(got))]
        assert engine.finish[rid] == ("length" if len(got) == 1 + len(p) % 9 else "cancelled")
    assert (sched.blocks.num_used, sched.blocks.num_committed) == (0, 0)
    assert sched.blocks.num_cached == sched.blocks.num_idle_cached
