"""GPTQ-format checkpoints: the layout we read and write, and the quantized load path.

The layout (AutoGPTQ's, which GPTQModel also writes with `checkpoint_format: "gptq"`): a Hugging
Face directory whose config.json holds

    "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false,
                            "sym": false, "checkpoint_format": "gptq", ...}

(a separate quantize_config.json with the same fields is read too), and, for every quantized
linear `P` (e.g. model.layers.0.self_attn.q_proj) of out_features N and in_features K, in place of
`P.weight`:

    P.qweight  int32 [K * bits / 32, N]  input features packed along dim 0: row i, bits 4j..4j+3
                                         (bits 8: 8j..8j+7) hold q[n, i * (32 / bits) + j]
    P.qzeros   int32 [G, N * bits / 32]  zero points packed along dim 1 the same way, stored
                                         minus 1 ("gptq", v1; read back as (stored + 1) mod 2^bits);
                                         checkpoint_format "gptq_v2" stores them as they are
    P.scales   fp16  [G, N]
    P.g_idx    int32 [K]                 group of each input feature (k // group_size without
                                         act-order; any order with desc_act); optional
    P.bias     as in the float checkpoint

G = K / group_size (group_size -1: one group per row). Dequantized:
W[n, k] = scales[g, n] * (q[n, k] - zero[g, n]) with g = g_idx[k]. Everything else (embeddings,
norms, lm_head) is stored as in the float checkpoint. GPT-2's Conv1D layers use the same layout.

`QuantSource` gives each rank's linears from either kind of checkpoint: the global tensor's
integers (unpacked from a GPTQ checkpoint, or quantized by `quant` from a float one), then this
rank's slice of them; peak extra memory is one global tensor's integers.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from shardwright.models.checkpoint import CheckpointReader, Read, save_checkpoint
from shardwright.models.quant import GroupQuant, QuantizedWeight, quantize_method

CONFIG_KEY = "quantization_config"


def quant_config(directory: str | Path) -> dict | None:
    """The GPTQ quantization config of a checkpoint directory, or None for a float checkpoint."""
    directory = Path(directory)
    hf = json.loads((directory / "config.json").read_text())
    cfg = hf.get(CONFIG_KEY)
    if cfg is None and (directory / "quantize_config.json").is_file():
        cfg = json.loads((directory / "quantize_config.json").read_text())
    if cfg is None:
        return None
    method = cfg.get("quant_method", "gptq")
    if method != "gptq" or int(cfg.get("bits", 0)) not in (4, 8):
        raise ValueError(f"{directory}: quantization_config quant_method={method!r} bits={cfg.get('bits')} "
                         "is not supported; Shardwright loads GPTQ checkpoints of 4 or 8 bits")
    return cfg


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    v = v & 0xFFFFFFFF
    return torch.where(v >= 2 ** 31, v - 2 ** 32, v).to(torch.int32)


def pack(q: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Integers in 0 .. 2^bits - 1 packed 32 / bits to an int32 along `dim`, lowest bits first."""
    per = 32 // bits
    q = q.to(torch.int64).movedim(dim, 0)
    if q.shape[0] % per:
        raise ValueError(f"{q.shape[0]} values do not pack {per} to an int32 ({bits} bits)")
    q = q.reshape(q.shape[0] // per, per, *q.shape[1:])
    shifts = (torch.arange(per) * bits).view(1, per, *([1] * (q.dim() - 2)))
    return _to_int32((q << shifts).sum(dim=1)).movedim(0, dim)


def unpack(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """The inverse of `pack`: int32 values in 0 .. 2^bits - 1."""
    per = 32 // bits
    p = packed.to(torch.int64).movedim(dim, 0)
    shifts = (torch.arange(per) * bits).view(1, per, *([1] * (p.dim() - 1)))
    q = (p.unsqueeze(1) >> shifts) & (2 ** bits - 1)
    return q.reshape(p.shape[0] * per, *p.shape[1:]).movedim(0, dim).to(torch.int32)


def to_gptq_tensors(prefix: str, gq: GroupQuant, v2: bool = False) -> dict[str, torch.Tensor]:
    """`gq` of a [N, K] weight as P.qweight, P.qzeros, P.scales, P.g_idx (the layout above)."""
    maxq = 2 ** gq.bits - 1
    zeros = gq.zero.t().to(torch.int64)  # [G, N]
    stored = zeros if v2 else (zeros - 1) & maxq
    return {f"{prefix}.qweight": pack(gq.q.t(), gq.bits, 0),
            f"{prefix}.qzeros": pack(stored, gq.bits, 1),
            f"{prefix}.scales": gq.scale.t().half().contiguous(),
            f"{prefix}.g_idx": gq.g_idx.to(torch.int32)}


def from_gptq_tensors(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                      g_idx: torch.Tensor | None, bits: int, v2: bool = False) -> GroupQuant:
    """The GroupQuant of one GPTQ-format linear (the inverse of `to_gptq_tensors`)."""
    q = unpack(qweight, bits, 0).t().contiguous()  # [N, K]
    n, k = q.shape
    zeros = unpack(qzeros, bits, 1)[:, :n]
    if not v2:
        zeros = (zeros + 1) & (2 ** bits - 1)
    groups = scales.shape[0]
    if g_idx is None:
        g_idx = torch.arange(k) // (k // groups)
    return GroupQuant(q, scales.float().t().contiguous(), zeros.float().t().contiguous(),
                      g_idx.to(torch.int64), bits)


class QuantSource:
    """Quantized linears for this rank: from a GPTQ checkpoint (`cfg`) or, for a float one,
    quantized with `method` and `group_size` from the global tensor."""

    def __init__(self, reader: CheckpointReader, cfg: dict | None, method: str | None, group_size: int,
                 use_kernels: bool = True) -> None:
        self.reader, self.cfg, self.method, self.group_size = reader, cfg, method, group_size
        self.use_kernels = use_kernels
        self._cache: tuple[str, GroupQuant] | None = None

    def is_quantized(self, weight_name: str) -> bool:
        """Whether this checkpoint linear (name ending in .weight) is served quantized."""
        base = weight_name.removesuffix(".weight")
        return self.reader.has(f"{base}.qweight") if self.cfg is not None else True

    def _global(self, name: str, conv1d: bool) -> GroupQuant:
        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        base = name.removesuffix(".weight")
        if self.cfg is not None:
            r = self.reader
            g_idx = r.read(Read(f"{base}.g_idx")) if r.has(f"{base}.g_idx") else None
            gq = from_gptq_tensors(r.read(Read(f"{base}.qweight")), r.read(Read(f"{base}.qzeros")),
                                   r.read(Read(f"{base}.scales")), g_idx, int(self.cfg["bits"]),
                                   self.cfg.get("checkpoint_format") == "gptq_v2")
        else:
            gq = quantize_method(self.reader.read(Read(name, conv1d=conv1d)), self.method, self.group_size)
        self._cache = (name, gq)
        return gq

    def weight(self, param_name: str, reads: list[Read], device: torch.device) -> QuantizedWeight:
        """The quantized local weight that `reads` (weights.weight_plan) describe."""
        parts = []
        for r in reads:
            gq = self._global(r.name, r.conv1d)
            if r.out is not None:
                if r.out.valid_stop < r.out.stop:
                    raise ValueError(f"{param_name}: padded rows cannot be quantized")
                gq = gq.rows(r.offset + r.out.start, r.offset + r.out.stop)
            if r.in_ is not None:
                gq = self._in_slice(param_name, gq, r.in_.start, r.in_.stop)
            parts.append(gq)
        gq = parts[0] if len(parts) == 1 else GroupQuant.cat(parts, param_name)
        return QuantizedWeight(gq, self.use_kernels, device)

    @staticmethod
    def _in_slice(param_name: str, gq: GroupQuant, start: int, stop: int) -> GroupQuant:
        k, groups = gq.shape[1], gq.scale.shape[1]
        size = k // groups
        ordered = torch.equal(gq.g_idx, torch.arange(k) // size)
        if groups > 1 and ordered and (start % size or (stop - start) % size):
            raise ValueError(f"{param_name}: this rank's input features [{start}, {stop}) cut groups of "
                             f"{size}; choose a group size dividing {stop - start} or a smaller tp")
        return gq.cols(start, stop)


def write_quantized(out: str | Path, source: str | Path, linears: dict[str, GroupQuant], qcfg: dict) -> None:
    """Write a GPTQ-format checkpoint: `linears` maps each linear's checkpoint weight name to its
    integers; every other tensor of `source` is copied as it is."""
    reader = CheckpointReader(source)
    tensors = {}
    for name in reader.names():
        if name in linears:
            tensors.update(to_gptq_tensors(name.removesuffix(".weight"), linears[name]))
        else:
            tensors[name] = reader.read(Read(name))
    config = json.loads((Path(source) / "config.json").read_text())
    config[CONFIG_KEY] = qcfg
    save_checkpoint(out, tensors, config)
    (Path(out) / "quantize_config.json").write_text(json.dumps(qcfg, indent=2))
    for extra in Path(source).iterdir():  # tokenizer files and the like
        if extra.is_file() and not (Path(out) / extra.name).exists() and "safetensors" not in extra.name:
            (Path(out) / extra.name).write_bytes(extra.read_bytes())
