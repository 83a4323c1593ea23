"""BlockManager: block tables, slots, reservations, counters (pure Python, no torch)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwright.serving.kv_blocks import BlockManager, OutOfBlocksError


def test_tables_slots_and_counters_by_hand():
    bm = BlockManager(num_blocks=4, block_size=4)
    assert bm.reserve(7, 6) and bm.reserve(9, 4)  # 2 + 1 blocks promised
    assert bm.ensure(7, 3) == [0]
    assert bm.ensure(9, 4) == [1]
    assert bm.ensure(7, 6) == [0, 2]
    # position p of seq 7 lives in table[p // 4] * 4 + p % 4
    assert bm.slots(7, 2, 6) == [2, 3, 8, 9]
    assert bm.slots(9, 0, 4) == [4, 5, 6, 7]
    assert (bm.num_used, bm.num_free, bm.num_committed, bm.high_water) == (3, 1, 3, 3)
    assert bm.free(7) == 2
    assert (bm.num_used, bm.num_free, bm.num_committed, bm.high_water) == (1, 3, 1, 3)
    assert bm.free(9) == 1 and bm.num_used == 0 and bm.num_committed == 0


def test_reservation_refuses_what_is_promised_and_can_ever_fit():
    bm = BlockManager(num_blocks=4, block_size=16)
    assert bm.can_ever_fit(64) and not bm.can_ever_fit(65)
    assert bm.reserve(0, 40)  # 3 blocks promised, none allocated yet
    assert not bm.reserve(1, 17)  # needs 2, only 1 unpromised
    assert bm.num_sequences == 1  # a refused reservation changes nothing
    assert bm.reserve(1, 16)
    assert bm.num_uncommitted == 0
    bm.free(0)
    assert bm.reserve(2, 33)


def test_growth_past_reservation_takes_only_unpromised_blocks():
    bm = BlockManager(num_blocks=3, block_size=2)
    assert bm.reserve(0, 2) and bm.reserve(1, 2)  # 1 block each, 1 unpromised
    bm.ensure(0, 2)
    assert bm.ensure(0, 4) == [0, 1]  # takes the unpromised block
    with pytest.raises(OutOfBlocksError, match="past its reservation"):
        bm.ensure(0, 6)  # the last free block is promised to seq 1
    assert bm.block_table(0) == [0, 1]  # unchanged by the failure
    assert bm.ensure(1, 2) == [2]  # seq 1 still gets its promised block


def test_errors_name_the_values_and_free_is_idempotent():
    bm = BlockManager(num_blocks=2, block_size=4)
    assert bm.free(123) == 0  # unknown: a no-op by design (cancel after finish)
    with pytest.raises(KeyError, match="seq_id=5"):
        bm.ensure(5, 1)
    bm.reserve(5, 8)
    with pytest.raises(ValueError, match="already holds"):
        bm.reserve(5, 1)
    bm.ensure(5, 3)
    with pytest.raises(ValueError, match=r"\[2, 5\).*call ensure first"):
        bm.slots(5, 2, 5)
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockManager(0, 4)
    with pytest.raises(ValueError, match="block_size=0"):
        BlockManager(4, 0)


_ops = st.lists(
    st.tuples(st.sampled_from(["reserve", "grow", "free"]), st.integers(0, 7), st.integers(1, 40)),
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 12), block_size=st.integers(1, 5), ops=_ops)
def test_random_operations_keep_every_invariant(num_blocks, block_size, ops):
    """No block in two tables, ids in range, counters consistent, reservations always honoured."""
    bm = BlockManager(num_blocks, block_size)
    limits: dict[int, int] = {}  # seq -> reserved tokens
    for op, seq, n in ops:
        if op == "reserve" and seq not in limits:
            fits = bm.blocks_for(n) <= bm.num_uncommitted
            assert bm.reserve(seq, n) == fits
            if fits:
                limits[seq] = n
        elif op == "grow" and seq in limits:
            bm.ensure(seq, min(n, limits[seq]))  # within the reservation: must never raise
        elif op == "free":
            bm.free(seq)
            limits.pop(seq, None)
        _check_invariants(bm, limits)
    for seq in list(limits):
        bm.free(seq)
    assert (bm.num_used, bm.num_free, bm.num_committed) == (0, num_blocks, 0)


def _check_invariants(bm: BlockManager, limits: dict[int, int]) -> None:
    held = [b for seq in limits for b in bm.block_table(seq)]
    assert len(held) == len(set(held)) == bm.num_used
    assert all(0 <= b < bm.num_blocks for b in held)
    assert bm.num_free + bm.num_used == bm.num_blocks
    assert bm.high_water >= bm.num_used
    promised = sum(max(bm.blocks_for(n), len(bm.block_table(s))) for s, n in limits.items())
    assert bm.num_committed == promised <= bm.num_blocks
