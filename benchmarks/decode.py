"""Decode latency and throughput of the Ray engine beside a bare torch.distributed loop,
Hugging Face generate and vLLM-CPU, all in the same run.

Run: `shardwright bench decode [--quick] [--json] [--mixed] [--no-vllm]` from a source checkout.

For each layout (tp, pp, dtype) in (1,1,fp32), (1,1,bf16), (2,1,fp32), (1,2,fp32) and batch size
B in 1/8/32, every side decodes B sequences (prompt of 16 tokens) greedily on the same ~110M-
parameter Llama (random weights, written once to a cache directory) with the same number of
processes:
- engine: InferenceEngine on a local Ray cluster (one ShardWorker per logical GPU);
- baseline (benchmarks/decode_baseline.py): the same model code and paged cache in a bare
  torch.distributed loop started with torch.multiprocessing: no Ray, no controller.
The sides run twice, alternating (baseline, engine, [HF, vLLM,] baseline, engine, ...), and each
keeps its best figures. Two figures per point, both for the whole batch advancing one token:
- latency_s: the MEDIAN decode-step time (p50 inter-token latency). The machine has two cores and
  Ray's own processes beside the workers; a single burst of other load in a run of a few dozen
  steps moves a mean by 5-20 % and would decide the ratio. `overhead` = latency_s /
  baseline_latency_s.
- tokens_per_s: tokens over the whole measured span (the mean rate, bursts included);
  `throughput_overhead` = baseline_tokens_per_s / tokens_per_s.
At pp > 1 the engine pipelines micro-batches, so its steps each advance part of the batch: a
step's time is scaled by batch / tokens it produced, and the two sides compare like for like.
`mbu` (and `baseline_mbu`, `vllm_mbu`): benchmarks/roofline.py, the bytes a step really reads
(weights, one embedding row per token, the KV at the median step's context) / the median step /
the streaming read bandwidth measured at the start and the end of this run, the better of the two
(`read_gb_per_s` in the JSON; other load only ever lowers it).
`load_1m`: the 1-minute load average as the layout's point ended (other work on the machine shows
there; the JSON also has `load_avg_start` and `load_avg_end`).

The (1,1) rows also hold, in the row's dtype:
- `hf_tokens_per_s`: Hugging Face generate on the same checkpoint in a fresh process on every
  core (benchmarks/hf_baseline.py; what users would otherwise run); `vs_hf` = tokens_per_s /
  hf_tokens_per_s.
- `vllm_tokens_per_s`: vLLM-CPU 0.32.0 on the same checkpoint and token ids, in its own virtual
  environment made on first use (benchmarks/vllm_baseline.py), in a fresh process per run on every
  core, measured step by step like the engine (the mean rate after the first decode step;
  `vllm_latency_s` its median step); `vs_vllm` = tokens_per_s / vllm_tokens_per_s. Each vLLM run
  is a point of its own (`baseline=vllm`), so one that fails leaves the others standing.
  `--no-vllm` leaves vLLM out; when its environment cannot be made the run goes on without it and
  the JSON's `vllm_skipped` (and a note) says why.
`--mixed` runs the mixed workload instead (benchmarks/decode_mixed.py).
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from benchmarks.decode_baseline import baseline_decode
from benchmarks.hf_baseline import hf_decode_rates
from benchmarks.roofline import mbu, read_bandwidth, step_read_bytes
from benchmarks.runner import measure_point, say
from benchmarks.vllm_baseline import vllm_decode, vllm_or_reason
from shardwright.config import ModelSpec, ParallelLayout

COLUMNS = ["tp", "pp", "dtype", "batch", "latency_s", "baseline_latency_s", "overhead", "tokens_per_s",
           "baseline_tokens_per_s", "throughput_overhead", "mbu", "hf_tokens_per_s", "vs_hf",
           "vllm_tokens_per_s", "vs_vllm", "load_1m"]
LAYOUTS = [(1, 1, "float32"), (1, 1, "bfloat16"), (2, 1, "float32"), (1, 2, "float32")]
PROMPT_LEN = 16
MAX_MODEL_LEN = 512  # vLLM's limit: the longest sequence of any workload here (mixed: 256 + 64)
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


def decode_prompts(batch: int) -> list[list[int]]:
    """The prompts' token ids at one batch size (the bare loop and HF build the same ones)."""
    return [[(7 * i + j) % 1000 + 1 for j in range(PROMPT_LEN)] for i in range(batch)]


