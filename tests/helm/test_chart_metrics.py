"""Metrics in the chart: `serve` gets a metrics port on all interfaces (parsed by serve's own
parser), the head pod carries Prometheus scrape annotations, the API Service and the head's
NetworkPolicy expose the port, a ServiceMonitor and a Grafana dashboard ConfigMap render when asked,
and every metric the dashboard queries is one the server exports (api/metrics.py)."""

from __future__ import annotations

import json
import re

from chart_render import CASES
from test_chart import head_pod, server


def _metric_names() -> set[str]:
    """Every series name the server's registry exposes (counters as NAME_total, histograms as
    NAME_bucket/_count/_sum), and the gauges its control-plane collector adds at scrape time."""
    from shardwright.api.metrics import ControlPlaneCollector, ServiceMetrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
    metrics = ServiceMetrics()
    try:
        return {family.name + suffix for family in metrics.registry.collect()
                for suffix in suffixes[family.type]} | set(ControlPlaneCollector.SERIES)
    finally:
        metrics.close()


def test_serve_gets_the_metrics_port_and_the_pod_is_annotated(renders):
    from shardwright.api.cli import build_parser

    for case in CASES:
        r = renders[case]
        srv = server(r)
        args = build_parser().parse_args([*srv["command"][1:], *srv["args"]])
        assert (args.metrics_port, args.metrics_host) == (9464, "0.0.0.0"), case
        assert {"name": "metrics", "containerPort": 9464, "protocol": "TCP"} in srv["ports"]
        annotations = head_pod(r)["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9464"
        svc = [s for s in r.all("Service") if any(p.get("name") == "metrics" for p in s["spec"]["ports"])]
        assert len(svc) == 1, case
        policy = [p for p in r.all("NetworkPolicy") if p["metadata"]["name"].endswith("-head")]
        ports = [port["port"] for rule in policy[0]["spec"]["ingress"] for port in rule.get("ports", [])]
        assert 9464 in ports, case


def test_metrics_off_renders_none_of_it(helm):
    r = helm.render({"metrics": {"enabled": False}})
    args = server(r)["args"]
    assert "--metrics-port" not in args and "prometheus.io/scrape" not in head_pod(r)["metadata"].get("annotations", {})
    assert not r.all("ServiceMonitor")


def test_service_monitor_and_dashboard_when_enabled(helm):
    r = helm.render({"metrics": {"enabled": True, "port": 9464, "serviceMonitor": {"enabled": True,
                                                                                 "labels": {"release": "prom"}},
                                 "grafanaDashboard": {"enabled": True}}})
    (monitor,) = r.all("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    svc = [s for s in r.all("Service") if any(p.get("name") == "metrics" for p in s["spec"]["ports"])][0]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (board,) = [c for c in r.all("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(board["data"]["shardwright.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(shardwright_[a-z_]+)", e)}
    assert len(used) >= 7 and used <= _metric_names(), used - _metric_names()


def test_the_schema_refuses_a_bad_metrics_port(helm):
    done = helm.template({"metrics": {"enabled": True, "port": 70000}})
    assert done.returncode != 0 and "metrics" in done.stderr
