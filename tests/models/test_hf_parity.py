"""Checkpoints saved by `transformers` load into Shardwright and reproduce its logits and tokens.

A randomly initialised LlamaForCausalLM (GQA, llama3 RoPE scaling, sharded safetensors) and a
GPT2LMHeadModel are saved with save_pretrained, loaded at tp = 1 (in process) and tp = 2 (two
gloo ranks), and compared on logits and on 32 greedy tokens.
"""

from __future__ import annotations

import pytest
import torch

import tp_cases
from shardwright.parallel.launch import run_ranks

transformers = pytest.importorskip("transformers", reason="transformers is the test-only reference")

# Different but equivalent fp32 kernels (fused qkv, SDPA vs eager): ~1e-6 seen; bound 1e-4.
LOGIT_TOL = 1e-4
NEW_TOKENS = 32


def _llama():
    cfg = transformers.LlamaConfig(
        vocab_size=211, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        initializer_range=0.3, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 32},
    )
    return transformers.LlamaForCausalLM(cfg)


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=211, n_embd=64, n_layer=3, n_head=4, n_positions=256,
                                  initializer_range=0.3, bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    torch.manual_seed(7)
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name, make in (("llama", _llama), ("gpt2", _gpt2)):
        model = make().eval()
        # A small shard size makes save_pretrained write model.safetensors.index.json.
        model.save_pretrained(root / name, max_shard_size="100KB" if name == "llama" else "1GB")
        prompt = torch.randint(0, 211, (1, 12), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            logits = model(prompt).logits[0]
            # No eos id: generate() then neither stops early nor suppresses any token.
            tokens = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
        out[name] = (str(root / name), prompt[0].tolist(), logits, tokens)
    return out


def test_llama_checkpoint_is_sharded(hf_models):
    from pathlib import Path

    assert (Path(hf_models["llama"][0]) / "model.safetensors.index.json").is_file()


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