def engine_decode(directory: Path, layout: ParallelLayout, dtype: str, batches: list[int],
                  steps: int) -> dict[int, tuple[float, float]]:
    """(p50 latency of the batch advancing one token, tokens/s) of steady decoding at each batch
    size, from the engine's step log."""
    from shardwright.actors.engine import EngineConfig, InferenceEngine
    from shardwright.serving.sampling import SamplingParams

    cfg = EngineConfig(model_dir=directory, layout=layout, dtype=dtype, block_size=16, num_blocks=1024,
                       max_tokens_per_step=4096, max_running=max(batches))
    out = {}
    with InferenceEngine(cfg).start() as eng:
        for batch in batches:
            prompts = decode_prompts(batch)
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


def measure_layout(directory: Path, layout: ParallelLayout, dtype: str, batches: list[int], steps: int,
                   vllm_python: Path | None):
    """(baseline, engine, Hugging Face, vLLM) best figures per batch at one layout, the sides
    alternating; HF and vLLM at (1,1) only (one process, like this layout)."""
    base, eng, hf, vllm = {}, {}, {}, {}
    single = (layout.tp, layout.pp) == (1, 1)
    for repeat in range(REPEATS):  # alternate the sides; keep each one's best figures
        for b, times in baseline_decode(str(directory), layout, batches, steps, PROMPT_LEN, dtype).items():
            _keep_best(base, b, statistics.median(times), b * len(times) / sum(times))
        for b, (latency, rate) in engine_decode(directory, layout, dtype, batches, steps).items():
            _keep_best(eng, b, latency, rate)
        if single:
            for b, rate in hf_decode_rates(str(directory), batches, steps, PROMPT_LEN, dtype).items():
                hf[b] = max(hf.get(b, 0.0), rate)
        if single and vllm_python is not None:
            got = measure_point({"tp": 1, "pp": 1, "dtype": dtype, "baseline": "vllm", "run": repeat + 1},
                                vllm_decode, vllm_python, directory, dtype,
                                {b: decode_prompts(b) for b in batches}, steps, MAX_MODEL_LEN)
            for b, (latency, rate) in (got or {}).items():
                _keep_best(vllm, b, latency, rate)
    return base, eng, hf, vllm


