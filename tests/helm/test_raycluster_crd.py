"""The rendered RayCluster validates against KubeRay's CRD schema (../shared/schemas/kuberay/),
and the validation is strict enough to catch a broken one."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest

from chart_render import CASES
from kube_openapi import error_messages, load_crd_schema, strict_validator, to_json_schema

# The project's shared/ folder beside the checkout (a worktree sits one level deeper, /work/wt/NAME).
CRD_DIR = next((d for d in (p / "shared" / "schemas" / "kuberay" for p in Path(__file__).resolve().parents[2].parents)
                if d.is_dir()), Path(__file__).resolve().parents[2].parent / "shared" / "schemas" / "kuberay")
CRD_FILE = CRD_DIR / "ray.io_rayclusters.yaml"

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed (pip install jsonschema)")


@pytest.fixture(scope="module")
def validator():
    if not CRD_FILE.is_file():
        pytest.skip(f"KubeRay CRD not found at {CRD_FILE}; the project's shared/schemas/kuberay/ holds it")
    return strict_validator(load_crd_schema(CRD_FILE, "v1"), "ray.io/v1", "RayCluster")


@pytest.mark.parametrize("case", CASES)
def test_rendered_raycluster_matches_the_crd(renders, validator, case):
    assert error_messages(validator, renders[case].one("RayCluster")) == []


def _worker(rc: dict) -> dict:
    return rc["spec"]["workerGroupSpecs"][0]


def _server(rc: dict) -> dict:
    return rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][1]


BREAKAGES: dict[str, tuple[Callable[[dict], object], str]] = {
    "group-without-name": (lambda rc: _worker(rc).pop("groupName"), "'groupName' is a required property"),
    "misspelt-field": (lambda rc: _worker(rc).update(replica=2), "'replica' was unexpected"),
    "string-for-int32": (lambda rc: _worker(rc).update(minReplicas="one"), "is not of type 'integer'"),
    "int32-overflow": (lambda rc: _worker(rc).update(maxReplicas=2**31), "is not a 'int32'"),
    "container-without-name": (lambda rc: _server(rc).pop("name"), "'name' is a required property"),
    "duplicate-containers": (lambda rc: rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"].append(
        copy.deepcopy(_server(rc))), "same map keys"),
    "quantity-as-list": (lambda rc: _server(rc)["resources"]["limits"].update(memory=[4]), "memory"),
    "probe-port-as-text": (lambda rc: _server(rc)["readinessProbe"]["grpc"].update(port="50051"),
                           "is not of type 'integer'"),
    "wrong-kind": (lambda rc: rc.update(kind="RayClusters"), "is not one of ['RayCluster']"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_raycluster_fails_validation(renders, validator, breakage):
    rc = copy.deepcopy(renders["default"].one("RayCluster"))
    mutate, needle = BREAKAGES[breakage]
    mutate(rc)
    messages = error_messages(validator, rc)
    assert any(needle in m for m in messages), messages


def test_int_or_string_admits_both_and_nothing_else():
    schema = to_json_schema({"type": "object", "properties": {"cpu": {
        "x-kubernetes-int-or-string": True, "pattern": "^[0-9]+m?$"}}})
    check = jsonschema.Draft4Validator(schema)
    assert [check.is_valid({"cpu": v}) for v in (4, "500m", "4")] == [True, True, True]
    assert [check.is_valid({"cpu": v}) for v in (1.5, [4], "lots", None)] == [False, False, False, False]
    assert not check.is_valid({"cpu": 4, "gpu": 1})  # unknown fields are refused
