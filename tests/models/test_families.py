"""Qwen2 / Qwen2.5, Qwen3, Mistral, Phi-3, Gemma 2, Mixtral and Qwen2-MoE checkpoints saved by `transformers` reproduce its logits,
greedy tokens and gradients here: at tp = 1 (in process) and tp = 2 (two gloo ranks), over the
paged serving path, and through the Ray engine (Mistral also at tp = 2 and pp = 2).

Each reference is a tiny randomly initialised transformers model (2 layers, hidden 64, 4 heads,
2 kv heads) written with save_pretrained. Biases and norm weights, which transformers initialises
to 0 and 1, are randomised too, so that loading them is tested. Mistral's sliding window (8) is
shorter than its prompt (12) plus continuation, so it is exercised in prefill, in KV-cache decode
and in the paged serving path. Gemma 2 (eager attention in transformers: its SDPA path ignores the
soft-cap) gets soft-caps small enough to bend the logits without saturating them (attention 5, final
10: |logits| stay below 9.3 of 10), a query scale of its own (24 != head_dim 16) and its alternating
window (layer 0 windowed, layer 1 full).
"""

from __future__ import annotations

import json

import pytest
import torch

import tp_cases
from model_helpers import paged_greedy
from shardwright.config import ModelSpec
from shardwright.models import build_model, load_model
from shardwright.models.checkpoint import CheckpointReader
from shardwright.models.weights import load_weights
from shardwright.parallel.context import ParallelContext
from shardwright.parallel.launch import run_ranks

transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")

# Different but equivalent fp32 kernels (fused qkv, SDPA with masks vs transformers' paths): ~1e-6
# seen; bound 1e-4.
LOGIT_TOL = 1e-4
NEW_TOKENS = 24
VOCAB = 256
WINDOW = 8
PROMPT_LEN = 12
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              initializer_range=0.3, bos_token_id=None, eos_token_id=None)


def _qwen2():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=False))


def _qwen2_tied():
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**COMMON, tie_word_embeddings=True))


def _qwen3():
    # head_dim 32 != hidden / heads = 16: q/k/v/o shapes follow head_dim, not the hidden size.
    cfg = transformers.Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False)
    return transformers.Qwen3ForCausalLM(cfg)


def _mistral():
    cfg = transformers.MistralConfig(**COMMON, sliding_window=WINDOW, tie_word_embeddings=False)
    return transformers.MistralForCausalLM(cfg)


def _phi3():
    # fused qkv_proj (q 64 + k 32 + v 32 rows) and gate_up_proj, split per TP rank when loading
    cfg = transformers.Phi3Config(**COMMON, tie_word_embeddings=False, pad_token_id=0)
    return transformers.Phi3ForCausalLM(cfg)


def _gemma2():
    cfg = transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=10.0, pad_token_id=0,
                                    tie_word_embeddings=False)
    model = transformers.Gemma2ForCausalLM(cfg)
    assert model.config._attn_implementation == "eager", "transformers' Gemma 2 reference must soft-cap"
    return model


def _mixtral():
    # 4 experts, top 2 renormalised; the experts' width is intermediate_size
    cfg = transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    return transformers.MixtralForCausalLM(cfg)


def _qwen2_moe():
    # 4 experts of width 32, top 2 not renormalised, a shared expert of width 48 behind a sigmoid gate;
    # layer 1 keeps a dense MLP (mlp_only_layers)
    cfg = transformers.Qwen2MoeConfig(**COMMON, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=48, mlp_only_layers=[1],
                                      tie_word_embeddings=False)
    return transformers.Qwen2MoeForCausalLM(cfg)


FAMILIES = {"qwen2": _qwen2, "qwen2_tied": _qwen2_tied, "qwen3": _qwen3, "mistral": _mistral, "phi3": _phi3,
            "gemma2": _gemma2, "mixtral": _mixtral, "qwen2_moe": _qwen2_moe}
MOE = ("mixtral", "qwen2_moe")


def _randomise_biases_and_norms(model) -> None:
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.2)


