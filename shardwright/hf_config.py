"""Translate a Hugging Face `config.json` into ModelSpec fields.

Supported: Llama, Qwen2 / Qwen2.5, Qwen3, Mistral, Phi-3, Gemma 2 and the mixture-of-experts
Mixtral and Qwen2-MoE (all built as 'llama' blocks, MoE ones with num_experts > 0,
told apart by qkv_bias, qk_norm, sliding_window and Gemma 2's norm_unit_offset, post_norms,
embedding_multiplier, query_pre_attn_scalar and soft-caps; Phi-3's fused qkv_proj and gate_up_proj
are split when the weights load, models/weights.py) and GPT-2.

Both the transformers 4 spelling (`rope_theta`, `rope_scaling`) and the transformers 5 one
(`rope_parameters`) are read. Anything this runtime cannot reproduce exactly is refused with a
message naming the key, rather than silently computing something else.

Part of the configuration layer beside `config.py`: it imports nothing from shardwright and nothing
heavy (no torch), so `ModelSpec.from_hf_dir` works in the CLI and the scheduler without the models.
"""

from __future__ import annotations

from typing import Any

LLAMA_TYPES = {"llama", "qwen2", "qwen3", "mistral", "phi3", "gemma2", "mixtral", "qwen2_moe"}
GPT2_TYPES = {"gpt2"}
# The `architectures` entries (model classes) whose weights and forward this runtime reproduces.
SUPPORTED_CLASSES = {"LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM",
                     "Phi3ForCausalLM", "Gemma2ForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM",
                     "GPT2LMHeadModel"}
_DTYPES = {"float32", "float64", "bfloat16", "float16"}


def spec_fields_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """ModelSpec keyword arguments for the Hugging Face config dict `hf`."""
    model_type = hf.get("model_type")
    unknown = [a for a in hf.get("architectures") or [] if a not in SUPPORTED_CLASSES]
    if unknown:
        raise ValueError(
            f"config.json architectures={unknown} is not supported; supported: {sorted(SUPPORTED_CLASSES)}"
        )
    if model_type in LLAMA_TYPES:
        fields = _llama_fields(hf)
    elif model_type in GPT2_TYPES:
        fields = _gpt2_fields(hf)
    else:
        raise ValueError(
            f"config.json model_type={model_type!r} is not supported; "
            f"supported: {sorted(LLAMA_TYPES | GPT2_TYPES)}"
        )
    fields["dtype"] = _dtype(hf)
    fields["eos_token_id"] = _as_list(hf.get("eos_token_id"))
    fields["bos_token_id"] = hf.get("bos_token_id")
    return fields


