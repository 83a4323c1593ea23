"""Each TP rank reads only its slice: peak memory while loading a tp = 4 checkpoint is measured.

The checkpoint is ~220 MB of fp32 (6 layers of width 768); a rank's shard is ~1/4 of it. The acceptance bound is a
quarter of the checkpoint plus one layer (the largest single read a rank makes while its file
pages are mapped is one tensor, and one layer holds every tensor of that size).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import tp_cases
from model_helpers import tiny_spec
from shardwright.models.random_init import write_random_checkpoint
from shardwright.parallel.launch import run_ranks

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="reads the kernel's VmHWM from /proc (Linux only)"
)


def test_tp4_rank_peak_memory_is_a_quarter_plus_one_layer(tmp_path):
    spec = tiny_spec("llama", vocab_size=8192, hidden_size=768, intermediate_size=2048, num_layers=6,
                     num_heads=12, num_kv_heads=12, head_dim=64)
    directory = write_random_checkpoint(tmp_path / "big", spec, seed=0)
    full = (Path(directory) / "model.safetensors").stat().st_size
    h, f = spec.hidden_size, spec.intermediate_size
    layer = 4 * (4 * h * h + 3 * h * f + 2 * h)
    results = run_ranks(tp_cases.run_load_memory, 4, args=(str(directory),))
    for rank, r in enumerate(results):
        print(f"rank {rank}: added {r['added_bytes'] / 2**20:.1f} MiB, shard {r['local_param_bytes'] / 2**20:.1f} MiB")
        # The shard itself is a quarter of the weights (tied=False: embed + head both split).
        assert abs(r["local_param_bytes"] - full / 4) < 0.02 * full, r
        assert r["added_bytes"] <= full / 4 + layer, (
            f"rank {rank} added {r['added_bytes'] / 2**20:.1f} MiB while loading; bound "
            f"{(full / 4 + layer) / 2**20:.1f} MiB (checkpoint {full / 2**20:.1f} MiB)"
        )
