"""Gang placement and the cluster model: TP groups on one node, fewest nodes, best fit, all-or-nothing."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardwright.config import ParallelLayout
from shardwright.scheduler.model import ClusterInventory, GangShape, Job, UnplaceableJobError
from shardwright.scheduler.placement import place, place_and_allocate


def cluster_with_free(free_by_node: dict[str, int], total: int = 8) -> ClusterInventory:
    return ClusterInventory.from_nodes({n: total for n in free_by_node}, free_by_node)


def test_tp4_job_lands_on_one_node_of_three():
    cluster = ClusterInventory.uniform(3, 4)
    placement = place(GangShape(ParallelLayout(tp=4)), cluster)
    assert placement is not None
    assert len(placement.gpus_by_node) == 1
    assert list(placement.gpus_by_node.values()) == [4]


def test_memory_peers_follow_the_ranks_on_their_node_then_the_freest_node():
    cluster = cluster_with_free({"a": 3, "b": 1, "c": 2}, total=4)
    placement = place(GangShape(ParallelLayout(tp=2), peers=3), cluster)
    # tp=2 best-fits node c (2 free, then full), so the peers go to the freest node: a, a, a
    assert placement.rank_nodes == ("c", "c", "a", "a", "a")
    assert placement.gpus_by_node == {"c": 2, "a": 3} and placement.num_gpus == 5
    placement = place(GangShape(ParallelLayout(tp=2), peers=1), cluster_with_free({"a": 3, "b": 2}, total=4))
    assert placement.rank_nodes == ("b", "b", "a")  # b is full after the ranks
    placement = place(GangShape(ParallelLayout(tp=1), peers=1), cluster_with_free({"a": 3, "b": 1}, total=4))
    assert placement.rank_nodes == ("b", "a")
    assert place(GangShape(ParallelLayout(tp=2), peers=2), cluster_with_free({"a": 2, "b": 1}, total=4)) is None
    placement = place_and_allocate(GangShape(ParallelLayout(tp=1, pp=2), peers=1), cluster := cluster_with_free({"a": 4}, total=4))
    assert placement.rank_nodes == ("a", "a", "a") and cluster.free_by_node == {"a": 1}
    with pytest.raises(ValueError, match="peers=-1"):
        GangShape(peers=-1)


def test_tp2_pp2_pairs_each_sit_on_one_node_when_split():
    cluster = cluster_with_free({"a": 2, "b": 2, "c": 1}, total=4)
    placement = place(GangShape(ParallelLayout(tp=2, pp=2)), cluster)
    assert placement is not None
    assert placement.tp_groups(2) == [("a", "a"), ("b", "b")]


def test_best_fit_prefers_the_node_that_becomes_exactly_full():
    cluster = cluster_with_free({"big": 8, "exact": 3, "mid": 5})
    placement = place(GangShape(ParallelLayout(tp=3)), cluster)
    assert placement is not None and placement.gpus_by_node == {"exact": 3}


def test_multi_node_gang_uses_fewest_nodes_and_fills_them():
    # 12 GPUs in TP groups of 4 on free counts 8, 8, 4: two nodes (one 8, the 4) leave one node untouched.
    cluster = cluster_with_free({"a": 8, "b": 8, "c": 4})
    placement = place(GangShape(ParallelLayout(tp=4, pp=3)), cluster)
    assert placement is not None
    assert placement.gpus_by_node == {"a": 8, "c": 4}
    assert placement.rank_nodes == ("a",) * 8 + ("c",) * 4


def test_gang_is_all_or_nothing_and_inventory_unchanged():
    cluster = cluster_with_free({"a": 3, "b": 3})  # 6 free GPUs, but no node holds a TP group of 4
    before = dict(cluster.free_by_node)
    assert place_and_allocate(GangShape(ParallelLayout(tp=4)), cluster) is None
    assert place_and_allocate(GangShape(ParallelLayout(tp=1, pp=7)), cluster) is None
    assert cluster.free_by_node == before and cluster.num_free_gpus == 6


def test_fit_is_exact_on_fragmented_nodes():
    cluster = cluster_with_free({"a": 3, "b": 3})  # each node holds one group of 2
    assert place(GangShape(ParallelLayout(tp=2, pp=2)), cluster) is not None
    assert place(GangShape(ParallelLayout(tp=2, pp=3)), cluster) is None


def test_bundles_one_gpu_per_rank_with_its_node():
    placement = place(GangShape(ParallelLayout(tp=2, dp=2)), cluster_with_free({"a": 2, "b": 8}))
    assert placement is not None
    bundles = placement.bundles()
    assert [b.rank for b in bundles] == [0, 1, 2, 3]
    assert all(b.num_gpus == 1 for b in bundles)
    assert [b.node_id for b in bundles] == list(placement.rank_nodes)


def test_allocate_and_release_keep_buckets_consistent():
    cluster = ClusterInventory.uniform(2, 8)
    placement = place_and_allocate(GangShape(ParallelLayout(tp=8, pp=2)), cluster)
    assert placement is not None and cluster.num_free_gpus == 0
    cluster.release(placement.gpus_by_node)
    assert cluster.num_free_gpus == 16 and len(cluster.buckets[8]) == 2
    with pytest.raises(ValueError, match="over its total"):
        cluster.release({"node-0000": 1})


def job(gpus_shape: GangShape, job_id: str = "j") -> Job:
    return Job(job_id, "t", "training", gpus_shape, 0.0, duration_s=1.0)


def test_job_larger_than_cluster_is_rejected_with_clear_message():
    cluster = ClusterInventory.uniform(3, 4)
    with pytest.raises(UnplaceableJobError, match="larger than the whole cluster"):
        cluster.check_fits_ever(job(GangShape(ParallelLayout(tp=4, pp=4))))


def test_tp_larger_than_any_node_can_never_be_placed():
    cluster = ClusterInventory.uniform(4, 4)
    with pytest.raises(UnplaceableJobError, match=r"cannot ever be placed: tp=8"):
        cluster.check_fits_ever(job(GangShape(ParallelLayout(tp=8))))
    with pytest.raises(UnplaceableJobError, match="TP groups"):  # 3 nodes of 4 hold only 3 groups of 3
        ClusterInventory.uniform(3, 4).check_fits_ever(job(GangShape(ParallelLayout(tp=3, pp=4))))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GangShape({"tp": 2}), "layout={'tp': 2} must be a shardwright.config.ParallelLayout"),
        (lambda: GangShape(peers=1.5), "peers=1.5"),
        (lambda: Job("", "t", "training", GangShape(), 0.0), "job_id"),
        (lambda: Job("j", "t", "serving", GangShape(), 0.0), "kind='serving'"),
        (lambda: Job("j", "t", "training", GangShape(), 5.0, deadline_s=1.0), "deadline_s=1.0"),
        (lambda: Job("j", "t", "training", GangShape(), 0.0, duration_s=0.0), "duration_s=0.0"),
        (lambda: ClusterInventory.from_nodes({"a": 4}, {"a": 5}), "free GPUs of node 'a' = 5"),
        (lambda: ClusterInventory.from_nodes({}), "at least one node"),
        (lambda: ClusterInventory.uniform(0, 8), "num_nodes=0"),
    ],
)
def test_invalid_inputs_raise_value_errors_naming_the_value(build, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        build()


def test_inference_defaults_to_a_higher_class_than_training():
    train = Job("a", "t", "training", GangShape(), 0.0)
    serve = Job("b", "t", "inference", GangShape(), 0.0)
    assert serve.priority > train.priority and serve.preemptible is False and train.preemptible


@st.composite
def cluster_and_shape(draw):
    sizes = draw(st.lists(st.sampled_from([1, 2, 4, 8]), min_size=1, max_size=12))
    free = [draw(st.integers(0, size)) for size in sizes]
    cluster = ClusterInventory.from_nodes(
        {f"n{i}": s for i, s in enumerate(sizes)}, {f"n{i}": f for i, f in enumerate(free)}
    )
    shape = GangShape(ParallelLayout(
        tp=draw(st.sampled_from([1, 2, 3, 4, 8])), pp=draw(st.integers(1, 4)), dp=draw(st.integers(1, 2))
    ))
    return cluster, shape


@settings(max_examples=300, deadline=None)
@given(cluster_and_shape())
def test_property_tp_groups_never_span_nodes_and_fit_is_exact(case):
    cluster, shape = case
    placement = place(shape, cluster)
    capacities = sorted((f // shape.tp for f in cluster.free_by_node.values()), reverse=True)
    feasible = sum(capacities) >= shape.num_tp_groups
    assert (placement is not None) == feasible
    if placement is None:
        return
    assert len(placement.rank_nodes) == shape.num_gpus
    for group in placement.tp_groups(shape.tp):
        assert len(set(group)) == 1, f"TP group spans nodes: {group}"
    for node, count in placement.gpus_by_node.items():
        assert count <= cluster.free_by_node[node]
    fewest = next(k for k in range(1, len(capacities) + 1) if sum(capacities[:k]) >= shape.num_tp_groups)
    assert len(placement.gpus_by_node) == fewest


def test_an_expert_parallel_unit_sits_on_one_node_where_it_can():
    # pp=2 of ep=2 x tp=1 (two units of 2 ranks that exchange tokens all-to-all) on two 3-free nodes:
    # each unit on one node; placing single ranks would fill a (a, a, a, b) and split the second unit
    cluster = cluster_with_free({"a": 3, "b": 3}, total=4)
    placement = place(GangShape(ParallelLayout(ep=2, pp=2)), cluster)
    assert placement.rank_nodes == ("a", "a", "b", "b")
    # ep=2 x tp=2 x dp=2 on free 6, 6: one unit of 4 a node, not 6 + 2
    placement = place(GangShape(ParallelLayout(tp=2, ep=2, dp=2)), cluster_with_free({"a": 6, "b": 6}))
    assert placement.rank_nodes == ("a",) * 4 + ("b",) * 4
    # no node holds 4 free GPUs: the unit is split, TP group by TP group, rather than not placed
    cluster = cluster_with_free({"a": 2, "b": 2}, total=4)
    placement = place(GangShape(ParallelLayout(tp=2, ep=2)), cluster)
    assert placement.tp_groups(2) == [("a", "a"), ("b", "b")]
    # a unit larger than any node is split the same way
    cluster = cluster_with_free({"a": 2, "b": 2}, total=2)
    assert place(GangShape(ParallelLayout(ep=4)), cluster).gpus_by_node == {"a": 2, "b": 2}