def _hf_greedy(model, prompt: list[int], n: int = NEW_TOKENS) -> list[int]:
    """transformers' greedy generate. No eos id: it neither stops early nor suppresses a token;
    an explicit attention mask, or it would mask prompt tokens equal to the pad id."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    torch.manual_seed(7)
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name, make in FAMILIES.items():
        model = make().eval()
        _randomise_biases_and_norms(model)
        model.save_pretrained(root / name)
        prompt = torch.randint(0, VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            logits = model(prompt).logits[0]
            tokens = _hf_greedy(model, prompt[0].tolist())
        out[name] = (str(root / name), prompt[0].tolist(), logits, tokens)
    return out


def test_configs_parse_to_the_family_features(hf_models):
    specs = {n: ModelSpec.from_hf_dir(hf_models[n][0]) for n in hf_models}
    assert specs["qwen2"].qkv_bias and not specs["qwen2"].attention_bias and not specs["qwen2"].qk_norm
    assert specs["qwen2_tied"].tie_word_embeddings and not specs["qwen2"].tie_word_embeddings
    assert specs["qwen3"].qk_norm and specs["qwen3"].head_dim == 32 and not specs["qwen3"].qkv_bias
    assert specs["mistral"].window_of(0) == specs["mistral"].window_of(1) == WINDOW
    assert all(specs[n].sliding_window is None for n in ("qwen2", "qwen2_tied", "qwen3", "phi3"))
    assert not (specs["phi3"].qkv_bias or specs["phi3"].attention_bias or specs["phi3"].qk_norm)
    gemma = specs["gemma2"]
    assert gemma.norm_unit_offset and gemma.post_norms and not gemma.tie_word_embeddings
    assert (gemma.window_of(0), gemma.window_of(1)) == (WINDOW, None)
    assert gemma.embedding_multiplier == 8.0 and gemma.query_pre_attn_scalar == 24
    assert (gemma.attn_logit_softcap, gemma.final_logit_softcap) == (5.0, 10.0)
    assert gemma.activation == "gelu_pytorch_tanh"
    assert not any(getattr(specs[n], f) for n in specs if n != "gemma2"
                   for f in ("norm_unit_offset", "post_norms", "embedding_multiplier", "attn_logit_softcap"))
    mixtral, qwen_moe = specs["mixtral"], specs["qwen2_moe"]
    assert (mixtral.num_experts, mixtral.experts_per_token, mixtral.expert_size) == (4, 2, 96)
    assert mixtral.moe_renormalize and not mixtral.shared_expert_intermediate_size and not mixtral.qkv_bias
    assert (qwen_moe.expert_size, qwen_moe.shared_expert_intermediate_size, qwen_moe.dense_layers) == (32, 48, [1])
    assert not qwen_moe.moe_renormalize and qwen_moe.qkv_bias
    assert [qwen_moe.is_moe_layer(i) for i in range(2)] == [True, False]
    assert not any(specs[n].num_experts for n in specs if n not in MOE)


@pytest.mark.parametrize("tp", [1, 2])
def test_logits_and_greedy_tokens_match_transformers(hf_models, tp):
    names = list(hf_models)
    cases = [(hf_models[n][0], hf_models[n][1], NEW_TOKENS) for n in names]
    if tp == 1:
        by_rank = [tp_cases.run_greedy(0, 1, cases)]
    else:
        by_rank = run_ranks(tp_cases.run_greedy, tp, args=(cases,))
    for i, name in enumerate(names):
        _, _, ref_logits, ref_tokens = hf_models[name]
        assert len(set(ref_tokens)) > 3, "reference continuation too repetitive to be a test"
        for logits, tokens in (r[i] for r in by_rank):
            err = (logits[0] - ref_logits).abs().max()
            assert err <= LOGIT_TOL, f"{name} tp={tp}: logits differ by {err}"
            assert tokens == ref_tokens, f"{name} tp={tp}: greedy tokens differ"


def test_mistral_window_changes_the_logits(hf_models):
    """The parity test above can fail: without the window the same weights give other logits."""
    directory, prompt, ref_logits, _ = hf_models["mistral"]
    spec = ModelSpec.from_hf_dir(directory).model_copy(update={"sliding_window": None})
    model = build_model(spec, ParallelContext.single("cpu"))
    with CheckpointReader(directory) as reader:
        load_weights(model, reader)
    with torch.no_grad():
        logits = model.full_logits(model(torch.tensor([prompt]), torch.arange(len(prompt))[None]))
    assert (logits[0] - ref_logits).abs().max() > 100 * LOGIT_TOL


@pytest.mark.parametrize("feature", ["attn_logit_softcap", "final_logit_softcap", "sliding_window",
                                     "query_pre_attn_scalar", "embedding_multiplier", "norm_unit_offset",
                                     "post_norms"])
def test_each_gemma2_feature_changes_the_logits(hf_models, feature):
    """The Gemma 2 parity can fail: without any one of its features the same weights give other logits
    (a feature the reference never exercised would pass unnoticed). Without post_norms the checkpoint's
    extra norms have no home, so that one loads with strict=False semantics by hand: it is built and
    loaded from a spec that keeps them, then they are switched off."""
    directory, prompt, ref_logits, _ = hf_models["gemma2"]
    spec = ModelSpec.from_hf_dir(directory)
    update = {"sliding_window": None, "sliding_window_layers": None} if feature == "sliding_window" else \
        {feature: False if feature in ("norm_unit_offset", "post_norms") else None}
    model = build_model(spec, ParallelContext.single("cpu"))
    with CheckpointReader(directory) as reader:
        load_weights(model, reader)
    if feature == "post_norms":
        for block in model.blocks:
            block.attn_post_norm = block.mlp_post_norm = None
    else:
        changed = build_model(spec.model_copy(update=update), ParallelContext.single("cpu"))
        changed.load_state_dict(model.state_dict())
        model = changed
    with torch.no_grad():
        logits = model.full_logits(model(torch.tensor([prompt]), torch.arange(len(prompt))[None]))
    assert (logits[0] - ref_logits).abs().max() > 100 * LOGIT_TOL, f"{feature} is not exercised"


@pytest.mark.parametrize("name", MOE)
def test_moe_routing_uses_every_expert_and_the_shared_one_matters(hf_models, name):
    """The MoE parity can fail: the prompt's tokens reach every expert of every MoE layer (so each
    expert's weights are read and used), routing to one fixed expert instead changes the logits, and
    (Qwen2-MoE) so does dropping the shared expert."""
    from shardwright.models.blocks import MoEMLP

    directory, prompt, ref_logits, _ = hf_models[name]
    _, model = load_model(directory, ParallelContext.single("cpu"))
    chosen = []
    hooks = [block.mlp.register_forward_pre_hook(lambda m, args: chosen.append(m.route(args[0].reshape(-1, 64))[1]))
             for block in model.blocks if isinstance(block.mlp, MoEMLP)]
    ids, positions = torch.tensor([prompt]), torch.arange(len(prompt))[None]
    with torch.no_grad():
        model(ids, positions)
    for h in hooks:
        h.remove()
    assert chosen and all(set(c.reshape(-1).tolist()) == set(range(4)) for c in chosen), "an expert went unused"
    moes = [b.mlp for b in model.blocks if isinstance(b.mlp, MoEMLP)]
    for moe in moes:
        moe.route = lambda x, k=moe.top_k: (torch.full((x.shape[0], k), 1.0 / k),
                                            torch.arange(k).expand(x.shape[0], k))
    with torch.no_grad():
        fixed = model.full_logits(model(ids, positions))
    assert (fixed[0] - ref_logits).abs().max() > 100 * LOGIT_TOL
    if name == "qwen2_moe":
        _, model = load_model(directory, ParallelContext.single("cpu"))
        for block in model.blocks:
            if isinstance(block.mlp, MoEMLP):
                block.mlp.shared = None
        with torch.no_grad():
            unshared = model.full_logits(model(ids, positions))
        assert (unshared[0] - ref_logits).abs().max() > 100 * LOGIT_TOL


def test_moe_configs_refused_naming_the_key(hf_models):
    with open(f"{hf_models['mixtral'][0]}/config.json") as f:
        config = json.load(f)
    with pytest.raises(ValueError, match="router_jitter_noise"):
        ModelSpec.from_hf_config({**config, "router_jitter_noise": 0.1})
    with pytest.raises(ValueError, match="experts_per_token=5 must be in 1..num_experts=4"):
        ModelSpec.from_hf_config({**config, "num_experts_per_tok": 5})
    from shardwright.config import ParallelLayout

    spec = ModelSpec.from_hf_dir(hf_models["qwen2_moe"][0])
    with pytest.raises(ValueError, match="tp=3 does not divide moe_intermediate_size=32"):
        ParallelLayout(tp=3).validate_for(spec.model_copy(update={"num_heads": 6, "num_kv_heads": 3,
                                                                   "intermediate_size": 96}))


def test_gemma2_softcap_refused_with_context_parallelism(hf_models):
    from shardwright.config import ParallelLayout
    from shardwright.models import spec_layout_check
    from shardwright.training.sharding import shard_context

    spec = ModelSpec.from_hf_dir(hf_models["gemma2"][0]).model_copy(
        update={"sliding_window": None, "sliding_window_layers": None})
    with pytest.raises(ValueError, match="attn_logit_softcap=5.0 is not supported with cp=2"):
        spec_layout_check(spec, shard_context(ParallelLayout(cp=2), tp_rank=0, pp_rank=0))




@pytest.mark.parametrize("name", ["mistral", "qwen3", "gemma2", "mixtral", "qwen2_moe"])
def test_paged_serving_path_matches_transformers(hf_models, name):
    """The engine's packed path (forward_packed over a paged cache): a 5-token chunked prefill
    over cached context, then batched decode, with two sequences of different lengths; Mistral's
    window is passed by both the prefill chunks and the decode rows."""
    directory, prompt, _, ref_tokens = hf_models[name]
    _, model = load_model(directory, ParallelContext.single("cpu"))
    short = prompt[:5]
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        ref_short = _hf_greedy(hf, short)
    got, _ = paged_greedy(model, [prompt, short], NEW_TOKENS, chunk=5)
    assert got == [ref_tokens, ref_short]


def test_phi3_long_context_rope_is_refused_naming_it(hf_models):
    with open(f"{hf_models['phi3'][0]}/config.json") as f:
        config = json.load(f)
    config.pop("rope_parameters", None)
    config["rope_scaling"] = {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    with pytest.raises(ValueError, match="longrope"):
        ModelSpec.from_hf_config(config)


def test_unknown_architecture_is_refused_listing_the_supported(hf_models):
    with open(f"{hf_models['qwen2'][0]}/config.json") as f:
        config = json.load(f)
    config["architectures"] = ["DbrxForCausalLM"]
    config["model_type"] = "dbrx"
    with pytest.raises(ValueError, match="Qwen3ForCausalLM") as err:
        ModelSpec.from_hf_config(config)
    assert "\n" not in str(err.value) and "MistralForCausalLM" in str(err.value)
    config["architectures"] = ["Qwen2ForCausalLM"]
    with pytest.raises(ValueError, match="model_type='dbrx'.*qwen3"):
        ModelSpec.from_hf_config(config)


# fp32 gradients through different kernels (fused qkv, SDPA backward vs transformers'); ~1e-6 seen.
GRAD_TOL = 1e-4


@pytest.fixture(scope="module")
def hf_grads(hf_models):
    """transformers' loss and every parameter gradient on one batch of 24 tokens (> the window)."""
    rng = torch.Generator().manual_seed(5)
    ids = torch.randint(0, VOCAB, (2, 24), generator=rng)
    targets = torch.randint(0, VOCAB, (2, 24), generator=rng)
    targets[0, :3] = -100
    out = {}
    for name in ("qwen2_tied", "qwen3", "mistral", "gemma2", *MOE):
        model = transformers.AutoModelForCausalLM.from_pretrained(hf_models[name][0]).float()
        logits = model(ids).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
        loss.backward()
        grads = {}
        for n, p in model.named_parameters():
            grads.update(_checkpoint_named(n, p.grad.clone(), name))
        out[name] = (loss.detach(), grads)
    return ids, targets, out


