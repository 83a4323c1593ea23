"""Peer memory pooling in the Ray engine: a model needing twice a worker's budget.

Exactness: pooled layers are the same weights (the peers here share the node, so their segments
are bound in place) in the same kernels, so the greedy tokens must equal the single-process
reference exactly (no tolerance), at tp=1 and tp=2; the segments are unchanged after (sha256).
Budget: every worker's ledger high-water mark (weights, KV cache, step activations, fetched
layers) must stay within its budget for the whole run.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from pool_helpers import config, half_budget
from shardwright.actors.engine import InferenceEngine
from shardwright.serving.requests import RequestFailed
from shardwright.serving.sampling import SamplingParams
from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.parallel.context import ParallelContext
from shardwright.pool import PoolAdmissionError

ray = pytest.importorskip("ray")

NEW_TOKENS = 24


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2)])
def test_model_needing_twice_the_budget_generates_the_reference_tokens(ray_cluster, pool_model, tp, pp):
    _, ref_model = load_model(pool_model, ParallelContext.single("cpu"))
    prompts = [[3, 14, 15, 92, 65, 35], [7, 1], list(range(40, 80))]
    refs = [greedy_generate(ref_model, p, NEW_TOKENS) for p in prompts]
    assert len(set(refs[0])) > 4, "reference continuation too repetitive to be a test"
    budget = half_budget(pool_model, tp, pp)
    cfg = config(pool_model, tp, pp, budget_bytes=budget, peers=2, peer_budget_bytes=4 * budget, prefetch_depth=1)
    with InferenceEngine(cfg).start() as eng:
        plan = eng.health(probe=False)["memory_pool"]
        assert all("layers resident" in line and "fetched per step" in line for line in plan), plan
        # Bound in place (CPU, same-node peers): the plan reserves no fetch buffer for them.
        pooled = eng.pool_plan.to_dict()
        assert set(pooled["bytes_fetched_per_step"].values()) == {0}, pooled
        assert all(b > 0 for b in pooled["bytes_bound_in_place"].values()), pooled
        before = segment_digests(eng)
        outs = eng.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True), timeout_s=300)
        assert [o.token_ids for o in outs] == refs
        assert segment_digests(eng) == before, "a peer's segment changed while bound"
        memory = eng.memory()
    compute = [m for who, m in memory["workers"].items() if who.startswith("rank")]
    assert len(compute) == tp * pp
    for m in compute:
        assert m["budget_bytes"] == budget
        assert 0 < m["high_water_bytes"] <= budget, m
        # The peers are on this node: their segments are bound in place, nothing is copied, and
        # the bound bytes are on the peers' ledgers only.
        assert m["bytes_mapped"] > 0, "nothing was bound: the layers were not pooled"
        assert m["bytes_fetched"] == 0 and "pooled_fetch" not in m["by_kind"], m
    peers = [m for who, m in memory["workers"].items() if who.startswith("memory peer")]
    held = sum(m["by_kind"].get("held_for_peers", 0) for m in peers)
    assert held == sum(m["bytes_mapped"] for m in compute)


def segment_digests(eng) -> dict:
    """sha256 of every layer the memory peers hold, read through the peer actors."""
    out = {}
    for i, peer_rank in enumerate(eng._gang.peer_ranks):
        for rank, layer in eng.pool_plan.held_by(i):
            tensors = eng._gang.peer_tensors(peer_rank, rank, layer)
            out[(rank, layer)] = hashlib.sha256(b"".join(t.numpy().tobytes() for t in tensors)).hexdigest()
    assert out, "no layer is held by a peer"
    return out


def test_no_room_on_any_peer_is_refused_at_admission_with_the_missing_bytes(ray_cluster, pool_model):
    budget = half_budget(pool_model, 1)
    cfg = config(pool_model, 1, budget_bytes=budget, peers=1, peer_budget_bytes=budget // 8, prefetch_depth=1)
    started = time.monotonic()
    with pytest.raises(PoolAdmissionError, match=r"MiB missing for ranks on node \w+.*peer 0 on node"):
        InferenceEngine(cfg).start()
    assert time.monotonic() - started < 120
    deadline = time.monotonic() + 20  # removing a placement group is asynchronous
    while ray.available_resources().get("GPU", 0) < ray.cluster_resources()["GPU"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("GPU", 0) == ray.cluster_resources()["GPU"], "gang not released"


def test_a_dead_peer_fails_the_deployment_which_rebuilds(ray_cluster, pool_model):
    budget = half_budget(pool_model, 1)
    cfg = config(pool_model, 1, budget_bytes=budget, peers=1, peer_budget_bytes=4 * budget,
                 prefetch_depth=1).model_copy(update={"collective_timeout_s": 10})
    with InferenceEngine(cfg).start() as eng:
        stream = eng.submit([1, 2, 3], SamplingParams(max_tokens=240, ignore_eos=True))
        next(iter(stream))
        peer = eng._gang.workers[eng._gang.peer_ranks[0]]
        ray.kill(peer, no_restart=True)
        started = time.monotonic()
        with pytest.raises(RequestFailed, match="memory peer 0"):
            stream.result(timeout_s=60)
        assert time.monotonic() - started < 60
        deadline = time.monotonic() + 120
        while not eng.health(probe=False)["healthy"] and time.monotonic() < deadline:
            time.sleep(0.2)
        out = eng.generate([[4, 5, 6]], SamplingParams(max_tokens=8, ignore_eos=True), timeout_s=60)
        assert len(out[0].token_ids) == 8
        assert eng.health()["healthy"] is True
