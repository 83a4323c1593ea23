"""Shared fixtures: small checkpoints in Hugging Face layout, and the path of ../shared."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model_helpers import tiny_spec
from shardwright.models.random_init import write_random_checkpoint

@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random checkpoints of both families, GQA variants, tied/untied, sharded files."""
    root = tmp_path_factory.mktemp("ckpt")
    specs = {
        "llama": tiny_spec("llama"),
        "llama_gqa": tiny_spec("llama", num_kv_heads=2, attention_bias=True),
        "llama_mqa_tied": tiny_spec("llama", num_kv_heads=1, tie_word_embeddings=True),
        "gpt2": tiny_spec("gpt2"),
    }
    out = {}
    for i, (name, spec) in enumerate(specs.items()):
        out[name] = write_random_checkpoint(root / name, spec, seed=i, std=0.2,
                                            num_shards=2 if name == "llama_gqa" else 1)
    return out


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray instance with 4 logical GPUs (no GPU needed: workers use CPU and gloo).

    Shared by the session; module-scoped so that it starts again after a module that ran its own
    multi-node cluster (ray.cluster_utils.Cluster) and shut Ray down. Ray stops at exit.
    """
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    return ray


@pytest.fixture(scope="session", autouse=True)
def no_local_ray_head_left(tmp_path_factory):
    """After the session: no local Ray head that `serve` started under a test's temporary folder may
    still run (it would hold ports and cores after the tests). Any found is stopped, and reported as
    an error: the test that left it is the defect."""
    yield
    from shardwright.cluster.local_head import HEAD_FILE, stop_head

    left = [record.parent for record in tmp_path_factory.getbasetemp().rglob(HEAD_FILE)]
    stopped = [(state_dir, head) for state_dir in left if (head := stop_head(state_dir)) is not None]
    if stopped:
        pytest.fail("tests left local Ray heads running (now stopped): "
                    + ", ".join(f"pid {head.pid} in {state_dir}" for state_dir, head in stopped))
