"""Decode latency and throughput of the Ray engine beside a bare torch.distributed loop.

Run: `shardwright bench decode [--quick] [--json]` from a source checkout.

For each layout (tp, pp) and batch size B, both sides decode B sequences (prompt of 16 tokens)
greedily on the same ~110M-parameter Llama (fp32, random weights, written once to a cache
directory) with the same number of processes:
- engine: InferenceEngine on a local Ray cluster (one ShardWorker per logical GPU);
- baseline (benchmarks/decode_baseline.py): the same model code and paged cache in a bare
  torch.distributed loop started with torch.multiprocessing: no Ray, no controller.
Both sides run twice, alternating (baseline, engine, baseline, engine), and each keeps its best
figures. Two figures per point, both for the whole batch advancing one token:
- latency_s: the MEDIAN decode-step time (p50 inter-token latency). The machine has two cores and
  Ray's own processes beside the workers; a single burst of other load in a run of a few dozen
  steps moves a mean by 5-20 % and would decide the ratio. `overhead` = latency_s /
  baseline_latency_s.
- tokens_per_s: tokens over the whole measured span (the mean rate, bursts included);
  `throughput_overhead` = baseline_tokens_per_s / tokens_per_s.
At pp > 1 the engine pipelines micro-batches, so its steps each advance part of the batch: a
step's time is scaled by batch / tokens it produced, and the two sides compare like for like.
Memory-bandwidth utilisation = (weight bytes + KV bytes read per step) / latency / 19 GB/s
(the measured matrix-vector bandwidth of the CI machine).

At (1,1) the rows also hold `hf_tokens_per_s`: Hugging Face generate on the same checkpoint in a
fresh process on every core (benchmarks/hf_baseline.py; what users would otherwise run), also
best of the alternating runs, and `vs_hf` = tokens_per_s / hf_tokens_per_s.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from benchmarks.decode_baseline import baseline_decode
from benchmarks.hf_baseline import hf_decode_rates
from benchmarks.runner import measure_point
from shardwright.config import ModelSpec, ParallelLayout

COLUMNS = ["tp", "pp", "batch", "latency_s", "baseline_latency_s", "overhead", "tokens_per_s",
           "baseline_tokens_per_s", "throughput_overhead", "mbu", "hf_tokens_per_s", "vs_hf"]
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


def engine_decode(directory: Path, layout: ParallelLayout, batches: list[int],
                  steps: int) -> dict[int, tuple[float, float]]:
    """(p50 latency of the batch advancing one token, tokens/s) of steady decoding at each batch
    size, from the engine's step log."""
    from shardwright.actors.engine import EngineConfig, InferenceEngine
    from shardwright.serving.sampling import SamplingParams

    cfg = EngineConfig(model_dir=directory, layout=layout, block_size=16, num_blocks=1024,
                       max_tokens_per_step=4096, max_running=max(batches))
    out = {}
    with InferenceEngine(cfg).start() as eng:
        for batch in batches:
            prompts = [[(7 * i + j) % 1000 + 1 for j in range(PROMPT_LEN)] for i in range(batch)]
            params = SamplingParams(max_tokens=steps + 2, ignore_eos=True)
            eng.step_log.clear()
            eng.generate(prompts, params, timeout_s=600)
            log = list(eng.step_log)
            out[batch] = (decode_latency(log, batch), decode_rate(log))
    return out


def _decode_steps(log: list[tuple[float, int, bool]]) -> list[tuple[float, int]]:
    """(seconds, tokens) of each decode-only step after the first one (which ends the warm-up)."""
    decode = [(t, n) for t, n, only_decode in log if only_decode]
    if len(decode) < 3:
        raise RuntimeError(f"too few decode steps to measure ({len(decode)})")
    return [(t - t_prev, n) for (t_prev, _), (t, n) in zip(decode, decode[1:])]


