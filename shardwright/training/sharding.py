"""Where each local tensor of a rank's shard sits in the Hugging Face (unsharded) model.

Built on `models.weights.weight_plan`, the one description of each parameter's checkpoint slices:

- `param_pieces(model)`: every local parameter cut into `Piece`s, one per checkpoint read
  (a fused qkv weight has three), with the destination rows/columns in the HF tensor;
- `owns(piece, ctx)`: whether this TP rank is the one that counts a piece that several TP ranks
  hold identically (norm weights, row-parallel biases, GPT-2 position embeddings, replicated
  kv heads), so a sum over ranks counts every element of the model once;
- `FullTensors`: assembles HF tensors from the pieces of every shard (export, reshard);
- `stage_model(spec, layout, tp_rank, pp_rank, ep_rank)`: the meta-device shard of any rank of any layout,
  to read its plan without its process groups.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from shardwright.config import ModelSpec, ParallelLayout
from shardwright.models.checkpoint import Read
from shardwright.models.decoder import DecoderModel
from shardwright.models.weights import weight_plan
from shardwright.parallel.context import AXES, ParallelContext


class HFNames:
    """Stands in for a CheckpointReader in `weight_plan`: answers `has` for the tensor names that
    `random_init` and `export_hf` write (GPT-2 under `transformer.`, `lm_head.weight` only when
    the embeddings are untied)."""

    def __init__(self, spec: ModelSpec) -> None:
        self.tied = spec.tie_word_embeddings

    def has(self, name: str) -> bool:
        return name == "transformer.wte.weight" or (name == "lm_head.weight" and not self.tied)


@dataclass(frozen=True)
class Piece:
    """Rows [row_start, row_stop) of local parameter `param` = HF tensor `name`[out, in].

    `out` and `in_` are (start, stop) in the HF tensor's (out, in) orientation (None: all);
    `conv1d` marks GPT-2's transposed [in, out] storage. `replicas` TP ranks hold it identically.
    """

    param: str
    name: str
    row_start: int
    row_stop: int
    out: tuple[int, int] | None
    in_: tuple[int, int] | None
    conv1d: bool
    replicas: int


def _replicas(read: Read, tp: int) -> int:
    """How many TP ranks hold each element of this read: 1 when sharded, tp when replicated."""
    rows = read.out if read.out is not None else read.in_
    if rows is None:
        return tp
    return max(1, tp * rows.length // rows.size)


def _pieces_of(param_name: str, param: torch.Tensor, reads: list[Read], tp: int) -> Iterator[Piece]:
    row = 0
    for r in reads:
        length = r.out.length if r.out is not None else param.shape[0]
        out = None
        valid = length
        if r.out is not None:
            valid = max(0, r.out.valid_stop - r.out.start)
            out = (r.offset + r.out.start, r.offset + r.out.start + valid)
        in_ = None if r.in_ is None else (r.in_.start, r.in_.stop)
        yield Piece(param_name, r.name, row, row + valid, out, in_, r.conv1d, _replicas(r, tp))
        row += length


def param_pieces(model: DecoderModel) -> Iterator[tuple[str, torch.nn.Parameter, list[Piece]]]:
    """(local name, parameter, its pieces) for every parameter of `model`; padding rows omitted."""
    tp = model.ctx.tp
    for name, param, reads in weight_plan(model, HFNames(model.spec)):
        yield name, param, list(_pieces_of(name, param, reads, tp))


def owns(piece: Piece, tp_rank: int) -> bool:
    """True on the first of the `piece.replicas` consecutive TP ranks holding the piece."""
    return tp_rank % piece.replicas == 0


def shard_context(layout: ParallelLayout, *, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> ParallelContext:
    """A group-less context of the (tp_rank, pp_rank, ep_rank) shard of `layout` (dp = cp = 0)."""
    blocks = {d: None for d in range(2, layout.tp) if layout.tp % d == 0}
    return ParallelContext(layout=layout, rank=-1, device=torch.device("meta"), backend="none",
                           tp_rank=tp_rank, pp_rank=pp_rank, ep_rank=ep_rank, group_ranks={a: [] for a in AXES},
                           tp_block_groups=blocks)  # type: ignore[arg-type]


def stage_model(spec: ModelSpec, layout: ParallelLayout, tp_rank: int, pp_rank: int, ep_rank: int = 0) -> DecoderModel:
    """The meta-device shard held by (tp_rank, pp_rank, ep_rank) of `layout`: shapes and plan, no memory."""
    return DecoderModel(spec, shard_context(layout, tp_rank=tp_rank, pp_rank=pp_rank, ep_rank=ep_rank),
                        device="meta")


class FullTensors:
    """Assembles Hugging Face tensors from pieces of local tensors (any number of shards)."""

    def __init__(self) -> None:
        self._parts: dict[str, list[tuple[tuple[slice, ...], torch.Tensor]]] = {}

    def add(self, piece: Piece, local: torch.Tensor) -> None:
        """Place rows [row_start, row_stop) of `local` (the whole local parameter)."""
        t = local[piece.row_start : piece.row_stop]
        index = [slice(None)] * t.dim()
        if piece.out is not None:
            index[0] = slice(*piece.out)
        if piece.in_ is not None:
            index[1] = slice(*piece.in_)
        if piece.conv1d and t.dim() == 2:
            t, index = t.t(), [index[1], index[0]]
        self._parts.setdefault(piece.name, []).append((tuple(index), t))

    def build(self) -> dict[str, torch.Tensor]:
        """Every HF tensor, shaped by the furthest extent of its pieces along each dim."""
        return {name: _merge(parts) for name, parts in self._parts.items()}


def _merge(parts: list[tuple[tuple[slice, ...], torch.Tensor]]) -> torch.Tensor:
    dims = parts[0][1].dim()
    shape = [max(s[d].stop if s[d].stop is not None else t.shape[d] for s, t in parts) for d in range(dims)]
    out = torch.zeros(shape, dtype=parts[0][1].dtype)
    for index, t in parts:
        out[index] = t
    return out
