"""Fixtures of the training tests: two small models, the single-process reference run, and one
gloo launch per layout shared by every test that reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

import train_cases
from model_helpers import tiny_spec
from shardwright.config import ParallelLayout
from shardwright.models.random_init import write_random_checkpoint
from shardwright.parallel.launch import run_ranks
from train_cases import LAYOUTS, MODEL_SHAPES


@pytest.fixture(scope="session")
def train_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("train-models")
    return {name: str(write_random_checkpoint(root / name, tiny_spec(**shape), seed=i))
            for i, (name, shape) in enumerate(MODEL_SHAPES.items())}


@pytest.fixture(scope="session")
def reference(train_models, tmp_path_factory) -> tuple[Path, dict]:
    """(checkpoint root, results) of the single-process run (tp = pp = dp = 1, m = 4)."""
    root = tmp_path_factory.mktemp("train-ref")
    return root, train_cases.layout_main(0, 1, ParallelLayout(), train_models, str(root))


@pytest.fixture(scope="session")
def layout_run(train_models, reference, tmp_path_factory):
    """key -> (checkpoint root, rank-0 results, all ranks' results); one launch per layout."""
    cache: dict[str, tuple[Path, dict, list]] = {}
    ref_root = reference[0]

    def get(key: str) -> tuple[Path, dict, list]:
        if key not in cache:
            layout = LAYOUTS[key]
            extras = {"gpipe": key == "pp2",
                      "reshard_from": {n: str(ref_root / n / "step-00000010") for n in train_models}
                      if key == "tp2pp2" else {}}
            root = tmp_path_factory.mktemp(f"train-{key}")
            by_rank = run_ranks(train_cases.layout_main, layout.world_size,
                                args=(layout, train_models, str(root), extras))
            cache[key] = (root, by_rank[0], by_rank)
        return cache[key]

    return get
