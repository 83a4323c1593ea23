"""Decode latency and throughput of the Ray engine beside a bare torch.distributed loop.

Run: `shardwright bench decode [--quick] [--json]` from a source checkout.

For each layout (tp, pp) and batch size B, both sides decode B sequences (prompt of 16 tokens)
greedily on the same ~110M-parameter Llama (fp32, random weights, written once to a cache
directory) with the same number of processes:
- engine: InferenceEngine on a local Ray cluster (one ShardWorker per logical GPU);
- baseline (benchmarks/decode_baseline.py): the same model code and paged cache in a bare
  torch.distributed loop started with torch.multiprocessing: no Ray, no controller.
Both sides run twice, alternating (baseline, engine, baseline, engine), and each keeps its best
rate. latency_s is the time for every sequence of the batch to advance one token (B / tokens_per_s),
so the two sides compare like for like even when the engine pipelines micro-batches at pp > 1.
Memory-bandwidth utilisation = (weight bytes + KV bytes read per step) / latency / 19 GB/s
(the measured matrix-vector bandwidth of the CI machine).
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.decode_baseline import baseline_decode
from shardwright.config import ModelSpec, ParallelLayout

COLUMNS = ["tp", "pp", "batch", "latency_s", "baseline_latency_s", "overhead", "tokens_per_s",
           "baseline_tokens_per_s", "mbu"]
MACHINE_BANDWIDTH_BPS = 19e9
PROMPT_LEN = 16
# Each side runs twice, alternating, and keeps its best rate: on a shared 2-core machine a burst of
# other load during one side's run would otherwise decide the ratio.
REPEATS = 2


def model_dir() -> Path:
    """The benchmark model, written on first use (random weights: speed does not depend on them)."""
    from shardwright.models.presets import preset_spec
    from shardwright.models.random_init import write_random_checkpoint

    root = Path(os.environ.get("SHARDWRIGHT_BENCH_DIR", Path.home() / ".cache" / "shardwright" / "bench"))
    directory = root / "llama-110m"
    if not (directory / "model.safetensors").is_file():
        write_random_checkpoint(directory, preset_spec("llama-110m"), seed=0)
    return directory


def engine_decode(directory: Path, layout: ParallelLayout, batches: list[int], steps: int) -> dict[int, float]:
    """tokens/s of steady decoding at each batch size, measured from the engine's step log."""
    from shardwright.actors.engine import EngineConfig, InferenceEngine
    from shardwright.actors.sampling import SamplingParams

    cfg = EngineConfig(model_dir=directory, layout=layout, block_size=16, num_blocks=1024,
                       max_tokens_per_step=4096, max_running=max(batches))
    out = {}
    with InferenceEngine(cfg).start() as eng:
        for batch in batches:
            prompts = [[(7 * i + j) % 1000 + 1 for j in range(PROMPT_LEN)] for i in range(batch)]
            params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
            eng.step_log.clear()
            eng.generate(prompts, params, timeout_s=600)
            out[batch] = decode_rate(list(eng.step_log))
    return out


def decode_rate(log: list[tuple[float, int, bool]]) -> float:
    """Tokens/s over the decode-only steps after the first one (which ends the warm-up)."""
    decode = [(t, n) for t, n, only_decode in log if only_decode]
    if len(decode) < 3:
        raise RuntimeError(f"too few decode steps to measure ({len(decode)})")
    (t0, _), rest = decode[0], decode[1:]
    return sum(n for _, n in rest) / (rest[-1][0] - t0)


def weight_bytes(spec: ModelSpec) -> int:
    return spec.num_parameters * 4


def kv_bytes_per_step(spec: ModelSpec, batch: int, context: int) -> int:
    return 2 * spec.num_layers * batch * context * spec.num_kv_heads * spec.head_dim * 4


def run(quick: bool) -> dict:
    import ray

    directory = model_dir()
    spec = ModelSpec.from_hf_dir(directory)
    steps = 16 if quick else 64
    batches = [1, 8, 32]
    layouts = [(1, 1), (2, 1), (1, 2)]
    if not ray.is_initialized():
        ray.init(address="local", num_gpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results = []
    for tp, pp in layouts:
        layout = ParallelLayout(tp=tp, pp=pp)
        base, eng = {}, {}
        for _ in range(REPEATS):  # alternate the two sides; keep each one's best run
            for b, rate in baseline_decode(str(directory), layout, batches, steps, PROMPT_LEN).items():
                base[b] = max(base.get(b, 0.0), rate)
            for b, rate in engine_decode(directory, layout, batches, steps).items():
                eng[b] = max(eng.get(b, 0.0), rate)
        for b in batches:
            results.append(row(spec, tp, pp, b, eng[b], base[b], steps))
    notes = [f"model: {spec.num_parameters / 1e6:.0f}M parameters fp32; {steps} decode steps per point, best of {REPEATS} alternating runs per side; "
             f"bandwidth ceiling {MACHINE_BANDWIDTH_BPS / 1e9:.0f} GB/s"]
    return {"results": results, "notes": notes, "model_parameters": spec.num_parameters}


def row(spec: ModelSpec, tp: int, pp: int, batch: int, tps: float, base_tps: float, steps: int) -> dict:
    latency, base_latency = batch / tps, batch / base_tps
    read = weight_bytes(spec) + kv_bytes_per_step(spec, batch, PROMPT_LEN + steps // 2)
    return {"tp": tp, "pp": pp, "batch": batch, "latency_s": latency, "tokens_per_s": tps,
            "baseline_latency_s": base_latency, "baseline_tokens_per_s": base_tps,
            "overhead": latency / base_latency, "mbu": read / latency / MACHINE_BANDWIDTH_BPS,
            "baseline_mbu": read / base_latency / MACHINE_BANDWIDTH_BPS}


if __name__ == "__main__":
    import sys

    from benchmarks.runner import main

    sys.exit(main("decode", "--quick" in sys.argv, "--json" in sys.argv))
