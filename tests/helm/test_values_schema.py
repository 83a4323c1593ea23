"""Bad values are refused by helm before anything is applied: values.schema.json catches types,
enums, minimums and unknown keys; the chart's own checks catch what JSON Schema cannot say."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from chart_render import CHART

SCHEMA_ERROR = "values don't meet the specifications of the schema"
GROUP = {"name": "gpu", "replicas": 1, "minReplicas": 0, "maxReplicas": 4, "gpus": 1}


def groups(*changes: dict) -> dict:
    return {"ray": {"workerGroups": [GROUP | change for change in changes]}}


def test_the_baseline_of_the_bad_values_renders(helm):
    # Each case below changes one thing from these, so its failure is due to that change.
    for values in (groups({}), groups({"name": "a"}, {"name": "b"}), {"redis": {"mode": "bundled"}}):
        done = helm.template(values)
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("values", "needle"), [
    pytest.param(groups({"gpus": -1}), "gpus", id="negative-gpu-count"),
    pytest.param(groups({"replicas": "two"}), "replicas", id="replicas-not-an-integer"),
    pytest.param(groups({"gpu": 2}), "gpu", id="unknown-worker-group-key"),
    pytest.param(groups({"name": "GPU_Group"}), "name", id="group-name-not-a-dns-label"),
    pytest.param(groups({"resources": {"limits": {"nvidia.com/gpu": 2}}}), "resources", id="gpu-limit-by-hand"),
    pytest.param({"replicaCount": 3}, "replicaCount", id="unknown-top-level-key"),
    pytest.param({"ray": {"workerGroups": []}}, "workerGroups", id="no-worker-groups"),
    pytest.param({"server": {"port": 70000}}, "port", id="port-out-of-range"),
    pytest.param({"server": {"probes": {"readiness": {"periodSeconds": 0}}}}, "periodSeconds", id="zero-probe-period"),
    pytest.param({"image": {"pullPolicy": "Sometimes"}}, "pullPolicy", id="pull-policy-outside-enum"),
    pytest.param({"redis": {"mode": "sentinel"}}, "mode", id="redis-mode-outside-enum"),
    pytest.param({"redis": {"external": {"url": "redis.example:6379"}}}, "url", id="redis-url-without-scheme"),
    pytest.param({"redis": {"bundled": {"password": "p@ss/word"}}}, "password", id="redis-password-needing-escapes"),
    pytest.param({"auth": {"enabled": "yes"}}, "enabled", id="auth-enabled-not-a-boolean"),
    pytest.param({"auth": {"tokens": [{"tenant": "a", "token": "short"}]}}, "token", id="token-too-short"),
])
def test_schema_rejects(helm, values, needle):
    done = helm.template(values)
    assert done.returncode != 0, f"helm template accepted {values}"
    assert SCHEMA_ERROR in done.stderr and needle in done.stderr, done.stderr


@pytest.mark.parametrize(("values", "needle"), [
    pytest.param(groups({"replicas": 9}), "replicas=9 must lie within", id="replicas-above-max"),
    pytest.param(groups({}, {}), "is used twice", id="duplicate-group-names"),
    pytest.param({"redis": {"mode": "external"}}, "redis.mode=external needs", id="external-redis-without-url"),
    pytest.param({"auth": {"enabled": True}, "insecure": True}, "auth.enabled=true needs", id="auth-without-tokens"),
    pytest.param({"auth": {"enabled": True, "tokens": [{"tenant": "a", "token": "x" * 16},
                                                       {"tenant": "b", "token": "x" * 16}]}, "insecure": True},
                 "listed twice", id="one-token-two-tenants"),
    pytest.param({"tls": {"enabled": True}}, "tls.enabled=true needs", id="tls-without-certificate"),
    pytest.param({"tls": {"clientCA": {"enabled": True, "existingSecret": "ca"}}},
                 "needs tls.enabled=true", id="mutual-tls-without-tls"),
    pytest.param({"tls": {"enabled": True, "existingSecret": "t"}, "server": {"healthPort": 50051}},
                 "cannot speak TLS", id="tls-probes-on-the-tls-port"),
    pytest.param({"server": {"healthPort": 50051}}, "listens on 127.0.0.1 only", id="no-auth-probes-on-loopback"),
])
def test_chart_checks_reject(helm, values, needle):
    done = helm.template(values)
    assert done.returncode != 0, f"helm template accepted {values}"
    assert needle in done.stderr, done.stderr


def test_lint_rejects_bad_values_too(helm):
    done = helm.run("lint", str(CHART), values=groups({"gpus": -1}))
    assert done.returncode != 0
    assert "1 chart(s) failed" in done.stdout + done.stderr


# Maps whose entries are Kubernetes data rather than chart settings; their keys need no comment.
FREE_FORM = {"resources", "requests", "limits", "rayStartParams", "nodeSelector", "tolerations",
             "affinity", "labels", "annotations", "env", "commonLabels"}
KEY_LINE = re.compile(r"^(?P<indent>\s*(- )?)(?P<key>[A-Za-z][\w.-]*):")


def test_values_yaml_comments_every_setting():
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, str]] = []  # (indent, key) of the enclosing keys
    undocumented = []
    for number, line in enumerate(lines):
        match = KEY_LINE.match(line)
        if not match:
            continue
        indent = len(match["indent"])
        while parents and parents[-1][0] >= indent:
            parents.pop()
        previous = next((p.strip() for p in reversed(lines[:number]) if p.strip()), "")
        in_data = any(key in FREE_FORM for _, key in parents)
        if not in_data and not previous.lstrip("- ").startswith("#"):
            undocumented.append(f"line {number + 1}: {match['key']}")
        parents.append((indent, match["key"]))
    assert undocumented == [], "values.yaml keys without a comment above them"


def test_values_yaml_satisfies_its_schema():
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(values)]
    assert errors == []
