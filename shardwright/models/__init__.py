"""Decoder architectures built from tensor-parallel layers, and Hugging Face checkpoint loading.

    spec, model = load_model("path/to/hf_dir", ctx)      # this rank's shard, read slice-wise

Nothing here imports Ray, gRPC or Redis.
"""

from __future__ import annotations

from pathlib import Path

import torch

from shardwright.config import DType, ModelSpec
from shardwright.models.checkpoint import CheckpointReader
from shardwright.models.decoder import DecoderModel
from shardwright.models.quant import QuantMethod, check_method
from shardwright.models.quant_format import QuantSource, quant_config
from shardwright.models.weights import load_weights
from shardwright.parallel.context import ParallelContext

__all__ = ["DecoderModel", "ModelSpec", "build_model", "load_model"]


def build_model(spec: ModelSpec, ctx: ParallelContext, skip_blocks: frozenset[int] = frozenset(),
                skip_experts: dict[int, frozenset[int]] | None = None) -> DecoderModel:
    """This rank's shard of `spec`, parameters allocated but uninitialised (blocks in
    `skip_blocks` and the experts in `skip_experts` stay on the meta device: their weights live
    elsewhere)."""
    spec_layout_check(spec, ctx)
    model = DecoderModel(spec, ctx, device="meta")
    materialize(model, ctx.device, keep_meta=pooled_params(model, skip_blocks, skip_experts))
    return model


def pooled_params(model: DecoderModel, skip_blocks: frozenset[int] = frozenset(),
                  skip_experts: dict[int, frozenset[int]] | None = None) -> set[int]:
    """ids of the parameters of the blocks in `skip_blocks` (local indices) and of the experts in
    `skip_experts` (local block index -> expert ids): the weights that live elsewhere."""
    out = {id(p) for i in skip_blocks for p in model.blocks[i].parameters()}
    for i, experts in (skip_experts or {}).items():
        out |= {id(p) for e in experts for p in model.blocks[i].mlp.experts[str(e)].parameters()}
    return out


def materialize(module: torch.nn.Module, device: torch.device, keep_meta: set[int] = frozenset()) -> None:
    """Replace meta parameters by uninitialised ones on `device`, touching no memory.

    (`Module.to_empty` writes to the new storage, which makes the whole shard resident before
    any weight is loaded.)
    """
    for sub in module.modules():
        for name, param in list(sub._parameters.items()):
            if param is not None and param.is_meta and id(param) not in keep_meta:
                fresh = torch.empty(param.shape, dtype=param.dtype, device=device)
                sub._parameters[name] = torch.nn.Parameter(fresh, requires_grad=param.requires_grad)


def load_model(
    directory: str | Path, ctx: ParallelContext, *, dtype: DType | None = None,
    skip_blocks: frozenset[int] = frozenset(), quant: QuantMethod | None = None, group_size: int = 128,
    skip_experts: dict[int, frozenset[int]] | None = None,
) -> tuple[ModelSpec, DecoderModel]:
    """Build this rank's shard of the checkpoint in `directory` and load its slices.

    Parameters are created on the meta device and materialised at their sharded size, then
    filled one at a time from slices of the checkpoint: peak memory is this rank's shard plus
    one parameter's slice. Blocks in `skip_blocks` (local indices) are not loaded: their
    parameters stay on the meta device until `model.layer_weights` binds them (peer pooling);
    so do the experts in `skip_experts` (local block -> expert ids), bound by an expert pool.
    `quant` ("int8", or "rtn4" with `group_size`) quantizes the linear weights of a float checkpoint
    (each global tensor, then this rank's slice of its integers: models.quant); a GPTQ-format
    checkpoint (models.quant_format) loads quantized by itself. The model is then for inference only.
    """
    qcfg = quant_config(directory)
    if quant is not None:
        check_method(quant, group_size)
        if qcfg is not None:
            raise ValueError(f"{directory} is already quantized ({qcfg.get('bits')}-bit GPTQ); "
                             f"load it without quant={quant!r}")
    if (quant is not None or qcfg is not None) and (skip_blocks or skip_experts):
        raise ValueError(f"quantized weights with pooled blocks {sorted(skip_blocks)} are not supported; "
                         "load them locally")
    spec = ModelSpec.from_hf_dir(directory, dtype=dtype)
    model = build_model(spec, ctx, frozenset(skip_blocks), skip_experts)
    with CheckpointReader(directory) as reader:
        source = QuantSource(reader, qcfg, quant, group_size) if quant is not None or qcfg is not None else None
        load_weights(model, reader, pooled_params(model, frozenset(skip_blocks), skip_experts), source)
    return spec, model.eval()


def spec_layout_check(spec: ModelSpec, ctx: ParallelContext) -> None:
    ctx.layout.validate_for(spec)
    if spec.sliding_window is not None and ctx.layout.cp > 1:
        raise ValueError(f"sliding_window={spec.sliding_window} is not supported with cp={ctx.layout.cp}: "
                         "ring attention and paged context parallelism are full-causal; use cp=1")
    if spec.attn_logit_softcap is not None and ctx.layout.cp > 1:
        raise ValueError(f"attn_logit_softcap={spec.attn_logit_softcap} is not supported with cp={ctx.layout.cp}: "
                         "ring attention and paged context parallelism merge softmax pieces without it; use cp=1")
    if ctx.device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"{ctx.device} requested but CUDA is not available")
