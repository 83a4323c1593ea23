"""Writing a quantized checkpoint (the `shardwright quantize` command's work).

    linears = quantize_checkpoint("llama-110m", "llama-110m-gptq4", "gptq4", group_size=128,
                                  windows=calibration_token_windows)

int8 and rtn4 round each linear's global weight; gptq4 runs GPTQ (models.gptq) on calibration
token windows [num, seq], block by block. The output is a GPTQ-format checkpoint
(models.quant_format describes the layout) that `load_model` and the engine load at any tp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from shardwright.models import load_model
from shardwright.models.checkpoint import CheckpointReader
from shardwright.models.gptq import quantize_gptq_model
from shardwright.models.quant import GroupQuant, quantize_method
from shardwright.models.quant_format import quant_config, write_quantized
from shardwright.models.weights import LINEARS, weight_plan
from shardwright.parallel.context import ParallelContext

Method = Literal["int8", "rtn4", "gptq4"]
METHODS = ("int8", "rtn4", "gptq4")


def quantize_checkpoint(source: str | Path, out: str | Path, method: Method, *, group_size: int = 128,
                        windows: torch.Tensor | None = None, act_order: bool = False,
                        damp: float = 0.01) -> dict:
    """Quantize the float checkpoint `source` into `out`; returns a summary (tensors, bytes)."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if quant_config(source) is not None:
        raise ValueError(f"{source} is already quantized; quantize the float checkpoint")
    if method == "gptq4" and (windows is None or len(windows) == 0):
        raise ValueError("gptq4 needs calibration text: pass --calib CORPUS (a .txt/.jsonl file or directory)")
    _, model = load_model(source, ParallelContext.single("cpu"), dtype="float32")
    gs = group_size if method != "int8" else None
    modules = {n: m for n, m in model.named_modules() if isinstance(m, LINEARS)}
    for name, m in modules.items():
        if gs is not None and m.weight.shape[1] % gs:
            raise ValueError(f"group_size={gs} does not divide {name}'s in_features={m.weight.shape[1]}; "
                             "choose a smaller --group-size")
    if method == "gptq4":
        gqs = quantize_gptq_model(model, windows, bits=4, group_size=gs, act_order=act_order, damp=damp)
    else:
        gqs = {n: quantize_method(m.weight.detach(), method, group_size) for n, m in modules.items()}
    with CheckpointReader(source) as reader:
        linears = _by_checkpoint_name(model, reader, gqs)
    bits = 8 if method == "int8" else 4
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": -1 if gs is None else gs,
            "desc_act": bool(act_order and method == "gptq4"), "sym": method == "int8",
            "damp_percent": damp, "true_sequential": False, "static_groups": False,
            "checkpoint_format": "gptq", "shardwright_method": method}
    write_quantized(out, source, linears, qcfg)
    return {"directory": str(out), "method": method, "group_size": qcfg["group_size"], "linears": len(linears),
            "act_order": qcfg["desc_act"]}


def _by_checkpoint_name(model, reader: CheckpointReader, gqs: dict[str, GroupQuant]) -> dict[str, GroupQuant]:
    """Split each (possibly fused) module's integers into the checkpoint tensors it came from."""
    pieces: dict[str, list[tuple[int, GroupQuant]]] = {}
    for name, _, reads in weight_plan(model, reader):
        module = name.rpartition(".")[0]
        if module not in gqs or not name.endswith(".weight"):
            continue
        gq, row = gqs[module], 0
        for r in reads:
            length = r.out.length if r.out is not None else gq.shape[0]
            start = r.offset + (r.out.start if r.out is not None else 0)
            pieces.setdefault(r.name, []).append((start, gq.rows(row, row + length)))
            row += length
    return {n: GroupQuant.cat([p for _, p in sorted(parts, key=lambda t: t[0])], n) for n, parts in pieces.items()}