def _checkpoint_named(name: str, grad: torch.Tensor, family: str) -> dict[str, torch.Tensor]:
    """transformers 5 holds a layer's experts fused ([experts, 2 * width, hidden] gate then up, and
    [experts, hidden, width] down) but saves them one tensor per expert: the gradient under the
    checkpoint's names, which are the ones this runtime's gradients are assembled under."""
    if family not in MOE or ".mlp.gate." not in name and ".mlp.experts." not in name:
        return {name: grad}
    root = name.split(".mlp.")[0] + (".block_sparse_moe" if family == "mixtral" else ".mlp")
    gate, up, down = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    if name.endswith(".mlp.gate.weight"):
        return {f"{root}.gate.weight": grad}
    if name.endswith("gate_up_proj"):
        width = grad.shape[1] // 2
        return {**{f"{root}.experts.{e}.{gate}.weight": g[:width] for e, g in enumerate(grad)},
                **{f"{root}.experts.{e}.{up}.weight": g[width:] for e, g in enumerate(grad)}}
    return {f"{root}.experts.{e}.{down}.weight": g for e, g in enumerate(grad)}


def test_gradients_at_tp2_match_transformers(hf_models, hf_grads):
    """Trainable: the loss and every gradient at tp = 2 (replicated q/k norm weights summed over
    TP; Qwen2's qkv biases split with their heads) equal transformers' backward."""
    from test_tensor_parallel import assemble

    ids, targets, ref = hf_grads
    names = list(ref)
    by_rank = run_ranks(tp_cases.run_logits_grads, 2, args=([(hf_models[n][0], ids, targets) for n in names],))
    for i, name in enumerate(names):
        ref_loss, ref_grads = ref[name]
        assert abs(float(by_rank[0][i][1] - ref_loss)) <= LOGIT_TOL, f"{name} loss"
        grads = assemble([r[i][2] for r in by_rank])
        assert set(grads) == set(ref_grads), name
        for key, g in grads.items():
            assert ref_grads[key].abs().max() > 0, f"{name}: reference gradient of {key} is zero"
            err = (g - ref_grads[key]).abs().max()
            assert err <= GRAD_TOL, f"{name} grad {key} differs by {err}"


