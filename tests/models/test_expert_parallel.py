"""Expert parallelism (ParallelLayout.ep) and the router's load-balancing loss, against transformers.

A tiny Mixtral (4 experts, top 2 renormalised) and a tiny Qwen2-MoE (4 experts of width 32, top 2
not renormalised, a shared expert behind a sigmoid gate, layer 1 dense), random weights written
with save_pretrained, with output_router_logits and router_aux_loss_coef=0.5 in their config.json
(so transformers' `.loss` carries the aux loss, weighted enough that a wrong one shows in the
router's gradient). At ep = 2 and ep = 2 x tp = 2 (real gloo ranks): the prompt's logits and the
greedy tokens equal transformers', the all-to-alls carry exactly the routed (token, expert) pairs
(counted by ExpertCommStats and predicted from transformers' own router logits), and the loss with
the aux loss and every gradient equal the ep = 1 run here and transformers' backward.
"""

from __future__ import annotations

import pytest
import torch

from moe_cases import run_all
from shardwright.config import ModelSpec, ParallelLayout
from shardwright.parallel.context import axis_groups, mesh_coords, mesh_rank
from shardwright.parallel.experts import row_range
from shardwright.parallel.launch import run_ranks

transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")

from test_families import COMMON, NEW_TOKENS, PROMPT_LEN, VOCAB, _checkpoint_named, _hf_greedy, \
    _randomise_biases_and_norms  # noqa: E402
from test_tensor_parallel import assemble  # noqa: E402

# Logits: different but equivalent fp32 kernels (~1e-6 seen), as test_families.
LOGIT_TOL = 1e-4
# Against transformers' backward: other kernels and summation orders in fp32 (~1e-6 seen).
HF_GRAD_TOL = 1e-4
# ep = 2 against ep = 1 here: the same kernels on other row blocks (BLAS blocks a matmul of other
# shapes differently; the expert outputs are summed in the same order): ~1e-7 seen.
EP_GRAD_TOL = 1e-5
# The loss is a mean of fp32 terms: ~1e-7 seen.
LOSS_TOL = 1e-5
AUX_COEF = 0.5
LAYOUTS = {"ep2": {"ep": 2}, "ep2_tp2": {"ep": 2, "tp": 2}}


def _mixtral():
    cfg = transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                                     output_router_logits=True, router_aux_loss_coef=AUX_COEF)
    return transformers.MixtralForCausalLM(cfg)


def _qwen2_moe():
    cfg = transformers.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=48, mlp_only_layers=[1],
                                      tie_word_embeddings=False, output_router_logits=True,
                                      router_aux_loss_coef=AUX_COEF)
    return transformers.Qwen2MoeForCausalLM(cfg)


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Per model: directory, prompt, transformers' logits, greedy tokens and router logits of the
    prompt, and its loss (with the aux loss) and gradients on one batch."""
    torch.manual_seed(17)
    root = tmp_path_factory.mktemp("moe")
    rng = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 24), generator=rng)
    labels = torch.randint(0, VOCAB, (2, 24), generator=rng)
    labels[0, :3] = -100
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)  # transformers shifts the labels
    out = {}
    for name, make in (("mixtral", _mixtral), ("qwen2_moe", _qwen2_moe)):
        model = make().eval()
        _randomise_biases_and_norms(model)
        model.save_pretrained(root / name)
        prompt = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            fwd = model(prompt)
            tokens = _hf_greedy(model, prompt[0].tolist(), NEW_TOKENS)
        model = transformers.AutoModelForCausalLM.from_pretrained(root / name).float()
        result = model(ids, labels=labels)
        result.loss.backward()
        grads = {}
        for n, p in model.named_parameters():
            grads.update(_checkpoint_named(n, p.grad.clone(), name))
        out[name] = dict(dir=str(root / name), prompt=prompt[0].tolist(), logits=fwd.logits[0], tokens=tokens,
                         router_logits=[r.detach() for r in fwd.router_logits], loss=result.loss.detach(),
                         aux=result.aux_loss.detach(), grads=grads)
    return ids, targets, out


@pytest.fixture(scope="module")
def runs(refs):
    """Both models at ep = 1 (in process) and at each layout of LAYOUTS (gloo ranks): by layout,
    the ranks' (greedy results, gradient results)."""
    ids, targets, models = refs
    greedy = [(m["dir"], m["prompt"], NEW_TOKENS) for m in models.values()]
    grads = [(m["dir"], ids, targets) for m in models.values()]
    out = {"ep1": [run_all(0, 1, {}, greedy, grads, AUX_COEF)]}
    for name, layout in LAYOUTS.items():
        out[name] = run_ranks(run_all, ParallelLayout(**layout).world_size, args=(layout, greedy, grads, AUX_COEF))
    return out


