"""The chart is secure by default, over the rendered manifests of every values case: every pod runs
non-root under RuntimeDefault seccomp with all capabilities dropped; NetworkPolicies admit only the
API ports from outside and Ray/Redis traffic between the release's own pods; the bundled Redis has a
password (given or generated) that lives in a Secret and in no process's arguments, and fsyncs every
write; auth without TLS is refused unless `insecure: true`; the shared state volume is mounted on
the head and every worker with SHARDWRIGHT_STATE_DIR; a model-weights volume is mounted when given.
"""

from __future__ import annotations

from typing import Any

import pytest

from chart_render import CASES, RELEASE, Rendered
from test_chart import env, head_pod

SCHEMA_ERROR = "values don't meet the specifications of the schema"
STATE_DIR = "/var/lib/shardwright"


def pod_templates(r: Rendered) -> dict[str, dict[str, Any]]:
    """Every pod the release makes, by a readable name: head, each worker group, Redis, the test pod."""
    rc = r.one("RayCluster")["spec"]
    pods = {"head": rc["headGroupSpec"]["template"]}
    pods |= {f"worker:{g['groupName']}": g["template"] for g in rc["workerGroupSpecs"]}
    pods |= {f"statefulset:{s['metadata']['name']}": s["spec"]["template"] for s in r.all("StatefulSet")}
    pods |= {f"pod:{p['metadata']['name']}": p for p in r.all("Pod")}
    return pods


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and In/NotIn/Exists/DoesNotExist)."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for rule in selector.get("matchExpressions", []):
        key, op, values = rule["key"], rule["operator"], rule.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


