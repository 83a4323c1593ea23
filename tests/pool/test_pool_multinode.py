"""Pooling across nodes: a memory peer on another node of a real multi-node Ray cluster.

Two nodes of one logical GPU each, so the gang's compute rank and its memory peer must land on
different nodes: the rank cannot map the peer's segment and fetches each pooled layer through
the peer actor instead. Greedy tokens must still equal the single-process reference exactly.
(This module runs its own cluster; it shuts down any Ray instance the session started.)
"""

from __future__ import annotations

import pytest

from shardwright.actors.engine import EngineConfig, InferenceEngine
from shardwright.serving.sampling import SamplingParams
from shardwright.config import ParallelLayout, PoolOptions
from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.parallel.context import ParallelContext

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from pool_helpers import LIMITS, half_budget  # noqa: E402


@pytest.fixture(scope="module")
def two_nodes():
    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()


def test_peer_on_another_node_serves_its_layers_through_the_actor(two_nodes, pool_model):
    _, ref_model = load_model(pool_model, ParallelContext.single("cpu"))
    prompts = [[3, 14, 15, 92, 65, 35], [9, 9, 2]]
    refs = [greedy_generate(ref_model, p, 16) for p in prompts]
    budget = half_budget(pool_model, 1)
    cfg = EngineConfig(model_dir=pool_model, layout=ParallelLayout(),
                       pool=PoolOptions(budget_bytes=budget, peers=1, peer_budget_bytes=4 * budget, prefetch_depth=1),
                       **LIMITS)
    with InferenceEngine(cfg).start() as eng:
        nodes = [n["node_id"] for n in eng._gang.nodes]
        assert nodes[0] != nodes[1], "the peer should be on the other node"
        outs = eng.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True), timeout_s=300)
        assert [o.token_ids for o in outs] == refs
        memory = eng.memory()
    rank0 = next(m for who, m in memory["workers"].items() if who.startswith("rank 0"))
    assert rank0["bytes_fetched"] > 0 and rank0["high_water_bytes"] <= budget
