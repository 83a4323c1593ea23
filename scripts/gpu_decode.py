"""Decode figures on one CUDA GPU, without Ray: the bare paged loop beside Hugging Face generate.

Run by scripts/gpu_check.sh on a machine with an NVIDIA GPU (no Ray, Redis or registry there):

    python scripts/gpu_decode.py --preset llama-110m --batches 1,8,32 --steps 32

Prints one JSON object (last line): per batch, tokens/s of the bare loop (`shardwright` paged model,
fp32 and bf16) and of `transformers` generate on the same checkpoint and GPU, and their ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.decode_baseline import baseline_decode  # noqa: E402
from shardwright.config import ParallelLayout  # noqa: E402


def hf_rates(directory: str, batches: list[int], steps: int, prompt_len: int, dtype) -> dict[int, float]:
    """Steady greedy decode tokens/s of HF generate on the GPU (prefill cancelled out)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).cuda().eval()
    out = {}
    with torch.inference_mode():
        for b in batches:
            ids = torch.tensor([[(7 * i + j) % 1000 + 1 for j in range(prompt_len)] for i in range(b)]).cuda()
            kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False, "pad_token_id": 0}

            def generate(n: int) -> float:
                torch.cuda.synchronize()
                start = time.perf_counter()
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kwargs)
                torch.cuda.synchronize()
                return time.perf_counter() - start

            generate(2)
            prefill = generate(1)
            out[b] = b * steps / (generate(1 + steps) - prefill)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-110m")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_decode: no CUDA device; run this on a machine with an NVIDIA GPU", file=sys.stderr)
        return 2
    from shardwright.models.presets import preset_spec
    from shardwright.models.random_init import write_random_checkpoint

    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        directory = str(write_random_checkpoint(Path(tmp) / "model", preset_spec(args.preset)))
        bare = baseline_decode(directory, ParallelLayout(), batches, args.steps, args.prompt_len)
        hf32 = hf_rates(directory, batches, args.steps, args.prompt_len, torch.float32)
        hf16 = hf_rates(directory, batches, args.steps, args.prompt_len, torch.bfloat16)
    rows = []
    for b in batches:
        median = sorted(bare[b])[len(bare[b]) // 2]
        rows.append({"batch": b, "bare_fp32_tokens_per_s": round(b / median, 1),
                     "hf_fp32_tokens_per_s": round(hf32[b], 1), "hf_bf16_tokens_per_s": round(hf16[b], 1),
                     "bare_vs_hf_fp32": round(b / median / hf32[b], 3)})
        print(f"batch {b}: bare {b / median:.1f} tok/s, HF fp32 {hf32[b]:.1f}, HF bf16 {hf16[b]:.1f}", file=sys.stderr)
    print(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
