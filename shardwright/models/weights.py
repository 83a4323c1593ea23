"""Where each parameter of a DecoderModel comes from in a Hugging Face checkpoint.

`weight_plan(model)` lists, for every local parameter, the checkpoint slices that make it
(fused parts are concatenated along the output dim). `load_weights` reads them one parameter at
a time, so the peak extra memory is one parameter's slice.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from shardwright.models.checkpoint import CheckpointReader, Read
from shardwright.models.decoder import DecoderModel
from shardwright.models.quant import set_quantized
from shardwright.models.quant_format import QuantSource
from shardwright.parallel.layers import ColumnParallelLinear, RowParallelLinear

LINEARS = (ColumnParallelLinear, RowParallelLinear)

Plan = Iterator[tuple[str, nn.Parameter, list[Read]]]


def _linear(prefix: str, layer: nn.Module, names: list[str], conv1d: bool, offsets: list[int] | None = None) -> Plan:
    """A column-parallel layer whose parts come from `names` (or one fused tensor at `offsets`)."""
    parts = layer.parts
    offsets = offsets or [0] * len(parts)
    names = names if len(names) == len(parts) else names * len(parts)
    yield f"{prefix}.weight", layer.weight, [
        Read(n, out=p, offset=o, conv1d=conv1d) for n, p, o in zip(names, parts, offsets)
    ]
    if layer.bias is not None:
        yield f"{prefix}.bias", layer.bias, [
            Read(n.replace(".weight", ".bias"), out=p, offset=o) for n, p, o in zip(names, parts, offsets)
        ]


def _row(prefix: str, layer: nn.Module, name: str, conv1d: bool) -> Plan:
    yield f"{prefix}.weight", layer.weight, [Read(name, in_=layer.in_range, conv1d=conv1d)]
    if layer.bias is not None:
        yield f"{prefix}.bias", layer.bias, [Read(name.replace(".weight", ".bias"))]


def _norm(prefix: str, norm: nn.Module, name: str) -> Plan:
    yield f"{prefix}.weight", norm.weight, [Read(f"{name}.weight")]
    if getattr(norm, "bias", None) is not None:
        yield f"{prefix}.bias", norm.bias, [Read(f"{name}.bias")]


def _llama_block(i: int, block: nn.Module, layer: int, reader: CheckpointReader, spec) -> Plan:
    hf = f"model.layers.{layer}"
    p = f"blocks.{i}"
    yield from _norm(f"{p}.attn_norm", block.attn_norm, f"{hf}.input_layernorm")
    if reader.has(f"{hf}.self_attn.qkv_proj.weight"):  # Phi-3: q, k and v fused along the output dim
        q_rows, kv_rows = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        yield from _linear(f"{p}.attn.qkv", block.attn.qkv, [f"{hf}.self_attn.qkv_proj.weight"], conv1d=False,
                           offsets=[0, q_rows, q_rows + kv_rows])
    else:
        qkv = [f"{hf}.self_attn.{x}_proj.weight" for x in "qkv"]
        yield from _linear(f"{p}.attn.qkv", block.attn.qkv, qkv, conv1d=False)
    yield from _row(f"{p}.attn.o", block.attn.o, f"{hf}.self_attn.o_proj.weight", conv1d=False)
    if block.attn.q_norm is not None:  # Qwen3: per-head norms, replicated on every TP rank
        yield from _norm(f"{p}.attn.q_norm", block.attn.q_norm, f"{hf}.self_attn.q_norm")
        yield from _norm(f"{p}.attn.k_norm", block.attn.k_norm, f"{hf}.self_attn.k_norm")
    if block.attn_post_norm is not None:  # Gemma 2: post_attention_layernorm is the norm AFTER attention
        yield from _norm(f"{p}.attn_post_norm", block.attn_post_norm, f"{hf}.post_attention_layernorm")
        yield from _norm(f"{p}.mlp_norm", block.mlp_norm, f"{hf}.pre_feedforward_layernorm")
        yield from _norm(f"{p}.mlp_post_norm", block.mlp_post_norm, f"{hf}.post_feedforward_layernorm")
    else:
        yield from _norm(f"{p}.mlp_norm", block.mlp_norm, f"{hf}.post_attention_layernorm")
    if spec.is_moe_layer(layer):
        yield from _moe(f"{p}.mlp", block.mlp, hf, spec)
    elif reader.has(f"{hf}.mlp.gate_up_proj.weight"):  # Phi-3: gate and up fused, gate first
        yield from _linear(f"{p}.mlp.gate_up", block.mlp.gate_up, [f"{hf}.mlp.gate_up_proj.weight"], conv1d=False,
                           offsets=[0, spec.intermediate_size])
        yield from _row(f"{p}.mlp.down", block.mlp.down, f"{hf}.mlp.down_proj.weight", conv1d=False)
    else:
        yield from _gated(f"{p}.mlp", block.mlp, f"{hf}.mlp", ("gate_proj", "up_proj", "down_proj"))


def _gated(prefix: str, mlp: nn.Module, hf: str, names: tuple[str, str, str]) -> Plan:
    """A GatedMLP from separate gate, up and down tensors named `hf`.{gate,up,down}.weight."""
    gate, up, down = (f"{hf}.{n}.weight" for n in names)
    yield from _linear(f"{prefix}.gate_up", mlp.gate_up, [gate, up], conv1d=False)
    yield from _row(f"{prefix}.down", mlp.down, down, conv1d=False)


def _moe(prefix: str, moe: nn.Module, hf: str, spec) -> Plan:
    """Mixtral names its experts block_sparse_moe.experts.E.w1 (gate), w3 (up), w2 (down); Qwen2-MoE
    mlp.experts.E.{gate,up,down}_proj, plus its shared_expert and shared_expert_gate. A model with a
    shared expert is read as Qwen2-MoE, one without as Mixtral (random_init writes them so)."""
    if spec.shared_expert_intermediate_size:
        root, names = f"{hf}.mlp", ("gate_proj", "up_proj", "down_proj")
    else:
        root, names = f"{hf}.block_sparse_moe", ("w1", "w3", "w2")
    yield f"{prefix}.router.weight", moe.router.weight, [Read(f"{root}.gate.weight")]
    for e, expert in moe.experts.items():  # this EP rank's experts, by global index
        yield from _gated(f"{prefix}.experts.{e}", expert, f"{root}.experts.{e}", names)
    if moe.shared is not None:
        yield from _gated(f"{prefix}.shared", moe.shared, f"{root}.shared_expert", names)
        yield f"{prefix}.shared_gate.weight", moe.shared_gate.weight, [Read(f"{root}.shared_expert_gate.weight")]


def _gpt2_block(i: int, block: nn.Module, layer: int, root: str, hidden: int) -> Plan:
    hf = f"{root}h.{layer}"
    p = f"blocks.{i}"
    yield from _norm(f"{p}.attn_norm", block.attn_norm, f"{hf}.ln_1")
    yield from _linear(f"{p}.attn.qkv", block.attn.qkv, [f"{hf}.attn.c_attn.weight"], conv1d=True,
                       offsets=[0, hidden, 2 * hidden])
    yield from _row(f"{p}.attn.o", block.attn.o, f"{hf}.attn.c_proj.weight", conv1d=True)
    yield from _norm(f"{p}.mlp_norm", block.mlp_norm, f"{hf}.ln_2")
    yield from _linear(f"{p}.mlp.fc", block.mlp.fc, [f"{hf}.mlp.c_fc.weight"], conv1d=True)
    yield from _row(f"{p}.mlp.proj", block.mlp.proj, f"{hf}.mlp.c_proj.weight", conv1d=True)


def _names(model: DecoderModel, reader: CheckpointReader) -> dict[str, str]:
    if model.spec.architecture == "llama":
        return {"embed": "model.embed_tokens.weight", "norm": "model.norm", "head": "lm_head.weight"}
    root = "transformer." if reader.has("transformer.wte.weight") else ""
    return {"embed": f"{root}wte.weight", "pos": f"{root}wpe.weight", "norm": f"{root}ln_f",
            "head": "lm_head.weight", "root": root}


def weight_plan(model: DecoderModel, reader: CheckpointReader) -> Plan:
    """Every local parameter of `model` with the checkpoint reads that produce it."""
    names = _names(model, reader)
    if model.embed is not None:
        yield "embed.weight", model.embed.weight, [Read(names["embed"], out=model.vocab_rows)]
    if model.pos_embed is not None:
        yield "pos_embed.weight", model.pos_embed.weight, [Read(names["pos"])]
    for i, (layer, block) in enumerate(zip(model.layer_ids, model.blocks)):
        if model.spec.architecture == "llama":
            yield from _llama_block(i, block, layer, reader, model.spec)
        else:
            yield from _gpt2_block(i, block, layer, names["root"], model.spec.hidden_size)
    if model.norm is not None:
        yield from _norm("norm", model.norm, names["norm"])
    if model.lm_head is not None:
        head = names["head"]
        if model.spec.tie_word_embeddings or not reader.has(head):
            head = names["embed"]
        yield "lm_head.weight", model.lm_head.weight, [Read(head, out=model.vocab_rows)]


@torch.no_grad()
def load_weights(model: DecoderModel, reader: CheckpointReader, skipped: set[int] = frozenset(),
                 quant: QuantSource | None = None) -> None:
    """Fill every parameter of `model` from `reader`, slice by slice; check every shape.

    Parameters whose ids are in `skipped` (models.pooled_params: pooled blocks and experts) are
    left as they are (on the meta device: their weights are pooled elsewhere). With `quant`, the weights of the column- and
    row-parallel linears become QuantizedWeights (models.quant_format).
    """
    seen = set()
    modules = dict(model.named_modules())
    for name, param, reads in weight_plan(model, reader):
        if id(param) in skipped:
            seen.add(id(param))
            continue
        module = modules[name.rpartition(".")[0]]
        if quant is not None and name.endswith(".weight") and isinstance(module, LINEARS) \
                and quant.is_quantized(reads[0].name):
            qw = quant.weight(name, reads, param.device)
            if qw.shape != tuple(param.shape):
                raise ValueError(f"checkpoint gives {name} shape {qw.shape} (from {reads[0].name}), "
                                 f"the model expects {tuple(param.shape)}: config.json and weights disagree")
            set_quantized(module, qw)
            seen.add(id(param))
            continue
        parts = [reader.read(r) for r in reads]
        value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"checkpoint gives {name} shape {tuple(value.shape)} (from {reads[0].name}), "
                f"the model expects {tuple(param.shape)}: config.json and weights disagree"
            )
        param.copy_(value)
        seen.add(id(param))
    missing = [n for n, p in model.named_parameters() if id(p) not in seen]  # quantized ones are gone
    if missing:
        raise RuntimeError(f"no checkpoint source for parameters {missing}")