def run(quick: bool, mixed: bool = False, no_vllm: bool = False) -> dict:
    import ray

    directory = model_dir()
    spec = ModelSpec.from_hf_dir(directory)
    load_start = os.getloadavg()
    if not ray.is_initialized():
        ray.init(address="local", num_gpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    vllm_python, vllm_skipped = vllm_or_reason(not no_vllm, say=say)
    if mixed:
        from benchmarks.decode_mixed import run_mixed

        report = run_mixed(directory, spec, vllm_python)
    else:
        report = run_grid(directory, spec, quick, vllm_python)
    report.update(vllm_skipped=vllm_skipped, load_avg_start=list(load_start), load_avg_end=list(os.getloadavg()))
    if vllm_skipped:
        report["notes"].append(f"vLLM baseline: {vllm_skipped}")
    report["notes"].append("load average (1, 5, 15 min) at start {:.2f} {:.2f} {:.2f}, at end {:.2f} {:.2f} {:.2f}"
                           .format(*report["load_avg_start"], *report["load_avg_end"]))
    return report


def run_grid(directory: Path, spec: ModelSpec, quick: bool, vllm_python: Path | None) -> dict:
    """The decode grid: every layout and batch size (the module doc)."""
    steps = 16 if quick else 64
    batches = [1, 8, 32]
    bandwidths = [measure_point({"measure": "read bandwidth", "at": "start"}, read_bandwidth)]
    results = []
    for tp, pp, dtype in LAYOUTS:
        got = measure_point({"tp": tp, "pp": pp, "dtype": dtype}, measure_layout, directory,
                            ParallelLayout(tp=tp, pp=pp), dtype, batches, steps, vllm_python)
        load = os.getloadavg()[0]  # the machine is shared: the 1-minute load beside each figure
        for b in batches if got is not None else []:
            base, eng, hf, vllm = got
            results.append(row(spec, (tp, pp, dtype), b, eng[b], base[b], steps))
            results[-1]["load_1m"] = load
            if b in hf:
                results[-1].update(hf_tokens_per_s=hf[b], vs_hf=results[-1]["tokens_per_s"] / hf[b])
            if b in vllm:
                results[-1].update(_vllm_columns(results[-1], vllm[b]))
    bandwidths.append(measure_point({"measure": "read bandwidth", "at": "end"}, read_bandwidth))
    bandwidth = max((b for b in bandwidths if b), default=None)  # other load only ever lowers it
    for r in results if bandwidth else []:
        r.update({f"{side}mbu": mbu(r["read_bytes"], r[f"{side}latency_s"], bandwidth)
                  for side in ("", "baseline_", "vllm_") if f"{side}latency_s" in r})
    notes = [f"model: {spec.num_parameters / 1e6:.0f}M parameters; {steps} decode steps per point, best of {REPEATS} alternating runs per side; "
             "latency_s and overhead: median step; tokens_per_s and throughput_overhead: mean rate; "
             "hf_tokens_per_s: Hugging Face generate, same checkpoint, decode rate without the prefill; "
             "vllm_tokens_per_s: vLLM-CPU, same checkpoint and token ids, step by step like the engine",
             "mbu: bytes a step reads (weights, one embedding row per token, KV) / median step / "
             + (f"read bandwidth {bandwidth / 1e9:.1f} GB/s (streaming read of 2 GiB on every core, "
                f"best of the start and the end of the run: {_gbs(bandwidths)})"
                if bandwidth else "read bandwidth (its measurement failed: no mbu)")]
    return {"results": results, "notes": notes, "model_parameters": spec.num_parameters,
            "read_gb_per_s": bandwidth / 1e9 if bandwidth else None,
            "read_gb_per_s_start_end": [b / 1e9 if b else None for b in bandwidths]}


def _gbs(bandwidths: list[float | None]) -> str:
    return " and ".join("failed" if b is None else f"{b / 1e9:.1f}" for b in bandwidths) + " GB/s"


def _keep_best(best: dict, batch: int, latency: float, rate: float) -> None:
    old_latency, old_rate = best.get(batch, (float("inf"), 0.0))
    best[batch] = (min(old_latency, latency), max(old_rate, rate))


def step_bytes(spec: ModelSpec, batch: int, steps: int, dtype: str) -> int:
    """Bytes the median measured decode step reads: the measured steps produce tokens 3 .. steps+2,
    attending over 18 .. steps+17 tokens each (prompt 16)."""
    return step_read_bytes(spec, [PROMPT_LEN + 2 + steps // 2] * batch, dtype)


def row(spec: ModelSpec, key: tuple[int, int, str], batch: int, eng: tuple[float, float],
        base: tuple[float, float], steps: int) -> dict:
    (tp, pp, dtype), (latency, tps), (base_latency, base_tps) = key, eng, base
    read = step_bytes(spec, batch, steps, dtype)
    out = {"tp": tp, "pp": pp, "dtype": dtype, "batch": batch, "latency_s": latency, "tokens_per_s": tps,
           "baseline_latency_s": base_latency, "baseline_tokens_per_s": base_tps,
           "overhead": latency / base_latency, "throughput_overhead": base_tps / tps, "read_bytes": read}
    return out


def _vllm_columns(ours: dict, vllm: tuple[float, float]) -> dict:
    latency, rate = vllm
    return {"vllm_latency_s": latency, "vllm_tokens_per_s": rate, "vs_vllm": ours["tokens_per_s"] / rate,
            "latency_vs_vllm": ours["latency_s"] / latency}


if __name__ == "__main__":
    import sys

    from benchmarks.runner import main

    sys.exit(main("decode", "--quick" in sys.argv, "--json" in sys.argv,
                  {"mixed": "--mixed" in sys.argv, "no_vllm": "--no-vllm" in sys.argv}))
