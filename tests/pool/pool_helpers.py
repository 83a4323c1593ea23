"""Shared by the pooling tests: serving limits small enough that layers dominate a rank's bytes."""

from __future__ import annotations

from shardwright.actors.engine import EngineConfig, resident_need
from shardwright.config import ModelSpec, ParallelLayout, PoolOptions

LIMITS = dict(block_size=16, num_blocks=16, max_tokens_per_step=32, max_running=4)


def config(model_dir, tp: int = 1, pp: int = 1, **pool) -> EngineConfig:
    return EngineConfig(model_dir=model_dir, layout=ParallelLayout(tp=tp, pp=pp), pool=PoolOptions(**pool),
                        **LIMITS)


def half_budget(model_dir, tp: int = 1, pp: int = 1) -> int:
    """Half of what the most demanding rank needs with every layer resident."""
    cfg = config(model_dir, tp, pp)
    spec = ModelSpec.from_hf_dir(model_dir)
    needs = (resident_need(spec, cfg, r) for r in range(tp * pp))
    return max(fixed + sum(layers) for fixed, layers in needs) // 2
