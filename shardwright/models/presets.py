"""Named model shapes for examples, tests and benchmarks (random weights, Hugging Face layout)."""

from __future__ import annotations

from shardwright.config import ModelSpec

PRESETS: dict[str, dict] = {
    # ~0.8M parameters, byte vocabulary: generates in well under a second on a laptop.
    "tiny-llama": dict(architecture="llama", vocab_size=256, hidden_size=128, intermediate_size=352,
                       num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                       max_position_embeddings=2048, norm_eps=1e-5),
    "tiny-gpt2": dict(architecture="gpt2", vocab_size=256, hidden_size=128, intermediate_size=512,
                      num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32,
                      max_position_embeddings=1024, norm_eps=1e-5, activation="gelu_new",
                      tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    # Mixtral-style mixture of experts (8 experts, top 2, router load-balancing loss 0.01 in training):
    # for trying expert parallelism (layout.ep up to 8).
    "tiny-mixtral": dict(architecture="llama", vocab_size=256, hidden_size=128, intermediate_size=256,
                         num_layers=4, num_heads=4, num_kv_heads=2, head_dim=32,
                         max_position_embeddings=2048, norm_eps=1e-5, num_experts=8, experts_per_token=2,
                         router_aux_loss_coef=0.01),
    # ~110M parameters (Llama-style, 32k vocabulary): the decode benchmark's model.
    "llama-110m": dict(architecture="llama", vocab_size=32000, hidden_size=768, intermediate_size=2048,
                       num_layers=12, num_heads=12, num_kv_heads=4, head_dim=64,
                       max_position_embeddings=2048, norm_eps=1e-5),
}


def preset_spec(name: str) -> ModelSpec:
    """The ModelSpec of preset `name`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelSpec(**PRESETS[name])
