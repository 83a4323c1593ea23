"""KV spilling on plain objects: the scheduler's spill bookkeeping and one rank's host copies.

The scheduler tests run plans against a dict KV cache (slot -> (position, token)) that
executes the plans' spill operations exactly as a worker does (in order, before the plan's
tokens are written), and check that every context a chunk attends over holds that sequence's
tokens at their positions (shared prefix blocks included): a restored sequence reads exactly
what was written before it was spilled.
`HostKVStore` is checked on a real PagedKVCache: spill, overwrite, restore elsewhere, compare
exactly (copies are bit-exact, so the tolerance is zero).
"""

from __future__ import annotations

import random
from collections import deque

import pytest
import torch

from shardwright.models.paged import PagedKVCache
from shardwright.pool.kv_host import HostKVStore
from shardwright.pool.ledger import BudgetExceeded, MemoryLedger
from shardwright.serving.batching import Request, StepPlan, StepScheduler
from shardwright.serving.kv_blocks import BlockManager
from shardwright.serving.kv_spill import SpillStore
from shardwright.serving.sampling import SamplingParams


def fake_token(request_id: str, step: int) -> int:
    return 1 + (hash((request_id, step)) % 997)  # never eos (0)


class SpillingFake:
    """Runs plans on a dict KV cache, with host copies for spilled blocks; pauses the `idle`
    requests once they have `pause_after` tokens (a caller that stopped reading)."""

    def __init__(self, sched: StepScheduler, idle: set[str], pause_after: int, depth: int = 1) -> None:
        self.sched, self.idle, self.pause_after, self.depth = sched, idle, pause_after, depth
        self.kv: dict[int, tuple] = {}
        self.host: dict[int, list[list[tuple]]] = {}
        self.fed: dict[int, list[int]] = {}
        self.outputs: dict[str, list[int]] = {}
        self.plans: list[StepPlan] = []
        self.max_held = 0

    def run_plan(self, plan: StepPlan) -> dict[int, int]:
        bs = self.sched.blocks.block_size
        for op in plan.spill_ops:
            if op.kind == "spill":
                self.host[op.seq_id] = [[self.kv.get(b * bs + o) for o in range(bs)] for b in op.blocks]
            elif op.kind == "restore":
                for b, saved in zip(op.blocks, self.host.pop(op.seq_id), strict=True):
                    for o, entry in enumerate(saved):
                        self.kv[b * bs + o] = entry
            else:
                del self.host[op.seq_id]
        for c in plan.chunks:
            if c.seq_id not in self.fed:  # a prefix-cache hit starts past its cached blocks
                self.fed[c.seq_id] = list(self.sched.sequence(c.request_id).tokens[:c.start_pos])
            fed = self.fed[c.seq_id]
            assert len(fed) == c.start_pos
            fed.extend(c.token_ids)
            for pos, tok, slot in zip(range(c.start_pos, c.start_pos + len(c.token_ids)), c.token_ids, c.slots):
                self.kv[slot] = (pos, tok)
            for pos in range(c.start_pos + len(c.token_ids)):  # the context holds this sequence's tokens
                assert self.kv.get(c.block_table[pos // bs] * bs + pos % bs) == (pos, fed[pos])
        return {c.seq_id: fake_token(c.request_id, c.step) for c in plan.sampled_chunks()}

    def loop(self, max_steps: int = 20_000) -> None:
        """Run until only paused requests are left (or none)."""
        in_flight: deque = deque()
        for _ in range(max_steps):
            while len(in_flight) < self.depth and (plan := self.sched.schedule()) is not None:
                in_flight.append((plan, self.run_plan(plan)))
                self.plans.append(plan)
                store = self.sched.spiller.store
                self.max_held = max(self.max_held, store.num_held)
                assert store.num_held <= store.capacity_blocks
                assert self.sched.blocks.num_committed <= self.sched.blocks.num_blocks
            if not in_flight:
                return
            for e in self.sched.update(*in_flight.popleft()):
                if e.token_id is None:
                    continue
                got = self.outputs.setdefault(e.request_id, [])
                got.append(e.token_id)
                if e.request_id in self.idle and len(got) == self.pause_after and e.finish_reason is None:
                    self.sched.pause(e.request_id)
        raise AssertionError("did not finish")


def make(num_blocks: int, spill_blocks: int, *, block_size=4, budget=64, max_running=32, micro_batches=1):
    blocks = BlockManager(num_blocks, block_size, prefix_caching=True)
    return StepScheduler(blocks, budget, max_running, [0], 1024, spill=SpillStore(spill_blocks, 100),
                         micro_batches=micro_batches)


def add_requests(sched, rng, n=32, max_tokens=12):
    prefix = [rng.randint(1, 999) for _ in range(8)]  # two shared full blocks: spilled copies of cached blocks
    prompts = [prefix + [rng.randint(1, 999) for _ in range(rng.randint(1, 20))] for _ in range(n)]
    for i, p in enumerate(prompts):
        sched.add(Request(f"r{i}", p, SamplingParams(max_tokens=max_tokens)))
    return prompts


@pytest.mark.parametrize("depth", [1, 2])
def test_idle_half_spills_and_restores_exactly_when_the_cache_fits_half(depth):
    rng = random.Random(depth)
    need = -(-(28 + 12 - 1) // 4)  # blocks of the longest request
    sched = make(num_blocks=16 * need, spill_blocks=16 * need, micro_batches=depth)  # depth 2: as pp = 2
    add_requests(sched, rng)
    idle = {f"r{i}" for i in range(16)}  # the first admitted: they hold the blocks the others need
    fake = SpillingFake(sched, idle, pause_after=3, depth=depth)
    fake.loop()
    store = sched.spiller.store
    assert sched.num_spilled > 0 and store.num_spills > 0, "the idle half should have spilled"
    assert all(len(fake.outputs[f"r{i}"]) == 12 for i in range(16, 32)), "the active half runs to the end"
    for rid in idle:
        sched.resume(rid)
    fake.loop()
    for i in range(32):
        assert fake.outputs[f"r{i}"] == [fake_token(f"r{i}", s) for s in range(12)]
    assert not sched.has_unfinished() and sched.blocks.num_used == 0 and sched.blocks.num_committed == 0
    assert store.num_held == 0 and not fake.host
    assert store.blocks_spilled == store.blocks_restored > 0 and store.num_spills == store.num_restores
    stats = store.stats()
    assert stats["bytes_spilled"] == stats["bytes_restored"] == 100 * store.blocks_spilled


def four_requests(sched):
    for i in range(4):  # 5 prompt tokens + 4 new - 1 fed back: 8 slots, 2 blocks each
        sched.add(Request(f"r{i}", [1 + i] * 5, SamplingParams(max_tokens=4)))


def test_a_full_spill_store_refuses_and_the_waiting_request_waits():
    sched = make(num_blocks=4, spill_blocks=3)
    four_requests(sched)
    fake = SpillingFake(sched, {"r0", "r1"}, pause_after=2)
    fake.loop()
    store = sched.spiller.store
    # r0 and r1 fill the cache and pause; r0 (2 blocks) spills for r2; r1 would take the store to
    # 4 > 3 blocks, so it stays resident and r3 waits for r2's blocks instead.
    assert store.num_spills == 1 and fake.max_held == 2 and sched.sequence("r0").status == "spilled"
    assert sched.sequence("r1").status == "running"
    assert len(fake.outputs["r2"]) == len(fake.outputs["r3"]) == 4
    sched.resume("r0")
    sched.resume("r1")
    fake.loop()
    assert all(fake.outputs[f"r{i}"] == [fake_token(f"r{i}", s) for s in range(4)] for i in range(4))
    assert sched.blocks.num_used == 0 and store.num_held == 0 and not fake.host


def test_without_a_spill_store_paused_sequences_stay_resident():
    sched = StepScheduler(BlockManager(4, 4), 64, 8, [0], 1024)
    four_requests(sched)
    fake = SpillingFake(sched, {"r0", "r1"}, pause_after=2)
    fake.sched.spiller = None
    while (plan := sched.schedule()) is not None:
        assert not plan.spill_ops
        for e in sched.update(plan, fake.run_plan(plan)):
            if len(fake.outputs.setdefault(e.request_id, []) + [0]) == 2:
                sched.pause(e.request_id)
            fake.outputs[e.request_id].append(e.token_id)
    assert sched.num_running == 2 and sched.num_waiting == 2 and sched.num_spilled == 0


def test_cancel_while_spilled_drops_the_copy_with_the_next_plan():
    sched = make(num_blocks=4, spill_blocks=8)
    four_requests(sched)
    fake = SpillingFake(sched, {"r0"}, pause_after=1)
    fake.loop()
    assert sched.sequence("r0").status == "spilled" and 0 in fake.host
    assert sched.cancel("r0").finish_reason == "cancelled"
    store = sched.spiller.store
    assert store.num_held == 0 and store.blocks_dropped == store.blocks_spilled > 0
    sched.add(Request("late", [9] * 5, SamplingParams(max_tokens=2)))
    fake.loop()
    assert [op.kind for op in fake.plans[-2].spill_ops] == ["drop"] and not fake.host


def test_spill_store_refuses_past_capacity_and_counts():
    store = SpillStore(5, bytes_per_block=10)
    assert store.put(1, 3) and not store.put(2, 3) and store.put(2, 2)
    assert store.num_held == 5
    with pytest.raises(ValueError, match="already spilled"):
        store.put(1, 1)
    assert store.take(1) == 3 and store.drop(2) == 2 and store.drop(7) == 0
    s = store.stats()
    assert (s["blocks_spilled"], s["blocks_restored"], s["blocks_dropped"], s["held_blocks"]) == (5, 3, 2, 0)
    assert s["bytes_spilled"] == 50 and s["bytes_restored"] == 30
    with pytest.raises(KeyError, match="no spilled blocks"):
        store.take(1)


def test_host_store_restores_blocks_bit_exactly_elsewhere_within_its_ledger():
    cache = PagedKVCache(3, 10, 4, 2, 8, dtype=torch.float32, device="cpu")
    g = torch.Generator().manual_seed(0)
    for t in cache.keys + cache.values:
        t.copy_(torch.randn(t.shape, generator=g))
    before = [t.clone() for t in cache.keys + cache.values]
    per_block = cache.nbytes // 10
    store = HostKVStore(cache, MemoryLedger(3 * per_block, owner="rank 0 KV spill (host)"))
    assert store.spill(7, [2, 5]) == 2 * per_block
    with pytest.raises(BudgetExceeded, match="kv_spill"):
        store.spill(8, [0, 1])  # 4 blocks > the 3-block budget: refused, nothing copied
    for t in cache.keys + cache.values:
        t.zero_()  # the blocks were handed to others and overwritten
    store.run([("restore", 7, [9, 0])])
    rows = lambda b: slice(b * 4, b * 4 + 4)  # noqa: E731
    for t, old in zip(cache.keys + cache.values, before):
        assert torch.equal(t[rows(9)], old[rows(2)]) and torch.equal(t[rows(0)], old[rows(5)])
    assert store.ledger.resident == 0
    assert store.traffic()["kv_bytes_spilled"] == store.traffic()["kv_bytes_restored"] == 2 * per_block
    store.spill(3, [1])
    assert store.drop(3) == per_block and store.ledger.resident == 0