def _llama_fields(hf: dict[str, Any]) -> dict[str, Any]:
    heads = hf["num_attention_heads"]
    hidden = hf["hidden_size"]
    theta, scaling = _rope(hf)
    model_type = hf["model_type"]
    if model_type == "gemma2":  # GeGLU: the gate through gelu with the tanh approximation
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu_new"):
            raise ValueError(f"config.json hidden_activation={act!r} is not supported for gemma2; "
                             "supported: gelu_pytorch_tanh")
        act = "gelu_pytorch_tanh"
    else:
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"config.json hidden_act={act!r}: llama blocks support only 'silu'")
    if model_type == "phi3" and (hf.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ValueError(f"config.json partial_rotary_factor={hf['partial_rotary_factor']} is not supported "
                         "for phi3; supported: 1.0")
    window, window_layers = _sliding_window(hf)
    fields = {
        "architecture": "llama",
        "vocab_size": hf["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": hf["intermediate_size"],
        "num_layers": hf["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": hf.get("num_key_value_heads") or heads,
        "head_dim": hf.get("head_dim") or hidden // heads,
        "max_position_embeddings": hf.get("max_position_embeddings", 2048),
        "norm_eps": hf.get("rms_norm_eps", 1e-6),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "tie_word_embeddings": hf.get("tie_word_embeddings", False),
        "attention_bias": False if model_type in ("qwen2", "mistral", "phi3", "mixtral", "qwen2_moe")
        else hf.get("attention_bias", False),
        "qkv_bias": model_type == "qwen2" or (model_type == "qwen2_moe" and hf.get("qkv_bias", True)),
        "qk_norm": model_type == "qwen3",
        "sliding_window": window,
        "sliding_window_layers": window_layers,
        "mlp_bias": hf.get("mlp_bias", False) if model_type == "llama" else False,
        "activation": act,
    }
    if model_type == "gemma2":
        fields.update(_gemma2_fields(hf))
    if model_type in ("mixtral", "qwen2_moe"):
        fields.update(_moe_fields(hf))
    return fields


def _moe_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Mixtral's and Qwen2-MoE's expert layers, as transformers routes them (softmax over all experts,
    top-k, renormalised for Mixtral and for Qwen2-MoE with norm_topk_prob)."""
    if hf.get("router_jitter_noise"):
        raise ValueError(f"config.json router_jitter_noise={hf['router_jitter_noise']} is not supported "
                         "(training would not match transformers'); supported: 0")
    # transformers adds router_aux_loss_coef * aux loss to the training loss only with output_router_logits
    aux = float(hf.get("router_aux_loss_coef") or 0.0) if hf.get("output_router_logits") else 0.0
    if hf["model_type"] == "mixtral":
        return {"num_experts": hf["num_local_experts"], "experts_per_token": hf["num_experts_per_tok"],
                "moe_renormalize": True, "router_aux_loss_coef": aux}
    layers, step = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1)
    experts = hf["num_experts"]
    dense = sorted(i for i in range(layers)
                   if i in (hf.get("mlp_only_layers") or []) or not (experts > 0 and (i + 1) % step == 0))
    return {"num_experts": experts, "experts_per_token": hf["num_experts_per_tok"],
            "moe_intermediate_size": hf["moe_intermediate_size"],
            "moe_renormalize": bool(hf.get("norm_topk_prob", False)),
            "shared_expert_intermediate_size": hf.get("shared_expert_intermediate_size") or 0,
            "dense_layers": dense or None, "router_aux_loss_coef": aux}


def _gemma2_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """Gemma 2's departures from Llama, as transformers' Gemma2ForCausalLM computes them."""
    if hf.get("use_bidirectional_attention"):
        raise ValueError("config.json use_bidirectional_attention=true is not supported for gemma2 (a decoder "
                         "here is causal)")
    return {
        "tie_word_embeddings": hf.get("tie_word_embeddings", True),
        "norm_unit_offset": True,
        "post_norms": True,
        "embedding_multiplier": float(hf["hidden_size"]) ** 0.5,
        "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar", 256)),
        "attn_logit_softcap": hf.get("attn_logit_softcapping"),
        "final_logit_softcap": hf.get("final_logit_softcapping"),
    }


def _sliding_window(hf: dict[str, Any]) -> tuple[int | None, list[int] | None]:
    """(window, windowed layers or None for all) as transformers applies them for this model type."""
    model_type, layers = hf["model_type"], hf["num_hidden_layers"]
    window = hf.get("sliding_window")
    if model_type == "llama" or window is None:
        return None, None
    if model_type in ("qwen2", "qwen3", "qwen2_moe") and not hf.get("use_sliding_window", False):
        return None, None
    types = hf.get("layer_types")
    if types is None and model_type == "gemma2":  # transformers' default: layers 0, 2, 4, ... windowed
        types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
    if types is None and model_type in ("qwen2", "qwen3", "qwen2_moe"):
        first = hf.get("max_window_layers", 28)
        types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    if types is None:
        return int(window), None
    unknown = sorted(set(types) - {"sliding_attention", "full_attention"})
    if unknown:
        raise ValueError(f"config.json layer_types {unknown} are not supported; "
                         "supported: sliding_attention, full_attention")
    windowed = [i for i, t in enumerate(types) if t == "sliding_attention"]
    if not windowed:
        return None, None
    return int(window), None if len(windowed) == layers else windowed


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta", 10000.0)
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if rope_type == "default":
        return theta, None
    if rope_type not in ("linear", "llama3"):
        raise ValueError(
            f"config.json rope type {rope_type!r} is not supported; supported: default, linear, llama3"
            + (" (Phi-3's long-context longrope/su variants are not yet; its 4k models use the default)"
               if rope_type in ("longrope", "su") else "")
        )
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    scaling = {k: params[k] for k in keys if k in params}
    return theta, {"rope_type": rope_type, **scaling}


def _gpt2_fields(hf: dict[str, Any]) -> dict[str, Any]:
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
        if hf.get(key):
            raise ValueError(f"config.json {key}=true is not supported for gpt2")
    if not hf.get("scale_attn_weights", True):
        raise ValueError("config.json scale_attn_weights=false is not supported for gpt2")
    hidden, heads = hf["n_embd"], hf["n_head"]
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu"):
        raise ValueError(f"config.json activation_function={act!r} is not supported for gpt2")
    return {
        "architecture": "gpt2",
        "vocab_size": hf["vocab_size"],
        "hidden_size": hidden,
        "intermediate_size": hf.get("n_inner") or 4 * hidden,
        "num_layers": hf["n_layer"],
        "num_heads": heads,
        "num_kv_heads": heads,
        "head_dim": hidden // heads,
        "max_position_embeddings": hf.get("n_positions", 1024),
        "norm_eps": hf.get("layer_norm_epsilon", 1e-5),
        "tie_word_embeddings": hf.get("tie_word_embeddings", True),
        "attention_bias": True,
        "mlp_bias": True,
        "activation": act,
    }


def _dtype(hf: dict[str, Any]) -> str:
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    return name if name in _DTYPES else "float32"


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [int(value)]
