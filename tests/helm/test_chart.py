"""The Helm chart, through the real `helm`: lint passes and `helm template` renders, for the defaults
and every example in helm/shardwright/ci/, the objects the design promises, wired to each other:
the RayCluster's head and GPU worker groups, the gRPC server and its Service, Redis (bundled or
external), the token and TLS secrets, the gRPC health probes and the `helm test` hook.

Run: python scripts/install_helm.py && python -m pytest tests/helm -q
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from chart_render import CASES, CHART, NAMESPACE, RELEASE, Rendered

SERVER_SVC = f"{RELEASE}-shardwright"
REDIS = f"{RELEASE}-shardwright-redis"
# Secrets that the ci/ examples reference but the chart does not create (made by the operator).
EXISTING_SECRETS = {"tls": {"shardwright-server-tls", "shardwright-client-ca", "shardwright-tokens"},
                    "external-redis": {"shardwright-server-tls"}}


def head_pod(r: Rendered) -> dict[str, Any]:
    return r.one("RayCluster")["spec"]["headGroupSpec"]["template"]


def server(r: Rendered) -> dict[str, Any]:
    (found,) = [c for c in head_pod(r)["spec"]["containers"] if c["name"] == "shardwright-server"]
    return found


def env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def secret_value(r: Rendered, ref: dict[str, str]) -> str:
    return r.one("Secret", ref["name"])["stringData"][ref["key"]]


def test_the_values_cases_are_the_documented_ones():
    assert set(CASES) == {"default", "gpu", "external-redis", "tls"}


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_passes_strictly(helm, case):
    done = helm.run("lint", "--strict", str(CHART), values=CASES[case])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 chart(s) failed" in done.stdout
    assert "[WARNING]" not in done.stdout and "[ERROR]" not in done.stdout, done.stdout


@pytest.mark.parametrize("case", CASES)
def test_one_resource_per_template(renders, case):
    sources = renders[case].sources
    assert len(sources) == len(set(sources)), sources


def test_default_renders_cluster_server_redis_and_test_pod(renders):
    r = renders["default"]
    assert sorted(d["kind"] for d in r.docs) == ["NetworkPolicy"] * 3 + [
        "PersistentVolumeClaim", "Pod", "RayCluster", "Secret", "Service", "Service", "StatefulSet"]
    rc = r.one("RayCluster")
    assert rc["apiVersion"] == "ray.io/v1" and rc["spec"]["rayVersion"] == "2.60.0"
    # KubeRay runs `ray start` in the first container; the server must come second.
    assert [c["name"] for c in head_pod(r)["spec"]["containers"]] == ["ray-head", "shardwright-server"]
    (group,) = rc["spec"]["workerGroupSpecs"]
    assert (group["groupName"], group["replicas"], group["minReplicas"], group["maxReplicas"]) == ("gpu", 1, 0, 4)
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in worker["resources"]["requests"]  # Kubernetes copies the limit
    assert group["template"]["spec"]["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def test_server_command_args_and_probes_by_default(renders):
    srv = server(renders["default"])
    assert srv["command"] == ["shardwright", "serve"]
    # Auth is off by default: the API on loopback (the server refuses 0.0.0.0 without tokens),
    # health on a port of its own that the kubelet can reach.
    # Metrics on a port of their own, on all interfaces (tests/helm/test_chart_metrics.py).
    assert srv["args"] == ["--host", "127.0.0.1", "--port", "50051", "--health-port", "50052",
                           "--health-host", "0.0.0.0", "--metrics-port", "9464", "--metrics-host", "0.0.0.0"]
    assert srv["ports"] == [{"name": "grpc", "containerPort": 50051, "protocol": "TCP"},
                            {"name": "health", "containerPort": 50052, "protocol": "TCP"},
                            {"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert srv[probe]["grpc"] == {"port": 50052}, probe
    assert (srv["startupProbe"]["failureThreshold"], srv["livenessProbe"]["periodSeconds"]) == (60, 20)
    assert env(srv)["RAY_ADDRESS"]["value"] == "127.0.0.1:6379"
    # /tmp/ray is shared with ray-head; /tmp because the root filesystem is read-only.
    assert {m["mountPath"] for m in srv["volumeMounts"]} == {"/tmp", "/tmp/ray", "/var/lib/shardwright"}


@pytest.mark.parametrize("case", CASES)
def test_service_routes_to_the_server_and_nothing_else(renders, case):
    r = renders[case]
    selector = r.one("Service", SERVER_SVC)["spec"]["selector"].items()
    assert selector <= head_pod(r)["metadata"]["labels"].items()
    for group in r.one("RayCluster")["spec"]["workerGroupSpecs"]:  # API pods (server.replicas > 1) only
        selected = selector <= group["template"]["metadata"]["labels"].items()
        assert selected == (group["groupName"] == "api"), group["groupName"]
    container_ports = {p["name"] for p in server(r)["ports"]}
    service_ports = r.one("Service", SERVER_SVC)["spec"]["ports"]
    assert {p["targetPort"] for p in service_ports} == container_ports
    assert [p["port"] for p in service_ports if p["name"] == "grpc"] == [50051]


@pytest.mark.parametrize("case", CASES)
def test_probes_call_grpc_health_on_a_plaintext_port(renders, case):
    srv = server(renders[case])
    tls, auth = "SHARDWRIGHT_TLS_CERT" in env(srv), "SHARDWRIGHT_TOKENS_FILE" in env(srv)
    ports = {p["name"]: p["containerPort"] for p in srv["ports"]}
    health = ports.get("health", ports["grpc"])
    # The kubelet's gRPC probe cannot speak TLS nor reach the loopback port of a server without auth:
    # then health must be a port of its own, on every interface.
    assert (health != ports["grpc"]) == (tls or not auth)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(srv[probe]) - {"periodSeconds", "timeoutSeconds", "failureThreshold"} == {"grpc"}
        assert srv[probe]["grpc"]["port"] == health
    if health != ports["grpc"]:
        assert srv["args"][4:8] == ["--health-port", str(health), "--health-host", "0.0.0.0"]


@pytest.mark.parametrize("case", CASES)
def test_the_real_serve_command_accepts_the_rendered_arguments(renders, case):
    """The rendered args parse with `shardwright serve`'s own parser and pass its listen check
    (it refuses to start on a non-loopback host without tokens, or with tokens but without TLS
    unless --insecure)."""
    from shardwright.api.cli import build_parser
    from shardwright.api.server import check_listen

    srv = server(renders[case])
    assert srv["command"][0] == "shardwright"
    args = build_parser().parse_args([*srv["command"][1:], *srv["args"]])
    assert args.func.__name__ == "cmd_serve" and args.port == 50051
    check_listen(args.host, authenticated="SHARDWRIGHT_TOKENS_FILE" in env(srv),
                 tls="SHARDWRIGHT_TLS_CERT" in env(srv), insecure=args.insecure)
    if args.health_port is not None:
        assert args.health_host == "0.0.0.0" and args.health_port != args.port


@pytest.mark.parametrize("case", CASES)
def test_redis_url_reaches_the_store(renders, case):
    r = renders[case]
    url_env = env(server(r))["SHARDWRIGHT_REDIS_URL"]
    url = url_env.get("value") or secret_value(r, url_env["valueFrom"]["secretKeyRef"])
    parsed = urlsplit(url)
    if parsed.password:
        assert "value" not in url_env, "a URL with a password must come from a Secret"
    if case == "external-redis":
        assert url == r.values["redis"]["external"]["url"]
        assert not r.all("StatefulSet") and REDIS not in r.names("Service")
        return
    sts, svc = r.one("StatefulSet", REDIS), r.one("Service", parsed.hostname)
    pod_labels = sts["spec"]["template"]["metadata"]["labels"].items()
    assert parsed.port == svc["spec"]["ports"][0]["port"] == 6379
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"].items() <= pod_labels
    assert sts["spec"]["selector"]["matchLabels"].items() <= pod_labels
    (redis,) = sts["spec"]["template"]["spec"]["containers"]
    assert "ping" in " ".join(redis["readinessProbe"]["exec"]["command"])
    # The bundled Redis always has a password (given or generated); it reads it from a config file
    # of the Secret, so that it appears in no process's arguments.
    assert parsed.password and len(parsed.password) >= 16
    assert redis["args"][0] == "/etc/redis/redis.conf" and "--requirepass" not in redis["args"]
    (mount,) = [m for m in redis["volumeMounts"] if m["mountPath"] == "/etc/redis"]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    conf = secret_value(r, {"name": volumes[mount["name"]]["secret"]["secretName"], "key": "redis.conf"})
    assert conf == f"requirepass {parsed.password}\n"
    assert secret_value(r, env(redis)["REDISCLI_AUTH"]["valueFrom"]["secretKeyRef"]) == parsed.password


def test_bundled_redis_keeps_its_data_on_a_claim(renders):
    for case, size, storage_class in (("default", "8Gi", None), ("tls", "20Gi", "fast-ssd")):
        sts = renders[case].one("StatefulSet", REDIS)
        (claim,) = sts["spec"]["volumeClaimTemplates"]
        assert claim["spec"]["resources"]["requests"]["storage"] == size
        assert claim["spec"].get("storageClassName") == storage_class
        (redis,) = sts["spec"]["template"]["spec"]["containers"]
        assert {"name": "data", "mountPath": "/data"} in redis["volumeMounts"]
        assert redis["args"][1:] == ["--dir", "/data", "--appendonly", "yes", "--appendfsync", "always"]


@pytest.mark.parametrize("case", CASES)
def test_every_file_the_server_is_given_is_mounted(renders, case):
    r = renders[case]
    pod = head_pod(r)["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    for container in pod["containers"]:
        assert {m["name"] for m in container.get("volumeMounts", [])} <= volumes.keys(), container["name"]
    srv = server(r)
    paths = [e["value"] for e in env(srv).values() if e.get("value", "").startswith("/etc/shardwright/")]
    for path in map(PurePosixPath, paths):
        (mount,) = [m for m in srv["volumeMounts"] if m["mountPath"] == str(path.parent)]
        secret = volumes[mount["name"]]["secret"]
        items = {item["path"]: item["key"] for item in secret["items"]}
        assert path.name in items, path
        if secret["secretName"] in r.names("Secret"):
            assert items[path.name] in r.one("Secret", secret["secretName"])["stringData"]
        else:
            assert secret["secretName"] in EXISTING_SECRETS.get(case, set()), secret["secretName"]


@pytest.mark.parametrize(("case", "expected"), [
    ("default", {"SHARDWRIGHT_STATE_DIR"}),
    ("gpu", {"SHARDWRIGHT_STATE_DIR"}),
    ("external-redis", {"SHARDWRIGHT_STATE_DIR", "SHARDWRIGHT_TOKENS_FILE", "SHARDWRIGHT_TLS_CERT", "SHARDWRIGHT_TLS_KEY"}),
    ("tls", {"SHARDWRIGHT_STATE_DIR", "SHARDWRIGHT_TOKENS_FILE", "SHARDWRIGHT_TLS_CERT", "SHARDWRIGHT_TLS_KEY", "SHARDWRIGHT_TLS_CLIENT_CA"}),
])
def test_auth_and_tls_settings_reach_the_server(renders, case, expected):
    names = set(env(server(renders[case]))) - {"RAY_ADDRESS", "SHARDWRIGHT_REDIS_URL"}
    assert names == expected


def test_gpu_values_make_two_gpu_groups_on_their_nodes(renders):
    rc = renders["gpu"].one("RayCluster")
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    assert rc["spec"]["headGroupSpec"]["rayStartParams"] == {"dashboard-host": "127.0.0.1", "num-cpus": "0"}
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert list(groups) == ["h100x8", "l4x1"]
    h100, l4 = groups["h100x8"], groups["l4x1"]
    assert (h100["replicas"], h100["minReplicas"], h100["maxReplicas"]) == (2, 1, 4)
    assert (l4["replicas"], l4["minReplicas"], l4["maxReplicas"]) == (0, 0, 8)
    assert h100["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert l4["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert h100["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-h100-80gb", "node-pool": "h100"}
    assert l4["template"]["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    assert {t["key"] for t in h100["template"]["spec"]["tolerations"]} == {"nvidia.com/gpu", "dedicated"}
    assert l4["rayStartParams"] == {"num-cpus": "8"}  # a number in values, a string for the CRD
    assert h100["template"]["metadata"]["labels"]["team"] == "inference"
    assert h100["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "ray-worker"
    (shm,) = [v for v in h100["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "64Gi"}
    assert head_pod(renders["gpu"])["spec"]["nodeSelector"] == {"node-pool": "system"}


def test_tenants_secret_is_the_tenants_format_the_server_reads(renders, tmp_path):
    """auth.tenants as given (roots, priority, quotas), auth.tokens as tokens of an unconfined
    tenant with max_priority serving; the server's own loader reads the file to those policies."""
    from shardwright.tenants import load_tenants

    secret = renders["external-redis"].one("Secret", f"{RELEASE}-shardwright-auth")
    path = tmp_path / "tokens.yaml"
    path.write_text(secret["stringData"]["tokens.yaml"])
    policies = {p.name: p for p in load_tenants(path)}
    a, b = policies["team-a"], policies["team-b"]
    assert (a.tokens, [str(r) for r in a.roots], a.max_priority, a.quota_gpus, a.max_jobs) == (
        ["team-a-token-0123456789abcdef"], ["/models/team-a", "/models/shared"], "serving", 8, 20)
    assert (b.tokens, b.roots, b.max_priority, b.quota_gpus) == (["team-b-token-fedcba9876543210"], None,
                                                                  "serving", None)


