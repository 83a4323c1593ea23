"""Peer memory pooling without Ray: the ledger, the planner, and pooled forwards in one process.

A pooled forward binds the same weights (bound in place from the peer's segment, or copied from
host memory) into the same kernels, so its logits must equal the all-resident model's bit for bit
(torch.equal, no tolerance).
"""

from __future__ import annotations

import pytest
import torch

from model_helpers import tiny_spec
from shardwright.config import ModelSpec, ParallelLayout
from shardwright.models import load_model
from shardwright.models.random_init import write_random_checkpoint
from shardwright.parallel.context import ParallelContext
from shardwright.pool import HOST, BudgetExceeded, Holder, MemoryLedger, PoolAdmissionError, RankNeed, plan_pool
from shardwright.pool.fetch import LayerFetcher
from shardwright.pool.planner import spread
from shardwright.pool.sizing import shard_sizes, tensor_bytes
from shardwright.pool.store import PeerStore, map_segment

MIB = 1 << 20


def test_ledger_refuses_past_budget_and_keeps_the_high_water_mark():
    ledger = MemoryLedger(100, owner="rank 0")
    ledger.reserve("weights", 60)
    ledger.reserve("pooled_fetch", 30)
    ledger.release("pooled_fetch", 30)
    with pytest.raises(BudgetExceeded, match=r"rank 0: kv_cache needs 50 B more.*10 B over"):
        ledger.reserve("kv_cache", 50)
    assert ledger.resident == 60 and ledger.high_water == 90
    with pytest.raises(ValueError, match="only 0 reserved"):
        ledger.release("kv_cache", 1)


def test_spread_keeps_the_first_layer_and_spaces_the_rest():
    assert spread(12, 6) == [1, 3, 5, 7, 9, 11]
    assert spread(12, 3) == [3, 7, 11]
    assert spread(4, 0) == [] and spread(4, 4) == [0, 1, 2, 3]


def test_plan_pools_the_fewest_layers_same_node_peers_first_then_host():
    need = RankNeed(rank=0, node="a", budget_bytes=100 * MIB, fixed_bytes=20 * MIB, layer_bytes=(10 * MIB,) * 12)
    # 12 layers of 10 MiB + 20 fixed = 140 MiB; with depth 1 the staging is 2 layers (20 MiB):
    # 20 + 10 * (12 - n) + 20 <= 100  ->  n = 6.
    peers = [Holder(0, "b", 1000 * MIB), Holder(1, "a", 40 * MIB)]
    plan = plan_pool([need], peers, host_bytes=10 * MIB, prefetch_depth=1)
    pooled = plan.pooled(0)
    assert sorted(pooled) == [1, 3, 5, 7, 9, 11]
    assert [pooled[i] for i in sorted(pooled)] == [1, 1, 1, 1, 0, 0]  # same node until full, then node b
    assert plan.bytes_pooled(0) == 60 * MIB
    assert "6/12 layers resident" in plan.describe()[0]
    # No peers: host memory, then refusal naming the missing bytes and the node.
    plan = plan_pool([need], [], host_bytes=60 * MIB, prefetch_depth=1)
    assert set(plan.pooled(0).values()) == {HOST}
    # Whole layers: the peer takes 2 (5 MiB left), the host 1, so 3 layers (30 MiB) have no place.
    with pytest.raises(PoolAdmissionError, match=r"30.0 MiB missing for ranks on node a"):
        plan_pool([need], [Holder(0, "a", 25 * MIB)], host_bytes=15 * MIB, prefetch_depth=1)


def test_plan_reserves_no_fetch_buffers_for_layers_bound_in_place():
    # A CPU rank binds a same-node peer's layers in place (zero-copy): no fetch buffer for them, so
    # 20 + 10 * (12 - n) <= 100 -> n = 4 (not 6, as with 2 buffers of depth 1 counted).
    need = RankNeed(rank=0, node="a", budget_bytes=100 * MIB, fixed_bytes=20 * MIB, layer_bytes=(10 * MIB,) * 12,
                    binds_in_place=True)
    plan = plan_pool([need], [Holder(0, "a", 1000 * MIB)], prefetch_depth=1)
    assert sorted(plan.pooled(0)) == [2, 5, 8, 11] and set(plan.pooled(0).values()) == {0}
    assert plan.fetched_bytes[0] == 0 and plan.to_dict()["bytes_bound_in_place"] == {"0": 40 * MIB}
    assert "0 B fetched per step, 40.0 MiB bound in place" in plan.describe()[0]
    # The same rank on a GPU (nothing bound in place) pools 6 and counts their fetch buffers.
    gpu = RankNeed(**{**need.__dict__, "binds_in_place": False})
    plan = plan_pool([gpu], [Holder(0, "a", 1000 * MIB)], prefetch_depth=1)
    assert len(plan.pooled(0)) == 6 and plan.fetched_bytes[0] == 60 * MIB
    # Room for 3 layers on the same node, the rest on node b: the fetched ones need their buffers
    # (n = 4 or 5: 20 + 10 * (12 - n) + 10 * min(n - 3, 2) > 100; n = 6 fits), the bound ones none.
    plan = plan_pool([need], [Holder(0, "b", 1000 * MIB), Holder(1, "a", 30 * MIB)], prefetch_depth=1)
    pooled = plan.pooled(0)
    assert [pooled[i] for i in sorted(pooled)] == [1, 1, 1, 0, 0, 0]
    assert plan.fetched_bytes[0] == 30 * MIB and plan.bytes_pooled(0) == 60 * MIB
    # Host memory is always fetched: 4 layers in place would not fit with host-held ones.
    plan = plan_pool([need], [], host_bytes=1000 * MIB, prefetch_depth=1)
    assert len(plan.pooled(0)) == 6 and plan.fetched_bytes[0] == 60 * MIB


