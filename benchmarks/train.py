"""Training throughput and MFU of TrainerRank at four layouts beside a bare torch loop.

Run: `shardwright bench train [--quick] [--json]` from a source checkout.

Model: a ~3M-parameter Llama (byte vocabulary, width 256, 4 layers, GQA 8/4 heads), fp32, random
weights written once to a cache directory; data: the bundled corpus (examples/corpus), 128-token
sequences, global batch 16, m = 4 micro-batches. For each layout (tp, pp, dp) in (1,1,1), (2,1,1),
(1,2,1), (1,1,2), TrainerRank runs in a gloo world started with torch.multiprocessing (the
machine's cores split evenly among the ranks). Both sides report the best per-step tokens/s over
the steps after warm-up (as `timeit` takes the minimum time): on a shared 2-core machine other
tenants' bursts slow single steps by up to 5x, the 2-thread baseline most of all.
The baseline, measured in the same run just before each layout (other tenants' load on a shared
machine drifts), is a bare single-process loop on the same model and the same global batches:
one forward of the whole batch, F.cross_entropy, backward, AdamW step.

MFU = 6 * N * tokens/s / PEAK_FLOPS, with PEAK_FLOPS the whole machine's peak (150 GFLOP/s for the
2-core CI machine). bubble_measured is the pipeline's idle fraction averaged over ranks and steps
(idle / total per stage, from timestamps), beside the formula (p - 1) / (m + p - 1).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.runner import measure_point
from shardwright.config import ModelSource, ModelSpec, ParallelLayout

COLUMNS = ["tp", "pp", "dp", "cp", "offload", "tokens_per_s", "baseline_tokens_per_s", "ratio", "mfu",
           "baseline_mfu", "bubble_measured", "bubble_formula", "optimizer_device_bytes", "optimizer_host_bytes"]
PEAK_FLOPS = 150e9
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]
# Beyond the four layouts: context parallelism, and optimizer-state offload (share of the blocks
# whose AdamW state lives in host memory) at (1,1,1): the memory / throughput trade-off.
EXTRA = [dict(cp=2), dict(offload=0.5), dict(offload=1.0)]
CORPUS = Path(__file__).resolve().parents[1] / "examples" / "corpus"
SPEC = dict(architecture="llama", vocab_size=256, hidden_size=256, intermediate_size=688, num_layers=4,
            num_heads=8, num_kv_heads=4, head_dim=32, max_position_embeddings=512, norm_eps=1e-5)


def model_dir() -> Path:
    """The benchmark model, written on first use (random weights: speed does not depend on them)."""
    from shardwright.models.random_init import write_random_checkpoint

    root = Path(os.environ.get("SHARDWRIGHT_BENCH_DIR", Path.home() / ".cache" / "shardwright" / "bench"))
    directory = root / "train-llama-3m"
    if not (directory / "model.safetensors").is_file():
        write_random_checkpoint(directory, ModelSpec(**SPEC), seed=0)
    return directory


def train_config(peak: float = PEAK_FLOPS, offload: float = 0.0):
    from shardwright.training.data import DataConfig
    from shardwright.training.optim import OptimConfig
    from shardwright.training.trainer import TrainConfig

    return TrainConfig(data=DataConfig(path=CORPUS, seq_len=128, global_batch_size=16),
                       optim=OptimConfig(lr=1e-3, warmup_steps=2, decay_steps=100),
                       num_micro_batches=4, peak_flops_per_s=peak, offload_optimizer=offload)


def rank_main(rank: int, world_size: int, layout: ParallelLayout, directory: str, warmup: int,
              steps: int, offload: float = 0.0) -> tuple[list[dict], dict]:
    """Metrics of the measured steps (every rank returns the same) and the optimizer's bytes."""
    from shardwright.training.trainer import TrainerRank

    trainer = TrainerRank(train_config(offload=offload), layout).start(ModelSource(path=directory))
    try:
        for _ in range(warmup):
            trainer.train_step()
        return [trainer.train_step() for _ in range(steps)], trainer.optimizer_bytes()
    finally:
        trainer.close()