def test_a_token_listed_under_two_tenants_is_refused(helm):
    token = "shared-token-0123456789"
    values = {"auth": {"enabled": True, "tenants": {"a": {"tokens": [token]}},
                       "tokens": [{"tenant": "b", "token": token}]}, "insecure": True}
    done = helm.template(values)
    assert done.returncode != 0 and "a token is listed twice" in done.stderr


def test_tls_from_values_creates_the_secrets(helm):
    cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    key = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
    r = helm.render({"tls": {"enabled": True, "cert": cert, "key": key,
                             "clientCA": {"enabled": True, "cert": cert}}})
    tls = r.one("Secret", f"{RELEASE}-shardwright-tls")
    assert tls["type"] == "kubernetes.io/tls"
    assert tls["stringData"] == {"tls.crt": cert, "tls.key": key}
    assert r.one("Secret", f"{RELEASE}-shardwright-client-ca")["stringData"] == {"ca.crt": cert}
    secrets = {v["secret"]["secretName"] for v in head_pod(r)["spec"]["volumes"] if "secret" in v}
    assert secrets == {f"{RELEASE}-shardwright-tls", f"{RELEASE}-shardwright-client-ca"}


@pytest.mark.parametrize(("case", "port"), [("default", 50052), ("external-redis", 50052), ("tls", 50052)])
def test_helm_test_hook_calls_the_health_check(renders, case, port):
    r = renders[case]
    pod = r.one("Pod", f"{RELEASE}-shardwright-test-health")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert pod["spec"]["restartPolicy"] == "Never"
    address = f"{SERVER_SVC}.{NAMESPACE}.svc:{port}"
    assert pod["spec"]["containers"][0]["command"] == ["shardwright", "health", "--address", address]
    assert port in [p["port"] for p in r.one("Service", SERVER_SVC)["spec"]["ports"]]


def test_notes_say_how_to_reach_the_api(helm):
    done = helm.run("install", RELEASE, str(CHART), "--namespace", NAMESPACE, "--dry-run=client")
    assert done.returncode == 0, done.stderr
    notes = done.stdout.split("NOTES:", 1)[1]
    assert f"kubectl -n {NAMESPACE} port-forward svc/{SERVER_SVC} 50051:50051" in notes
    assert "shardwright status --address localhost:50051" in notes
    assert f"helm test {RELEASE}" in notes


def test_kubernetes_before_grpc_probes_is_refused(helm):
    old = helm.template(None, "--kube-version", "1.23.0")
    assert old.returncode != 0 and "kubeVersion" in old.stderr
    assert helm.template(None, "--kube-version", "1.24.0").returncode == 0