def test_random_checkpoints_of_each_family_load_in_transformers(tmp_path):
    """random_init (and the training export, which shares hf_config_from_spec) writes a
    config.json that transformers reads as the same family, with equal logits."""
    from shardwright.models.random_init import write_random_checkpoint

    base = dict(architecture="llama", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=256, norm_eps=1e-6)
    specs = {"Qwen2ForCausalLM": dict(qkv_bias=True),
             "Qwen3ForCausalLM": dict(qk_norm=True, head_dim=32, sliding_window=WINDOW, sliding_window_layers=[1]),
             "MistralForCausalLM": dict(sliding_window=WINDOW),
             "Gemma2ForCausalLM": dict(norm_unit_offset=True, post_norms=True, embedding_multiplier=8.0,
                                       query_pre_attn_scalar=24.0, attn_logit_softcap=5.0,
                                       final_logit_softcap=10.0, activation="gelu_pytorch_tanh",
                                       tie_word_embeddings=True, sliding_window=WINDOW,
                                       sliding_window_layers=[0]),
             "MixtralForCausalLM": dict(num_experts=4, experts_per_token=2),
             "Qwen2MoeForCausalLM": dict(num_experts=4, experts_per_token=2, moe_intermediate_size=32,
                                         moe_renormalize=False, shared_expert_intermediate_size=48,
                                         dense_layers=[1], qkv_bias=True)}
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(2))
    for cls, extra in specs.items():
        spec = ModelSpec(**{**base, **extra})
        directory = write_random_checkpoint(tmp_path / cls, spec, seed=3, std=0.2)
        assert ModelSpec.from_hf_dir(directory).model_dump(exclude={"checkpoint_path"}) == spec.model_dump(
            exclude={"checkpoint_path"})
        hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
        assert type(hf).__name__ == cls
        _, model = load_model(directory, ParallelContext.single("cpu"))
        with torch.no_grad():
            err = (model.full_logits(model(ids, torch.arange(20)[None])) - hf(ids).logits).abs().max()
        assert err <= LOGIT_TOL, f"{cls}: logits differ by {err}"