def baseline(directory: Path, warmup: int, steps: int) -> float:
    """Best per-step tokens/s of a bare single-process loop on the same model and global batches."""
    from shardwright.models import load_model
    from shardwright.models.tokenizer import ByteTokenizer
    from shardwright.parallel.context import ParallelContext
    from shardwright.training.data import build_loader

    cfg = train_config()
    spec, model = load_model(directory, ParallelContext.single("cpu"))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = build_loader(cfg.data, ByteTokenizer(), spec.vocab_size)
    rates = []
    for i in range(warmup + steps):
        ids, targets = loader.next_batch()
        start = time.perf_counter()
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        loss = F.cross_entropy(model(ids, positions).flatten(0, 1), targets.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= warmup:
            rates.append(targets.numel() / (time.perf_counter() - start))
    return max(rates)


def measure(layout: ParallelLayout, directory: Path, warmup: int, steps: int, offload: float = 0.0) -> dict:
    from shardwright.parallel.launch import run_ranks

    metrics, optimizer = run_ranks(rank_main, layout.world_size,
                                   args=(layout, str(directory), warmup, steps, offload))[0]
    return {"tokens_per_s": max(m["tokens_per_s"] for m in metrics),
            "optimizer_device_bytes": optimizer["device"], "optimizer_host_bytes": optimizer["host"],
            "bubble_measured": sum(m["bubble_measured"] for m in metrics) / len(metrics),
            "bubble_formula": metrics[0]["bubble_formula"]}


def measure_beside_baseline(layout: ParallelLayout, directory: Path, warmup: int, steps: int,
                            offload: float) -> dict:
    """One point: the baseline just before the layout (other tenants' load on the machine drifts)."""
    base = baseline(directory, warmup, steps)
    got = measure(layout, directory, warmup, steps, offload)
    return {**got, "baseline_tokens_per_s": base, "ratio": got["tokens_per_s"] / base}


def run(quick: bool) -> dict:
    directory = model_dir()
    spec = ModelSpec(**SPEC)
    warmup, steps = (2, 5) if quick else (3, 12)
    flops_per_token = 6 * spec.num_parameters
    results = []
    cases = [dict(tp=tp, pp=pp, dp=dp) for tp, pp, dp in LAYOUTS] + EXTRA
    for case in cases:
        offload = case.get("offload", 0.0)
        layout = ParallelLayout(**{k: v for k, v in case.items() if k != "offload"})
        point = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "cp": layout.cp, "offload": offload}
        got = measure_point(point, measure_beside_baseline, layout, directory, warmup, steps, offload)
        if got is not None:
            results.append({**point, **got,
                            "mfu": got["tokens_per_s"] * flops_per_token / PEAK_FLOPS,
                            "baseline_mfu": got["baseline_tokens_per_s"] * flops_per_token / PEAK_FLOPS})
    notes = [f"model: {spec.num_parameters / 1e6:.1f}M parameters fp32, seq 128, global batch 16, m = 4; "
             f"best of {steps} measured steps after {warmup} warm-up; {os.cpu_count()} cores shared by the ranks",
             f"MFU = 6 * N * tokens/s / {PEAK_FLOPS / 1e9:.0f} GFLOP/s (whole-machine peak); "
             "ratio = tokens/s / baseline tokens/s",
             "offload = share of the decoder blocks whose AdamW state (and fp32 master) lives in host memory; "
             "on this CPU machine host and device are the same memory, so the row shows the cost of the copies "
             "and the overlap, and the device bytes it frees"]
    return {"results": results, "notes": notes, "model_parameters": spec.num_parameters}


if __name__ == "__main__":
    import sys

    from benchmarks.runner import main

    sys.exit(main("train", "--quick" in sys.argv, "--json" in sys.argv))