def decode_rate(log: list[tuple[float, int, bool]]) -> float:
    """Tokens/s over the decode-only steps after the first one."""
    steps = _decode_steps(log)
    return sum(n for _, n in steps) / sum(dt for dt, _ in steps)


def decode_latency(log: list[tuple[float, int, bool]], batch: int) -> float:
    """Median time for all `batch` sequences to advance one token (a step of n tokens counts
    dt * batch / n: at pp > 1 each step advances one micro-batch)."""
    return statistics.median(dt * batch / n for dt, n in _decode_steps(log))


def weight_bytes(spec: ModelSpec) -> int:
    return spec.num_parameters * 4


def kv_bytes_per_step(spec: ModelSpec, batch: int, context: int) -> int:
    return 2 * spec.num_layers * batch * context * spec.num_kv_heads * spec.head_dim * 4


def measure_layout(directory: Path, layout: ParallelLayout, batches: list[int], steps: int):
    """(baseline, engine, Hugging Face) best figures per batch at one layout, the sides alternating."""
    base, eng, hf = {}, {}, {}
    for _ in range(REPEATS):  # alternate the sides; keep each one's best figures
        for b, times in baseline_decode(str(directory), layout, batches, steps, PROMPT_LEN).items():
            _keep_best(base, b, statistics.median(times), b * len(times) / sum(times))
        for b, (latency, rate) in engine_decode(directory, layout, batches, steps).items():
            _keep_best(eng, b, latency, rate)
        if (layout.tp, layout.pp) == (1, 1):  # Hugging Face generate: one process, like this layout
            for b, rate in hf_decode_rates(str(directory), batches, steps, PROMPT_LEN).items():
                hf[b] = max(hf.get(b, 0.0), rate)
    return base, eng, hf


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
        got = measure_point({"tp": tp, "pp": pp}, measure_layout, directory, ParallelLayout(tp=tp, pp=pp),
                            batches, steps)
        for b in batches if got is not None else []:
            base, eng, hf = got
            results.append(row(spec, tp, pp, b, eng[b], base[b], steps))
            if b in hf:
                results[-1].update(hf_tokens_per_s=hf[b], vs_hf=results[-1]["tokens_per_s"] / hf[b])
    notes = [f"model: {spec.num_parameters / 1e6:.0f}M parameters fp32; {steps} decode steps per point, best of {REPEATS} alternating runs per side; "
             "latency_s and overhead: median step; tokens_per_s and throughput_overhead: mean rate; "
             "hf_tokens_per_s: Hugging Face generate, same checkpoint, decode rate without the prefill; "
             f"bandwidth ceiling {MACHINE_BANDWIDTH_BPS / 1e9:.0f} GB/s"]
    return {"results": results, "notes": notes, "model_parameters": spec.num_parameters}


def _keep_best(best: dict, batch: int, latency: float, rate: float) -> None:
    old_latency, old_rate = best.get(batch, (float("inf"), 0.0))
    best[batch] = (min(old_latency, latency), max(old_rate, rate))


def row(spec: ModelSpec, tp: int, pp: int, batch: int, eng: tuple[float, float],
        base: tuple[float, float], steps: int) -> dict:
    (latency, tps), (base_latency, base_tps) = eng, base
    read = weight_bytes(spec) + kv_bytes_per_step(spec, batch, PROMPT_LEN + steps // 2)
    return {"tp": tp, "pp": pp, "batch": batch, "latency_s": latency, "tokens_per_s": tps,
            "baseline_latency_s": base_latency, "baseline_tokens_per_s": base_tps,
            "overhead": latency / base_latency, "throughput_overhead": base_tps / tps,
            "mbu": read / latency / MACHINE_BANDWIDTH_BPS,
            "baseline_mbu": read / base_latency / MACHINE_BANDWIDTH_BPS}


if __name__ == "__main__":
    import sys

    from benchmarks.runner import main

    sys.exit(main("decode", "--quick" in sys.argv, "--json" in sys.argv))
