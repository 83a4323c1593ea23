"""Randomly initialised checkpoints in Hugging Face layout (tests, benchmarks, examples).

`write_random_checkpoint(dir, spec, seed=...)` writes `config.json` and safetensors with the
exact tensor names and orientations that `transformers` uses, so the directory loads both
here and in `transformers`. Tensors are generated one at a time from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from shardwright.config import ModelSpec
from shardwright.models.checkpoint import save_checkpoint
from shardwright.models.decoder import TORCH_DTYPES
from shardwright.models.tokenizer import write_default_chat_template


def hf_config_from_spec(spec: ModelSpec) -> dict:
    """The Hugging Face `config.json` dict describing `spec`."""
    common = {"vocab_size": spec.vocab_size, "tie_word_embeddings": spec.tie_word_embeddings,
              "bos_token_id": spec.bos_token_id, "dtype": spec.dtype,
              "eos_token_id": spec.eos_token_id[0] if len(spec.eos_token_id) == 1 else (spec.eos_token_id or None)}
    if spec.architecture == "gpt2":
        return {**common, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                "n_embd": spec.hidden_size, "n_layer": spec.num_layers, "n_head": spec.num_heads,
                "n_inner": spec.intermediate_size, "n_positions": spec.max_position_embeddings,
                "layer_norm_epsilon": spec.norm_eps, "activation_function": spec.activation}
    rope = {"rope_type": "default", "rope_theta": spec.rope_theta}
    if spec.rope_scaling is not None:
        rope.update(spec.rope_scaling.model_dump())
    model_type, cls = _llama_family(spec)
    family = {}
    if model_type == "gemma2":
        family.update(_gemma2_config(spec))
    if spec.num_experts:
        family.update(router_aux_loss_coef=spec.router_aux_loss_coef, output_router_logits=spec.router_aux_loss_coef > 0)
    if model_type == "mixtral":
        family.update(num_local_experts=spec.num_experts, num_experts_per_tok=spec.experts_per_token,
                      sliding_window=spec.sliding_window, router_jitter_noise=0.0)
    if model_type == "qwen2_moe":
        dense = spec.dense_layers or []
        family.update(num_experts=spec.num_experts, num_experts_per_tok=spec.experts_per_token,
                      moe_intermediate_size=spec.expert_size, norm_topk_prob=spec.moe_renormalize,
                      shared_expert_intermediate_size=spec.shared_expert_intermediate_size,
                      mlp_only_layers=dense, decoder_sparse_step=1, qkv_bias=spec.qkv_bias)
    if model_type in ("qwen2", "qwen3", "mistral", "qwen2_moe"):
        family["sliding_window"] = spec.sliding_window
    if model_type in ("qwen2", "qwen3", "qwen2_moe"):
        windowed = set(range(spec.num_layers)) if spec.sliding_window_layers is None else set(spec.sliding_window_layers)
        family["use_sliding_window"] = spec.sliding_window is not None
        family["layer_types"] = ["sliding_attention" if spec.window_of(i) else "full_attention"
                                 for i in range(spec.num_layers)]
        family["max_window_layers"] = min(windowed, default=spec.num_layers)
    return {**common, **family, "model_type": model_type, "architectures": [cls],
            "hidden_size": spec.hidden_size, "intermediate_size": spec.intermediate_size,
            "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
            "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
            "max_position_embeddings": spec.max_position_embeddings, "rms_norm_eps": spec.norm_eps,
            "rope_theta": spec.rope_theta, "rope_parameters": rope, "hidden_act": spec.activation,
            "attention_bias": spec.attention_bias, "mlp_bias": spec.mlp_bias}


GEMMA2_FIELDS = ("norm_unit_offset", "post_norms", "embedding_multiplier", "query_pre_attn_scalar",
                 "attn_logit_softcap", "final_logit_softcap")


def _gemma2_config(spec: ModelSpec) -> dict:
    """The Gemma2Config keys of a spec with Gemma 2's features (all of them: transformers has no
    switch for each)."""
    if not (spec.norm_unit_offset and spec.post_norms) or spec.activation != "gelu_pytorch_tanh" \
            or spec.embedding_multiplier != float(spec.hidden_size) ** 0.5:
        raise ValueError("a Gemma 2 config.json needs norm_unit_offset, post_norms, activation gelu_pytorch_tanh "
                         "and embedding_multiplier = sqrt(hidden_size) together")
    if spec.qkv_bias or spec.qk_norm or spec.mlp_bias:
        raise ValueError("qkv_bias, qk_norm and mlp_bias cannot be expressed in a gemma2 config.json")
    scalar = spec.query_pre_attn_scalar or spec.head_dim
    if float(scalar).is_integer():  # transformers types it int
        scalar = int(scalar)
    return {"hidden_activation": spec.activation, "sliding_window": spec.sliding_window,
            "layer_types": ["sliding_attention" if spec.window_of(i) else "full_attention"
                            for i in range(spec.num_layers)],
            "query_pre_attn_scalar": scalar,
            "attn_logit_softcapping": spec.attn_logit_softcap,
            "final_logit_softcapping": spec.final_logit_softcap}


def _llama_family(spec: ModelSpec) -> tuple[str, str]:
    """The transformers model_type and class that compute what a 'llama' spec computes."""
    if any(getattr(spec, name) for name in GEMMA2_FIELDS):
        return "gemma2", "Gemma2ForCausalLM"
    if spec.num_experts:
        if spec.qk_norm or spec.attention_bias:
            raise ValueError("qk_norm and attention_bias cannot be expressed in a mixtral or qwen2_moe config.json")
        if spec.shared_expert_intermediate_size:
            return "qwen2_moe", "Qwen2MoeForCausalLM"
        if spec.qkv_bias or spec.dense_layers or not spec.moe_renormalize or spec.moe_intermediate_size not in \
                (None, spec.intermediate_size) or spec.sliding_window_layers is not None:
            raise ValueError("an MoE spec without a shared expert is written as Mixtral, which has no qkv_bias, "
                             "dense_layers, per-layer windows, unnormalised routing or separate expert width")
        return "mixtral", "MixtralForCausalLM"
    if spec.qk_norm:
        family = ("qwen3", "Qwen3ForCausalLM")
    elif spec.qkv_bias:
        family = ("qwen2", "Qwen2ForCausalLM")
    elif spec.sliding_window is not None:
        family = ("mistral", "MistralForCausalLM")
    else:
        return "llama", "LlamaForCausalLM"
    if spec.qkv_bias and (spec.qk_norm or spec.attention_bias):
        raise ValueError("qkv_bias with qk_norm or attention_bias has no transformers equivalent to export to")
    if spec.mlp_bias or (family[0] == "mistral" and spec.attention_bias):
        raise ValueError(f"mlp_bias/attention_bias cannot be expressed in a {family[0]} config.json")
    if family[0] == "mistral" and spec.sliding_window_layers is not None:
        raise ValueError("per-layer sliding windows cannot be expressed in a mistral config.json")
    return family


def _moe_shapes(spec: ModelSpec, p: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    """One MoE layer's tensors: Qwen2-MoE names with a shared expert, Mixtral's without (weights.py)."""
    h, w = spec.hidden_size, spec.expert_size
    if spec.shared_expert_intermediate_size:
        root, names = f"{p}.mlp", ("gate_proj", "up_proj", "down_proj")
    else:
        root, names = f"{p}.block_sparse_moe", ("w1", "w3", "w2")
    yield f"{root}.gate.weight", (spec.num_experts, h)
    experts = [(f"{root}.experts.{e}", w) for e in range(spec.num_experts)]
    if spec.shared_expert_intermediate_size:
        experts.append((f"{root}.shared_expert", spec.shared_expert_intermediate_size))
    for name, width in experts:
        yield f"{name}.{names[0]}.weight", (width, h)
        yield f"{name}.{names[1]}.weight", (width, h)
        yield f"{name}.{names[2]}.weight", (h, width)
    if spec.shared_expert_intermediate_size:
        yield f"{root}.shared_expert_gate.weight", (1, h)


def _shapes(spec: ModelSpec) -> Iterator[tuple[str, tuple[int, ...]]]:
    h, f, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    if spec.architecture == "llama":
        yield "model.embed_tokens.weight", (v, h)
        for i in range(spec.num_layers):
            p = f"model.layers.{i}"
            yield f"{p}.input_layernorm.weight", (h,)
            for name, rows in (("q", q), ("k", kv), ("v", kv)):
                yield f"{p}.self_attn.{name}_proj.weight", (rows, h)
                if spec.attention_bias or spec.qkv_bias:
                    yield f"{p}.self_attn.{name}_proj.bias", (rows,)
            yield f"{p}.self_attn.o_proj.weight", (h, q)
            if spec.attention_bias:
                yield f"{p}.self_attn.o_proj.bias", (h,)
            if spec.qk_norm:
                yield f"{p}.self_attn.q_norm.weight", (spec.head_dim,)
                yield f"{p}.self_attn.k_norm.weight", (spec.head_dim,)
            yield f"{p}.post_attention_layernorm.weight", (h,)
            if spec.post_norms:
                yield f"{p}.pre_feedforward_layernorm.weight", (h,)
                yield f"{p}.post_feedforward_layernorm.weight", (h,)
            if spec.is_moe_layer(i):
                yield from _moe_shapes(spec, p)
            else:
                yield f"{p}.mlp.gate_proj.weight", (f, h)
                yield f"{p}.mlp.up_proj.weight", (f, h)
                yield f"{p}.mlp.down_proj.weight", (h, f)
        yield "model.norm.weight", (h,)
        if not spec.tie_word_embeddings:
            yield "lm_head.weight", (v, h)
        return
    yield "transformer.wte.weight", (v, h)
    yield "transformer.wpe.weight", (spec.max_position_embeddings, h)
    for i in range(spec.num_layers):
        p = f"transformer.h.{i}"
        yield from ((f"{p}.ln_1.weight", (h,)), (f"{p}.ln_1.bias", (h,)))
        yield from ((f"{p}.attn.c_attn.weight", (h, 3 * h)), (f"{p}.attn.c_attn.bias", (3 * h,)))
        yield from ((f"{p}.attn.c_proj.weight", (h, h)), (f"{p}.attn.c_proj.bias", (h,)))
        yield from ((f"{p}.ln_2.weight", (h,)), (f"{p}.ln_2.bias", (h,)))
        yield from ((f"{p}.mlp.c_fc.weight", (h, f)), (f"{p}.mlp.c_fc.bias", (f,)))
        yield from ((f"{p}.mlp.c_proj.weight", (f, h)), (f"{p}.mlp.c_proj.bias", (h,)))
    yield from (("transformer.ln_f.weight", (h,)), ("transformer.ln_f.bias", (h,)))


def random_hf_tensors(spec: ModelSpec, seed: int = 0, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Seeded random weights with Hugging Face names: N(0, std) matrices, norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    dtype = TORCH_DTYPES[spec.dtype]
    out = {}
    for name, shape in _shapes(spec):
        t = torch.randn(shape, generator=gen) * std
        if "norm" in name or "ln_" in name:
            t = (1.0 + t) if name.endswith("weight") else t
        out[name] = t.to(dtype)
    return out


def write_random_checkpoint(directory: str | Path, spec: ModelSpec, *, seed: int = 0,
                            num_shards: int = 1, std: float = 0.02) -> Path:
    """Write a random model of shape `spec` to `directory` in Hugging Face layout (with the
    default chat template)."""
    save_checkpoint(directory, random_hf_tensors(spec, seed, std), hf_config_from_spec(spec),
                    num_shards=num_shards)
    write_default_chat_template(directory)
    return Path(directory)