@pytest.mark.parametrize("case", CASES)
def test_every_pod_and_container_has_the_security_context(renders, case):
    for name, pod in pod_templates(renders[case]).items():
        context = pod["spec"]["securityContext"]
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, name
        assert context["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for container in pod["spec"]["containers"]:
            where = f"{name}/{container['name']}"
            c = container["securityContext"]
            assert c["allowPrivilegeEscalation"] is False, where
            assert "ALL" in c["capabilities"]["drop"] and not c["capabilities"].get("add"), where
            assert isinstance(c["readOnlyRootFilesystem"], bool), where
            if not container["name"].startswith("ray-"):  # the server, Redis and the test pod
                assert c["readOnlyRootFilesystem"] is True, where


def test_read_only_ray_containers_get_a_writable_tmp(helm):
    r = helm.render({"securityContext": {"rayReadOnlyRootFilesystem": True}})
    for name, pod in pod_templates(r).items():
        volumes = {v["name"] for v in pod["spec"].get("volumes", [])}
        for container in pod["spec"]["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, name
            if container["name"].startswith("ray-"):
                (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert tmp["name"] in volumes, name


@pytest.mark.parametrize(("values", "needle"), [
    pytest.param({"securityContext": {"pod": {"runAsNonRoot": False}}}, "runAsNonRoot", id="root-allowed"),
    pytest.param({"securityContext": {"container": {"capabilities": {"drop": ["NET_RAW"]}}}}, "drop",
                 id="capabilities-not-all-dropped"),
    pytest.param({"securityContext": {"container": {"allowPrivilegeEscalation": True}}},
                 "allowPrivilegeEscalation", id="privilege-escalation"),
    pytest.param({"redis": {"bundled": {"podSecurityContext": {"seccompProfile": {"type": "Unconfined"}}}}},
                 "type", id="seccomp-unconfined"),
    pytest.param({"redis": {"bundled": {"appendFsync": "sometimes"}}}, "appendFsync", id="appendfsync-outside-enum"),
    pytest.param({"auth": {"enabled": True, "existingSecret": "tokens"}}, "insecure", id="auth-without-tls"),
])
def test_the_schema_refuses_weakening(helm, values, needle):
    done = helm.template(values)
    assert done.returncode != 0, f"helm template accepted {values}"
    assert SCHEMA_ERROR in done.stderr and needle in done.stderr, done.stderr


def test_auth_without_tls_needs_insecure_and_passes_it_to_the_server(helm):
    values = {"auth": {"enabled": True, "existingSecret": "tokens"}}
    srv = _server(helm.render(values | {"insecure": True}))
    assert "--insecure" in srv["args"] and srv["args"][:2] == ["--host", "0.0.0.0"]
    with_tls = values | {"tls": {"enabled": True, "existingSecret": "t"}, "insecure": True}
    assert "--insecure" not in _server(helm.render(with_tls))["args"]  # nothing to excuse with TLS on
    for case in CASES:  # no example is insecure
        assert "--insecure" not in _server(helm.render(CASES[case]))["args"], case


def _server(r: Rendered) -> dict[str, Any]:
    (found,) = [c for c in head_pod(r)["spec"]["containers"] if c["name"] == "shardwright-server"]
    return found


@pytest.mark.parametrize("case", CASES)
def test_network_policies_select_the_release_pods_and_admit_only_the_api_from_outside(renders, case):
    r = renders[case]
    pods = pod_templates(r)
    labels = {name: pod["metadata"]["labels"] for name, pod in pods.items()}
    policies = {p["metadata"]["name"]: p["spec"] for p in r.all("NetworkPolicy")}
    bundled = bool(r.all("StatefulSet"))
    assert len(policies) == (3 if bundled else 2)
    servers = {"head"} | ({"worker:api"} & set(labels))  # the pods that run an API replica
    covered, open_ports = set(), set()
    for name, spec in policies.items():
        assert spec["policyTypes"] == ["Ingress"], name
        chosen = {pod for pod, lab in labels.items() if selects(spec["podSelector"], lab)}
        assert chosen and all(lab["app.kubernetes.io/instance"] == RELEASE for pod, lab in labels.items()
                              if pod in chosen), name
        covered |= chosen
        for rule in spec["ingress"]:
            peers = rule.get("from")
            if peers is None:  # open to anyone: only the API servers' API (and metrics) ports
                assert chosen == servers, name
                open_ports |= {p["port"] for p in rule["ports"]}
                continue
            for peer in peers:
                assert set(peer) == {"podSelector"}, f"{name}: {peer} reaches beyond the namespace"
                admitted = {pod for pod, lab in labels.items() if selects(peer["podSelector"], lab)}
                assert admitted and all(p == "head" or p.startswith("worker:") for p in admitted), (name, admitted)
                if chosen == {f"statefulset:{RELEASE}-shardwright-redis"}:
                    assert admitted == servers and [p["port"] for p in rule["ports"]] == [6379]
    assert open_ports == {p["containerPort"] for p in _server(r)["ports"]}
    # Every pod of the release but the `helm test` pod is behind a policy.
    assert covered == {p for p in pods if not p.startswith("pod:")}


def test_network_policies_can_be_narrowed_or_switched_off(helm):
    peer = {"namespaceSelector": {"matchLabels": {"name": "ingress"}}}
    r = helm.render({"networkPolicy": {"apiFrom": [peer]}})
    (head,) = [p["spec"] for p in r.all("NetworkPolicy") if p["metadata"]["name"].endswith("-head")]
    assert [rule.get("from") for rule in head["ingress"]][0] == [peer]
    assert not helm.render({"networkPolicy": {"enabled": False}}).all("NetworkPolicy")


@pytest.mark.parametrize("case", CASES)
def test_no_password_or_token_appears_in_any_container_arguments(renders, case):
    r = renders[case]
    secrets = {v for s in r.all("Secret") for v in s.get("stringData", {}).values()}
    secrets |= {t["token"] for t in r.values.get("auth", {}).get("tokens", [])}
    secrets |= {t for e in r.values.get("auth", {}).get("tenants", {}).values() for t in e["tokens"]}
    secrets |= {v for v in (r.values.get("redis", {}).get("bundled", {}).get("password"),) if v}
    words = {w for s in secrets for w in s.replace(":", " ").replace("@", " ").split() if len(w) >= 12}
    for name, pod in pod_templates(r).items():
        for container in pod["spec"]["containers"]:
            argv = " ".join(container.get("command", []) + container.get("args", []))
            assert "requirepass" not in argv and not any(w in argv for w in words), f"{name}/{container['name']}"
            for e in container.get("env", []):
                assert not any(w in str(e.get("value", "")) for w in words), f"{name}: env {e['name']}"


def test_the_bundled_redis_password_is_generated_unless_given(helm):
    first, second = (helm.render(None).one("Secret", f"{RELEASE}-shardwright-redis") for _ in range(2))
    generated = first["stringData"]["password"]
    assert len(generated) == 32 and generated.isalnum() and generated != second["stringData"]["password"]
    given = helm.render({"redis": {"bundled": {"password": "given-Passw0rd.1"}}})
    data = given.one("Secret", f"{RELEASE}-shardwright-redis")["stringData"]
    assert data["password"] == "given-Passw0rd.1" and ":given-Passw0rd.1@" in data["url"]
    assert data["redis.conf"] == "requirepass given-Passw0rd.1\n"


def test_bundled_redis_fsyncs_every_write_by_default(renders):
    (redis,) = renders["default"].one("StatefulSet")["spec"]["template"]["spec"]["containers"]
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--appendfsync") + 1] == "always"


def _ray_containers(r: Rendered) -> dict[str, dict[str, Any]]:
    out = {}
    for name, pod in pod_templates(r).items():
        if name == "head" or name.startswith("worker:"):
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            out |= {f"{name}/{c['name']}": (c, volumes) for c in pod["spec"]["containers"]}
    return out


@pytest.mark.parametrize("case", CASES)
def test_the_state_volume_is_shared_by_the_head_and_every_worker(renders, case):
    r = renders[case]
    claims = set()
    containers = _ray_containers(r)
    assert len(containers) >= 3  # ray-head, the server, one worker at least
    for where, (container, volumes) in containers.items():
        assert env(container)["SHARDWRIGHT_STATE_DIR"]["value"] == STATE_DIR, where
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == STATE_DIR]
        assert not mount.get("readOnly"), where
        claims.add(volumes[mount["name"]]["persistentVolumeClaim"]["claimName"])
    (claim,) = claims  # one volume for all
    existing = r.values.get("state", {}).get("persistence", {}).get("existingClaim")
    if existing:
        assert claim == existing and not r.all("PersistentVolumeClaim")
    else:
        pvc = r.one("PersistentVolumeClaim", claim)
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_the_state_volume_without_persistence_and_its_checks(helm):
    r = helm.render({"state": {"persistence": {"enabled": False}, "mountPath": "/state"}})
    for where, (container, volumes) in _ray_containers(r).items():
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/state"]
        assert volumes[mount["name"]] == {"name": "state", "emptyDir": {}}, where
        assert env(container)["SHARDWRIGHT_STATE_DIR"]["value"] == "/state"
    done = helm.template({"state": {"persistence": {"accessModes": ["ReadWriteOnce"]}}})
    assert done.returncode != 0 and "must include ReadWriteMany" in done.stderr
    done = helm.template({"state": {"mountPath": "relative"}})
    assert done.returncode != 0 and SCHEMA_ERROR in done.stderr and "mountPath" in done.stderr


def test_a_model_weights_volume_is_mounted_read_only_everywhere(renders):
    for where, (container, volumes) in _ray_containers(renders["gpu"]).items():
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/models"]
        assert mount["readOnly"] is True, where
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == "model-weights"
    for where, (container, _) in _ray_containers(renders["default"]).items():
        assert "/models" not in {m["mountPath"] for m in container["volumeMounts"]}, where
