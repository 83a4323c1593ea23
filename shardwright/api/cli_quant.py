"""`shardwright quantize MODEL OUT --method int8|rtn4|gptq4`: write a GPTQ-format checkpoint."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


class _Usage(ValueError):
    """Bad input: `shardwright` prints it as one line and exits 2."""


def cmd_quantize(args: argparse.Namespace) -> int:
    from shardwright.models.quantize import quantize_checkpoint

    source, out = Path(args.model), Path(args.out)
    if not (source / "config.json").is_file():
        raise _Usage(f"{source} has no config.json; pass a Hugging Face model directory")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise _Usage(f"{out} exists and is not empty; choose another directory or pass --force")
    if args.method != "gptq4" and args.calib is not None:
        raise _Usage(f"--calib is used by gptq4 only; --method {args.method} rounds to nearest")
    windows = _calibration(source, args) if args.method == "gptq4" else None
    result = quantize_checkpoint(source, out, args.method, group_size=args.group_size, windows=windows,
                                 act_order=args.act_order, damp=args.damp)
    if windows is not None:
        result["calibration_windows"] = int(windows.shape[0])
    print(json.dumps(result) if args.json else
          f"wrote {result['method']} ({result['linears']} linears, group {result['group_size']}) to {out}")
    return 0


def _calibration(source: Path, args: argparse.Namespace):
    from shardwright.config import ModelSpec
    from shardwright.models.tokenizer import load_tokenizer
    from shardwright.training.data import pack, read_documents

    if args.calib is None:
        raise _Usage("gptq4 needs calibration text: pass --calib CORPUS (a .txt/.jsonl file or directory)")
    spec = ModelSpec.from_hf_dir(source)
    windows = pack(read_documents(Path(args.calib)), load_tokenizer(source), args.seq_len, spec.vocab_size)
    if len(windows) == 0:
        raise _Usage(f"--calib {args.calib} holds fewer than {args.seq_len + 1} tokens; give more text "
                     "or a smaller --seq-len")
    return windows[: args.num_windows, : args.seq_len]


def add_quantize_command(sub) -> None:
    p = sub.add_parser("quantize", help="write a weight-quantized (GPTQ-format) checkpoint",
                       description="Quantize every linear of a float Hugging Face checkpoint and write a "
                                   "GPTQ-format checkpoint (qweight, qzeros, scales, g_idx and "
                                   "quantization_config in config.json) that generate/serve load at any tp.")
    p.add_argument("model", help="float Hugging Face directory (config.json + safetensors)")
    p.add_argument("out", help="output directory")
    p.add_argument("--method", required=True, choices=["int8", "rtn4", "gptq4"],
                   help="int8: per output row, symmetric; rtn4: 4-bit groups, round to nearest; "
                        "gptq4: 4-bit groups with GPTQ error compensation (needs --calib)")
    p.add_argument("--group-size", type=int, default=128, help="input features per 4-bit group (default 128)")
    p.add_argument("--calib", default=None, metavar="CORPUS",
                   help="calibration text for gptq4: a .txt/.jsonl file or a directory of them")
    p.add_argument("--num-windows", type=int, default=64, help="calibration windows for gptq4 (default 64)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window (default 256)")
    p.add_argument("--act-order", action="store_true",
                   help="gptq4: quantize columns by decreasing Hessian diagonal (desc_act)")
    p.add_argument("--damp", type=float, default=0.01, help="gptq4: damping, fraction of mean diag H (default 0.01)")
    p.add_argument("--force", action="store_true", help="write into a non-empty directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_quantize)
