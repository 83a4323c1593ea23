"""examples/job-file-reference.md is what the pydantic models say, and every example job file
is a valid job of its kind."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardwright.api.job_reference import REFERENCE, render, rows
from shardwright.config import InferenceDeployment, TrainingJob, parse_job

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_committed_reference_is_current():
    assert REFERENCE.read_text() == render(), "regenerate it: python -m shardwright.api.job_reference"


def test_the_reference_names_every_field_of_both_kinds_with_nesting():
    names = {r[0] for r in rows(InferenceDeployment)}
    assert {"engine.pool.peers", "layout.tp", "model", "engine.num_blocks"} <= names
    assert {r[0] for r in rows(TrainingJob)} >= {"model.preset", "layout.dp", "train"}
    required = {r[0] for r in rows(InferenceDeployment) if r[2] == "required"}
    assert required == {"name", "model"}


@pytest.mark.parametrize("name, kind", [("deployment.yaml", "inference"), ("train_tiny.yaml", "training"),
                                        ("train_moe_ep.yaml", "training")])
def test_example_job_files_are_valid(name, kind):
    job = parse_job((EXAMPLES / name).read_text())
    assert job.kind == kind
