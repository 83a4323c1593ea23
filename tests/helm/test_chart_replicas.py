"""The chart's API replicas and Ray GCS fault tolerance (issue 15 point 8): `server.replicas: N` runs
one server in the head pod and N - 1 in API pods (a CPU-only Ray worker group, every one behind the
one API Service and its NetworkPolicy, reaching the head's GCS through the head Service); Ray's GCS
keeps its tables in the chart's Redis (or the external one named), so a head-pod restart keeps the
workers' actors. The RayCluster these render is checked against the KubeRay CRD by
test_raycluster_crd.py (ci/tls-values.yaml has three replicas)."""

from __future__ import annotations

from chart_render import RELEASE
from test_chart import head_pod

FULLNAME = f"{RELEASE}-shardwright"


def _api_group(r) -> dict:
    (cluster,) = r.all("RayCluster")
    groups = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == "api"]
    return groups[0] if groups else {}


def test_one_replica_runs_in_the_head_pod_only(renders):
    assert _api_group(renders["default"]) == {}
    server = [c for c in head_pod(renders["default"])["spec"]["containers"] if c["name"] == "shardwright-server"]
    assert len(server) == 1


def test_more_replicas_run_in_cpu_only_api_pods_behind_the_one_service(renders):
    r = renders["tls"]
    group = _api_group(r)
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 2)
    assert group["rayStartParams"] == {"num-gpus": "0", "num-cpus": "0"}  # no job lands on an API pod
    pod = group["template"]
    names = [c["name"] for c in pod["spec"]["containers"]]
    assert names == ["ray-api", "shardwright-server"]  # KubeRay needs Ray's container first
    server = pod["spec"]["containers"][1]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["RAY_ADDRESS"] == f"{FULLNAME}-head-svc:6379"
    head_server = [c for c in head_pod(r)["spec"]["containers"] if c["name"] == "shardwright-server"][0]
    assert server["args"] == head_server["args"]  # the same server, flags and all
    ray_tmp = {m["mountPath"] for c in pod["spec"]["containers"] for m in c["volumeMounts"] if m["name"] == "ray-tmp"}
    assert ray_tmp == {"/tmp/ray"} and all(any(m["name"] == "ray-tmp" for m in c["volumeMounts"])
                                           for c in pod["spec"]["containers"])
    (svc,) = [s for s in r.all("Service") if s["metadata"]["name"] == FULLNAME]
    selector = svc["spec"]["selector"].items()
    assert selector <= pod["metadata"]["labels"].items()
    assert selector <= head_pod(r)["metadata"]["labels"].items()
    policies = {p["metadata"]["name"]: p for p in r.all("NetworkPolicy")}
    head_policy = policies[f"{FULLNAME}-head"]["spec"]["podSelector"]["matchLabels"].items()
    assert head_policy <= pod["metadata"]["labels"].items()  # the API ports are open on API pods too
    redis_from = policies[f"{FULLNAME}-redis"]["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert redis_from.items() <= pod["metadata"]["labels"].items()  # their servers reach the store


def test_gcs_fault_tolerance_uses_the_bundled_redis_and_its_secret(renders):
    r = renders["default"]
    (cluster,) = r.all("RayCluster")
    options = cluster["spec"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"] == f"{FULLNAME}-redis:6379"
    ref = options["redisPassword"]["valueFrom"]["secretKeyRef"]
    secret = r.one("Secret", ref["name"])
    assert ref["key"] in secret["stringData"]
    assert options["externalStorageNamespace"] == FULLNAME


def test_gcs_fault_tolerance_with_an_external_redis_names_its_address(renders, helm):
    (cluster,) = renders["external-redis"].all("RayCluster")
    options = cluster["spec"]["gcsFaultToleranceOptions"]
    assert options["redisAddress"] == "redis.example.internal:6380"
    assert options["redisPassword"]["valueFrom"]["secretKeyRef"] == {"name": "managed-redis", "key": "password"}
    done = helm.template({"redis": {"mode": "external", "external": {"url": "redis://r:6379/0"}}})
    assert done.returncode != 0 and "needs ray.gcsFaultTolerance.redisAddress" in done.stderr
    off = helm.render({"redis": {"mode": "external", "external": {"url": "redis://r:6379/0"}},
                       "ray": {"gcsFaultTolerance": {"enabled": False}}})
    (cluster,) = off.all("RayCluster")
    assert "gcsFaultToleranceOptions" not in cluster["spec"]