def test_ep_mesh_and_layout_checks(refs):
    layout = ParallelLayout(tp=2, ep=2, pp=2)
    assert layout.world_size == 8
    assert [mesh_coords(r, layout)["ep"] for r in range(4)] == [0, 0, 1, 1]  # ep outer to tp, inner to pp
    assert all(mesh_rank(mesh_coords(r, layout), layout) == r for r in range(8))
    assert axis_groups(layout, "ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    spec = ModelSpec.from_hf_dir(refs[2]["mixtral"]["dir"])
    assert spec.router_aux_loss_coef == AUX_COEF
    ParallelLayout(ep=4).validate_for(spec)
    with pytest.raises(ValueError, match="ep=3 does not divide num_experts=4") as err:
        ParallelLayout(ep=3).validate_for(spec)
    assert "\n" not in str(err.value)
    dense = spec.model_copy(update={"num_experts": 0, "experts_per_token": 0, "router_aux_loss_coef": 0.0})
    with pytest.raises(ValueError, match="ep=2 needs a mixture-of-experts model"):
        ParallelLayout(ep=2).validate_for(dense)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_and_greedy_tokens_match_transformers(refs, runs, layout):
    _, _, models = refs
    for rank_results in runs[layout]:
        for (logits, _, tokens, experts), (name, ref) in zip(rank_results[0], models.items()):
            err = (logits[0] - ref["logits"]).abs().max()
            assert err <= LOGIT_TOL, f"{name} {layout}: logits differ by {err}"
            assert tokens == ref["tokens"], f"{name} {layout}: greedy tokens differ"
            assert experts == 2, f"{name} {layout}: each EP rank holds half of the 4 experts"
    assert all(len(set(m["tokens"])) > 3 for m in models.values()), "reference continuation too repetitive"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_all_to_all_carries_exactly_the_routed_pairs(refs, runs, layout):
    """Per EP group (one per TP rank): the pairs dispatched are the prompt's tokens * top-k per MoE
    layer, and the pairs that travel are those whose expert lives on the other EP rank than the
    token's row share, predicted from transformers' router logits."""
    _, _, models = refs
    parallel = ParallelLayout(**LAYOUTS[layout])
    for i, (name, ref) in enumerate(models.items()):
        remote = 0
        for router_logits in ref["router_logits"]:
            chosen = torch.topk(torch.softmax(router_logits.float(), -1), 2, dim=-1).indices
            for src in range(parallel.ep):
                rows = row_range(PROMPT_LEN, src, parallel.ep)
                remote += int((chosen[rows.start:rows.stop] // 2 != src).sum())
        layers = len(ref["router_logits"])
        assert remote > 0
        for group in axis_groups(parallel, "ep"):
            stats = [runs[layout][r][0][i][1] for r in group]
            assert sum(s["pairs_dispatched"] for s in stats) == PROMPT_LEN * 2 * layers, name
            assert sum(s["pairs_received"] for s in stats) == PROMPT_LEN * 2 * layers, name
            assert sum(s["pairs_sent_remote"] for s in stats) == remote, name
            assert all(s["calls"] == layers for s in stats)
            assert sum(s["bytes_sent"] for s in stats) == 2 * remote * COMMON["hidden_size"] * 4  # there and back


def _grads(results, i):
    return assemble([r[1][i][1] for r in results]), [r[1][i][0] for r in results]


@pytest.mark.parametrize("layout", ["ep1", *LAYOUTS])
def test_loss_with_aux_and_gradients_match_transformers(refs, runs, layout):
    _, _, models = refs
    for i, (name, ref) in enumerate(models.items()):
        grads, losses = _grads(runs[layout], i)
        for loss in losses:
            assert abs(float(loss - ref["loss"])) <= LOSS_TOL, f"{name} {layout}: loss {loss} vs {ref['loss']}"
        assert set(grads) == set(ref["grads"]), name
        for key, g in grads.items():
            assert ref["grads"][key].abs().max() > 0, f"{name}: reference gradient of {key} is zero"
            err = (g - ref["grads"][key]).abs().max()
            assert err <= HF_GRAD_TOL, f"{name} {layout}: grad {key} differs by {err}"


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_at_ep2_equal_ep1(runs, layout):
    for i in range(2):
        ref, _ = _grads(runs["ep1"], i)
        grads, _ = _grads(runs[layout], i)
        assert set(grads) == set(ref)
        for key, g in grads.items():
            err = (g - ref[key]).abs().max()
            assert err <= EP_GRAD_TOL, f"model {i} {layout}: grad {key} differs from ep=1 by {err}"


def test_aux_loss_is_exercised(refs):
    """The aux-loss parity can fail: transformers' loss without it differs, and so does the router's
    gradient (the aux term is weighted 0.5)."""
    ids, targets, models = refs
    for name, ref in models.items():
        model = transformers.AutoModelForCausalLM.from_pretrained(ref["dir"]).float()
        result = model(ids, labels=torch.cat([torch.full((2, 1), -100), targets[:, :-1]], dim=1),
                       output_router_logits=False)
        assert abs(float(result.loss.detach() + AUX_COEF * ref["aux"] - ref["loss"])) <= LOSS_TOL
        assert float(ref["aux"]) * AUX_COEF > 100 * LOSS_TOL
        result.loss.backward()
        router = next(n for n, _ in model.named_parameters() if n.endswith("layers.0.mlp.gate.weight"))
        plain = dict(model.named_parameters())[router].grad
        key = next(k for k in ref["grads"] if k.startswith("model.layers.0.") and k.endswith(".gate.weight")
                   and "experts" not in k and "shared" not in k)
        assert (plain - ref["grads"][key]).abs().max() > 100 * HF_GRAD_TOL, name


def test_a_rank_whose_experts_go_unused_still_trains(refs):
    """Every token routed to experts 0 and 1 (EP rank 0's): EP rank 1 computes nothing, yet both
    ranks run the same backward all-to-alls (no deadlock) and the gradients equal ep = 1's under the
    same routing; the unused experts' gradients are zero."""
    from moe_cases import run_collapsed_grads

    ids, targets, models = refs
    directory = models["mixtral"]["dir"]
    ref_loss, ref_pieces = run_collapsed_grads(0, 1, {}, directory, ids, targets)
    ref = assemble([ref_pieces])
    by_rank = run_ranks(run_collapsed_grads, 2, args=({"ep": 2}, directory, ids, targets), timeout_s=120)
    grads = assemble([pieces for _, pieces in by_rank])
    assert all(abs(float(loss - ref_loss)) <= LOSS_TOL for loss, _ in by_rank)
    assert set(grads) == set(ref)
    for key, g in grads.items():
        assert (g - ref[key]).abs().max() <= EP_GRAD_TOL, key
    assert ref["model.layers.0.block_sparse_moe.experts.3.w1.weight"].abs().max() == 0
    assert ref["model.layers.0.block_sparse_moe.experts.0.w1.weight"].abs().max() > 0