def test_plan_refuses_a_rank_whose_fixed_part_does_not_fit():
    # 9 MiB fixed + one 2 MiB fetch buffer (depth 0) = 11 MiB even with every layer pooled.
    need = RankNeed(rank=1, node="n1", budget_bytes=10 * MIB, fixed_bytes=9 * MIB, layer_bytes=(2 * MIB,) * 4)
    with pytest.raises(PoolAdmissionError, match=r"rank 1 on node n1 cannot fit.*needs 11.0 MiB.*1.0 MiB missing on node n1"):
        plan_pool([need], [Holder(0, "n1", 1 << 40)], prefetch_depth=0)


def test_shard_sizes_match_the_loaded_shard(tmp_path):
    spec = tiny_spec("llama", num_kv_heads=2, num_layers=3)
    path = write_random_checkpoint(tmp_path / "m", spec, seed=1)
    _, model = load_model(path, ParallelContext.single())
    sizes = shard_sizes(spec, ParallelLayout(), 0)
    assert sizes.weight_bytes == tensor_bytes(model.parameters())
    assert sizes.layer_bytes == tuple(tensor_bytes(b.parameters()) for b in model.blocks)
    assert sizes.kv_bytes_per_token * 16 * 8 == model.new_paged_cache(8, 16).nbytes
    half = shard_sizes(spec, ParallelLayout(tp=2), 1)
    assert sum(half.layer_bytes) < sum(sizes.layer_bytes)


@pytest.mark.parametrize("shared", [True, False], ids=["peer-segment", "host-copy"])
@pytest.mark.parametrize("depth", [0, 2])
def test_pooled_forward_equals_resident_bitwise(tmp_path, shared, depth):
    spec = tiny_spec("llama", num_kv_heads=2, num_layers=5)
    path = write_random_checkpoint(tmp_path / "m", spec, seed=3, std=0.2)
    ctx = ParallelContext.single()
    _, resident = load_model(path, ctx)
    pooled_layers = [1, 3, 4]
    store = PeerStore(MemoryLedger(None, owner="peer"), shared=shared)
    store.load(str(path), ModelSpec.from_hf_dir(path), ParallelLayout(), [(0, i) for i in pooled_layers])
    _, model = load_model(path, ctx, skip_blocks=frozenset(pooled_layers))
    assert all(p.is_meta for i in pooled_layers for p in model.blocks[i].parameters())
    sources = {}
    for (rank, layer), handle in store.handles().items():
        if shared:
            sources[layer] = map_segment(handle)
        else:
            from shardwright.pool.fetch import TensorSource
            sources[layer] = TensorSource(store.flat[(rank, layer)], handle["shapes"])
    store.unlink()
    layer_bytes = sources[1].nbytes
    ledger = MemoryLedger((depth + 1) * layer_bytes, owner="rank 0 fetch buffers")
    model.layer_weights = LayerFetcher(model.blocks, sources, ledger, ctx.device, depth)
    ids = torch.randint(0, spec.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(11).expand(2, 11)
    with torch.inference_mode():
        for _ in range(2):  # twice: buffers are dropped and fetched again
            assert torch.equal(model(ids, positions), resident(ids, positions))
    assert ledger.resident == 0 and ledger.high_water <= (depth + 1) * layer_bytes
    if shared:  # a same-node segment is bound in place: nothing fetched, nothing in the ledger
        assert model.layer_weights.bytes_fetched == 0 and ledger.high_water == 0
        assert model.layer_weights.bytes_mapped == len(pooled_layers) * layer_bytes
        assert not model.layer_weights.background
    else:
        assert model.layer_weights.bytes_fetched == 2 * len(pooled_layers) * layer_bytes
        assert all(p.is_meta for i in pooled_layers for p in model.blocks[i].parameters())
    model.layer_weights.close()
    assert all(p.is_meta for i in pooled_layers for p in model.blocks[i].parameters())


def test_device_free_budget_needs_cuda_and_numbers_must_be_positive():
    from shardwright.config import PoolOptions
    from shardwright.pool.ledger import resolve_budget

    assert PoolOptions(budget_bytes="device-free", peers=1).budget_bytes == "device-free"
    assert resolve_budget(123, "cpu") == 123 and resolve_budget(None, "cpu") is None
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="needs a CUDA device; on the CPU give budget_bytes"):
            resolve_budget("device-free", torch.device("cpu"))
    else:
        assert 0 < resolve_budget("device-free", torch.device("cuda", 0)) <= torch.cuda.mem_get_info()[1]
    for bad in (0, -1, "free"):
        with pytest.raises(ValueError):
            PoolOptions(budget_bytes=bad)
    with pytest.raises(ValueError, match="need budget_bytes"):
        PoolOptions(peers=1)
