"""Rank functions for the mixture-of-experts training tests (module level, so `spawn` can import them)."""

from __future__ import annotations

from pathlib import Path

from shardwright.config import ModelSource, ParallelLayout
from shardwright.training.data import DataConfig
from shardwright.training.optim import OptimConfig
from shardwright.training.trainer import TrainConfig, TrainerRank

CORPUS = Path(__file__).resolve().parents[2] / "examples" / "corpus"
STEPS = 4


def train_config(num_micro_batches: int, aux: float | None = None) -> TrainConfig:
    """A global batch of 4 sequences of 32 bytes; clipping active."""
    return TrainConfig(data=DataConfig(path=CORPUS, seq_len=32, global_batch_size=4, seed=3),
                       optim=OptimConfig(lr=3e-3, warmup_steps=1, decay_steps=STEPS, max_grad_norm=0.5),
                       steps=STEPS, num_micro_batches=num_micro_batches, router_aux_loss_coef=aux)


def run_training(rank: int, world_size: int, layout: dict, model_dir: str, num_micro_batches: int,
                 aux: float | None = None, save_root: str | None = None) -> list[dict]:
    """STEPS optimizer steps at ParallelLayout(**layout): every step's metrics; then a checkpoint
    under `save_root` when given."""
    t = TrainerRank(train_config(num_micro_batches, aux), ParallelLayout(**layout))
    t.start(ModelSource(path=model_dir), device="cpu")
    try:
        metrics = [t.train_step() for _ in range(STEPS)]
        if save_root is not None:
            t.save(save_root)
        return metrics
    finally:
        t.close()
