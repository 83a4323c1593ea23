"""Expert pooling with pre-gate prefetch (pool/experts.py, pool/expert_plan.py) on a real checkpoint.

A tiny Mixtral made by transformers (4 layers, 8 experts of width 96, top 2, random weights,
save_pretrained) is served by the bare greedy loop with a budget of half what it needs all-resident:
the planner pools experts (per expert, into host memory) until the resident weights, the KV cache,
the step's activations and 2 fetch slots per pooled layer fit. With and without the pre-gate
prefetch the greedy tokens equal the all-resident run's and transformers', the ledger's high-water
mark stays within the budget, and the pool's counters add up: every pooled expert a layer used was
either found in a slot or fetched on demand, and the experts used (resident + pooled) are the
distinct experts the all-resident model's routers chose, forward by forward.
"""

from __future__ import annotations

import pytest
import torch

from shardwright.config import ParallelLayout
from shardwright.models import load_model
from shardwright.models.generate import greedy_generate
from shardwright.models.moe import record_router_logits
from shardwright.parallel.context import ParallelContext
from shardwright.pool.expert_plan import cold_order, plan_experts
from shardwright.pool.experts import expert_sizes, load_expert_pooled
from shardwright.pool.ledger import BudgetExceeded, MemoryLedger
from shardwright.pool.planner import HOST, Holder, PoolAdmissionError
from shardwright.pool.sizing import shard_sizes

transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")

PROMPT, NEW_TOKENS, SLOTS = [5, 17, 99, 3, 42, 7, 250, 11, 64, 128], 16, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """A model this small runs fastest on one thread (a team of OpenMP threads on the shared, loaded
    CI cores spins at every barrier: seconds for these 16 tokens)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(directory, transformers' greedy tokens of PROMPT)."""
    torch.manual_seed(23)
    cfg = transformers.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     initializer_range=0.3, bos_token_id=None, eos_token_id=None,
                                     num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False)
    model = transformers.MixtralForCausalLM(cfg).eval()
    directory = tmp_path_factory.mktemp("expert-pool") / "mixtral"
    model.save_pretrained(directory)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=0)
    return str(directory), out[0, len(PROMPT):].tolist()


def _fixed_bytes(spec, ctx) -> int:
    """KV cache and the prefill's activations of the bare loop (besides the weights)."""
    sizes = shard_sizes(spec, ParallelLayout(), 0)
    return sizes.kv_bytes_per_token * (len(PROMPT) + NEW_TOKENS) + sizes.activation_bytes(len(PROMPT), 0, 0,
                                                                                          len(PROMPT))


@pytest.fixture(scope="module")
def resident(mixtral):
    """The all-resident run: greedy tokens, and the distinct experts each forward's routers chose."""
    directory, _ = mixtral
    ctx = ParallelContext.single("cpu")
    spec, model = load_model(directory, ctx)
    with record_router_logits(model) as logits:
        tokens = greedy_generate(model, PROMPT, NEW_TOKENS)
    used = sum(len(torch.topk(lg, spec.experts_per_token, dim=-1).indices.unique()) for lg in logits)
    sizes, other = expert_sizes(spec, ctx)
    return tokens, used, spec, sizes, other + sum(sizes.values()) + _fixed_bytes(spec, ctx)


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "on-demand"])
def test_half_budget_generates_the_resident_tokens_within_budget(mixtral, resident, prefetch):
    directory, hf_tokens = mixtral
    tokens, used, spec, sizes, need = resident
    assert tokens == hf_tokens  # exact: greedy argmax over fp32 logits within 1e-4 of transformers'
    budget = need // 2
    with pytest.raises(BudgetExceeded):  # all-resident does not fit
        MemoryLedger(budget).reserve("weights", need)
    ctx = ParallelContext.single("cpu")
    fixed = _fixed_bytes(spec, ctx)
    plan = plan_experts(sizes, budget_bytes=budget, fixed_bytes=need - sum(sizes.values()), slots=SLOTS,
                        host_bytes=need)
    pooled = plan.pooled()
    assert len(pooled) >= len(sizes) // 2 and set(pooled.values()) == {HOST}
    ledger = MemoryLedger(budget)
    _, model, pool = load_expert_pooled(directory, ctx, plan, ledger, prefetch=prefetch)
    ledger.reserve("kv_and_activations", fixed)
    try:
        assert greedy_generate(model, PROMPT, NEW_TOKENS) == tokens  # the same weights: bit-identical logits
        t = pool.traffic()
    finally:
        pool.close()
    assert ledger.high_water <= budget
    assert t["hits"] + t["misses"] == t["pooled_used"] > 0
    assert t["pooled_used"] + t["resident_used"] == used
    moved = t["bytes_prefetched"] + t["bytes_on_demand"]
    assert t["bytes_on_demand"] == t["misses"] * next(iter(sizes.values()))  # experts are all one size
    if prefetch:
        assert t["prefetched"] > 0 and t["gate_chosen"] > 0 and 0 < t["pregate_hit_rate"] <= 1
        assert t["prefetch_unused"] <= t["prefetched"]
    else:
        assert t["prefetched"] == t["bytes_prefetched"] == t["gate_chosen"] == 0
    print(f"prefetch={prefetch}: {plan.describe()}; bytes moved per token {moved / NEW_TOKENS:.0f}, "
          f"hit rate {t['hit_rate']:.2f}, pre-gate hit rate {t['pregate_hit_rate']}")


def test_plan_is_per_expert_and_refuses_what_cannot_fit():
    sizes = {(layer, e): 100 for layer in range(3) for e in range(4)}
    # Coldest first: the highest ids of the later layers, the first layer's last of all.
    assert cold_order(sizes)[:4] == [(1, 3), (2, 3), (1, 2), (2, 2)]
    assert cold_order(sizes, heat={(2, 0): -1.0})[0] == (2, 0)
    peers = [Holder(peer=0, node="b", spare_bytes=1000), Holder(peer=1, node="a", spare_bytes=250)]
    plan = plan_experts(sizes, budget_bytes=1000, fixed_bytes=100, slots=1, node="a", peers=peers, host_bytes=1000)
    pooled = plan.pooled()
    # 4 pooled + 2 slots: 100 fixed + 8 * 100 resident + 2 * 100 slots = 1100 > 1000; 5 pooled fits.
    assert len(pooled) == 5 and plan.slot_bytes() == 200
    assert [pooled[k] for k in cold_order(sizes)[:5]] == [1, 1, 0, 0, 0]  # same node first, then the other
    assert peers[1].spare_bytes == 50 and plan.pooled_by_layer() == {1: {1, 2, 3}, 2: {2, 3}}
    with pytest.raises(PoolAdmissionError, match="missing"):
        plan_experts(sizes, budget_bytes=150, fixed_bytes=100, slots=1, host_bytes=10_000)
    with pytest.raises(PoolAdmissionError, match="not enough pooled memory"):
        plan_experts(sizes, budget_bytes=1000, fixed_bytes=100, slots=1, host_bytes=0)
