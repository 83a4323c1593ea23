"""Reading (and, for tests and examples, writing) Hugging Face safetensors checkpoints.

`CheckpointReader` opens `model.safetensors` or a sharded `model.safetensors.index.json` and
reads only the requested slice of a tensor through safetensors' `get_slice`: a TP rank never
materialises a whole tensor it keeps only part of. The file is memory-mapped only for the
duration of one read, so pages touched by a strided (column) slice leave the process's resident
set as soon as the slice is copied out: peak memory is the rank's shard plus one tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shardwright.parallel.layers import RowRange

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Read:
    """Which part of checkpoint tensor `name` a parameter takes, in (out, in) orientation.

    `out` selects rows of the output dim starting at `offset` (a fused tensor's part), `in_`
    columns of the input dim. `conv1d` marks GPT-2's transposed [in, out] storage.
    """

    name: str
    out: RowRange | None = None
    offset: int = 0
    in_: RowRange | None = None
    conv1d: bool = False


class CheckpointReader:
    """Slice-wise access to the tensors of a Hugging Face checkpoint directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self._files = self._tensor_files()

    def _tensor_files(self) -> dict[str, Path]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: self.directory / file for name, file in weight_map.items()}
        single = self.directory / SINGLE_FILE
        if not single.is_file():
            raise FileNotFoundError(
                f"no {SINGLE_FILE} or {INDEX_FILE} in {self.directory}; "
                "save the model with save_pretrained(..., safe_serialization=True)"
            )
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Nothing stays open between reads; kept so the reader works as a context manager."""

    def names(self) -> list[str]:
        return list(self._files)

    def has(self, name: str) -> bool:
        return name in self._files

    def _file(self, name: str) -> Path:
        if name not in self._files:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.directory}")
        return self._files[name]

    def shape(self, name: str) -> list[int]:
        with safe_open(self._file(name), framework="pt") as f:
            return list(f.get_slice(name).get_shape())

    def read(self, r: Read) -> torch.Tensor:
        """The slice that `r` describes, padded with zero rows past the tensor's real rows."""
        with safe_open(self._file(r.name), framework="pt") as f:
            sl = f.get_slice(r.name)
            rank = len(sl.get_shape())
            index = [slice(None)] * rank
            out_dim = 1 if (r.conv1d and rank == 2) else 0
            if r.out is not None:
                stop = max(r.out.start, r.out.valid_stop)
                index[out_dim] = slice(r.offset + r.out.start, r.offset + stop)
            if r.in_ is not None:
                index[1 - out_dim] = slice(r.in_.start, r.in_.stop)
            t = sl[tuple(index)]
        if out_dim == 1:
            t = t.t()
        if r.out is not None and t.shape[0] < r.out.length:
            pad = torch.zeros((r.out.length - t.shape[0], *t.shape[1:]), dtype=t.dtype)
            t = torch.cat([t, pad])
        return t


def save_checkpoint(
    directory: str | Path, tensors: dict[str, torch.Tensor], config: dict, *, num_shards: int = 1
) -> None:
    """Write `tensors` and `config` as a Hugging Face directory (sharded when num_shards > 1)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    if num_shards == 1:
        save_file(tensors, str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return
    names = list(tensors)
    weight_map = {}
    for i in range(num_shards):
        file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::num_shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