def test_sliding_window_refused_with_context_parallelism(hf_models):
    from shardwright.config import ParallelLayout
    from shardwright.models import spec_layout_check

    from shardwright.training.sharding import shard_context

    spec = ModelSpec.from_hf_dir(hf_models["mistral"][0])
    with pytest.raises(ValueError, match="sliding_window=8 is not supported with cp=2"):
        spec_layout_check(spec, shard_context(ParallelLayout(cp=2), tp_rank=0, pp_rank=0))


@pytest.mark.parametrize("name, tp, pp", [("qwen2", 1, 1), ("qwen2_tied", 1, 1), ("qwen3", 1, 1),
                                          ("mistral", 1, 1), ("mistral", 2, 1), ("mistral", 1, 2),
                                          ("phi3", 2, 1), ("gemma2", 1, 1), ("gemma2", 2, 1),
                                          ("mixtral", 2, 1), ("qwen2_moe", 1, 1), ("qwen2_moe", 2, 1),
                                          ("qwen2_moe", 1, 2)])
def test_engine_greedy_tokens_match_transformers(ray_cluster, hf_models, name, tp, pp):
    """32 greedy tokens through the Ray engine (paged cache, packed steps) equal transformers',
    for the 12-token prompt (longer than Mistral's window) batched with a 3-token one."""
    from shardwright.actors.engine import EngineConfig, InferenceEngine
    from shardwright.serving.sampling import SamplingParams
    from shardwright.config import ParallelLayout

    directory, prompt, _, _ = hf_models[name]
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    prompts = [prompt, prompt[:3]]
    with torch.no_grad():
        refs = [_hf_greedy(hf, p, 32) for p in prompts]
    assert len(set(refs[0])) > 3, "reference continuation too repetitive to be a test"
    cfg = EngineConfig(model_dir=directory, layout=ParallelLayout(tp=tp, pp=pp), block_size=4, num_blocks=64)
    with InferenceEngine(cfg).start() as eng:
        outs = eng.generate(prompts, SamplingParams(max_tokens=32, ignore_eos=True), timeout_s=300)
    assert [o.token_ids for o in outs] == refs, f"{name} at tp={tp} pp={pp}"
