"""The Helm chart at deploy/helm/tracegate: lint, render and validate every manifest against
the Kubernetes schema (strict: unknown fields fail) for each supported shape; wrong values
fail at install; and what the chart sets agrees with tracegate's own settings and routes.
All offline: Helm's library via helm-python-sdk, schemas bundled in kubernetes-validate."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from proxy.dev.standins import StandInIssuer
from proxy.settings.config import OPTIONS, Settings
from proxy.settings.cpus import usable_cpus
from proxy.settings.values import host_port
from tests.conftest import policy_yaml

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "tracegate"
POLICY = {"files": {"main.yaml": "service_accounts: {}\n"}}
#: Settings other branches add (the OTLP/gRPC door); the chart sets them ahead of the merge.
PENDING_SETTINGS = {"TRACEGATE_GRPC_LISTEN"}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "single-replica-sqlite": {"policies": POLICY},
    "three-replicas-postgresql": {
        "replicaCount": 3,
        "outbox": {"mode": "postgresql", "postgresql": {"urlSecret": {"name": "tracegate-db", "key": "url"}}},
        "policies": {"existingConfigMap": "tracegate-policies"},
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9},
        "secretFiles": [{"secretName": "lightstep-tokens", "mountName": "lightstep"}],
        "networkPolicy": {"ingressFrom": [{"namespaceSelector": {"matchLabels": {"ci": "true"}}}]},
        "serviceMonitor": {"enabled": True},
        "workers": 2,
    },
    "tls-on": {
        "policies": POLICY,
        "tls": {"enabled": True, "secretName": "tracegate-tls", "clientCASecretName": "ci-client-ca"},
        "secretEnv": [{"name": "LS_TOKEN_PAYMENTS", "secretName": "lightstep-tokens", "key": "payments"}],
        "extraEnv": [{"name": "TRACEGATE_UPSTREAM_TIMEOUT", "value": "20"}],
    },
}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        manifests = chart.render(values, name="tg", namespace="observability", is_install=True)
    return [
        doc
        for path, text in manifests.items()
        if path.endswith(".yaml")  # not NOTES.txt
        for doc in yaml.safe_load_all(text)
        if doc
    ]


def workload(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]
    return found


def container_env(docs: list[dict[str, Any]]) -> dict[str, Any]:
    [container] = workload(docs)["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_lints_renders_and_validates_strictly(name: str) -> None:
    values = VALUE_SETS[name]
    report = helm.lint(str(CHART), values, strict=True)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    docs = render(values)
    kinds = sorted(d["kind"] for d in docs)
    for doc in docs:
        if doc["kind"] == "ServiceMonitor":  # a CRD: no bundled schema; checked below by hand
            assert doc["spec"]["endpoints"] == [{"port": "admin", "path": "/metrics", "interval": "30s"}]
            continue
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    pod = workload(docs)["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["topologySpreadConstraints"]
    env = container_env(docs)
    if name == "single-replica-sqlite":
        assert workload(docs)["kind"] == "StatefulSet" and workload(docs)["spec"]["replicas"] == 1
        assert workload(docs)["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        assert env["TRACEGATE_OUTBOX"].startswith("sqlite:///var/lib/tracegate/")
        assert "HorizontalPodAutoscaler" not in kinds
    if name == "three-replicas-postgresql":
        assert workload(docs)["kind"] == "Deployment"
        assert env["TRACEGATE_OUTBOX"] == {"secretKeyRef": {"name": "tracegate-db", "key": "url"}}
        assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"} <= set(kinds)
        assert "replicas" not in workload(docs)["spec"]  # the HPA owns it
    if name == "tls-on":
        assert env["TRACEGATE_TLS_CERT"] == "/etc/tracegate/tls/tls.crt"
        assert env["TRACEGATE_TLS_CLIENT_CA"] == "/etc/tracegate/client-ca/ca.crt"
        assert env["LS_TOKEN_PAYMENTS"] == {"secretKeyRef": {"name": "lightstep-tokens", "key": "payments"}}


@pytest.mark.parametrize(
    "values",
    [
        {},  # no policies at all
        {"policies": {"files": {}, "existingConfigMap": ""}},
        {"policies": POLICY, "outbox": {"mode": "mysql"}},
        {"policies": POLICY, "outbox": {"mode": "postgresql"}},  # where is the database?
        {"policies": POLICY, "autoscaling": {"enabled": True}},  # SQLite cannot scale out
        # Secrets by reference only: no literal value anywhere.
        {"policies": POLICY, "secretEnv": [{"name": "LS_TOKEN", "value": "ls-key-abc"}]},
        {"policies": POLICY, "extraEnv": [{"name": "TRACEGATE_OUTBOX", "value": "postgresql://u:pw@db/x"}]},
        {"policies": POLICY, "extraEnv": [{"name": "LS_TOKEN_PAYMENTS", "value": "ls-key-abc"}]},
        {"policies": POLICY, "tls": {"enabled": True}},
        {"policies": POLICY, "drainSeconds": 0},
        {"policies": POLICY, "replicaCount": "three"},
        {"policies": POLICY, "unknownKey": 1},
    ],
)
def test_wrong_values_fail_at_install(values: dict[str, Any]) -> None:
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


async def test_rendered_probes_ports_and_drain_agree_with_tracegate(
    start_tracegate: Any, issuer: StandInIssuer
) -> None:
    defaults = {o.env: o.default for o in OPTIONS}
    known = {o.env for o in OPTIONS} | PENDING_SETTINGS
    with (CHART / "values.yaml").open() as f:
        chart_defaults = yaml.safe_load(f)
    assert str(chart_defaults["drainSeconds"]) == defaults["TRACEGATE_DRAIN_SECONDS"]
    assert chart_defaults["workers"] == "auto" and defaults["TRACEGATE_WORKERS"] == "1"  # one per CPU in a pod
    assert str(chart_defaults["watchIntervalSeconds"]) == defaults["TRACEGATE_WATCH_INTERVAL_SECONDS"]
    for values in VALUE_SETS.values():
        docs = render(values)
        pod = workload(docs)["spec"]["template"]["spec"]
        [container] = pod["containers"]
        env = container_env(docs)
        assert {k for k in env if k.startswith("TRACEGATE_")} <= known, "the chart sets a setting tracegate lacks"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert host_port(env["TRACEGATE_LISTEN"])[1] == ports["otlp-http"] == host_port(defaults["TRACEGATE_LISTEN"])[1]
        assert host_port(env["TRACEGATE_ADMIN_LISTEN"]) == ("0.0.0.0", ports["admin"])  # reachable by probes
        assert ports["admin"] == host_port(defaults["TRACEGATE_ADMIN_LISTEN"])[1]
        assert host_port(env["TRACEGATE_GRPC_LISTEN"])[1] == ports["otlp-grpc"] == 4317
        [service] = [d for d in docs if d["kind"] == "Service" and d["spec"].get("clusterIP") != "None"]
        assert {p["port"] for p in service["spec"]["ports"]} == {4318, 4317, 9464}
        # tracegate itself accepts every setting the chart gives it.
        plain = {k: v for k, v in env.items() if isinstance(v, str)}
        if "TRACEGATE_OUTBOX" not in plain:  # from the URL Secret
            plain["TRACEGATE_OUTBOX"] = "postgresql://tracegate:pw@db:5432/tracegate"
        settings = Settings.load({}, plain)
        assert settings.admin_listen == ("0.0.0.0", ports["admin"])
        assert settings.workers == values.get("workers", usable_cpus())
        drain = float(env["TRACEGATE_DRAIN_SECONDS"])
        assert settings.drain_seconds == drain
        pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > pause + drain  # the kubelet never cuts the drain short
        probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        assert {p["port"] for p in probes.values()} == {"admin"}
        assert {probes["livenessProbe"]["path"], probes["readinessProbe"]["path"]} == {"/healthz", "/readyz"}
    # And the probes' paths answer 200 on a real tracegate's admin listener.
    tg = await start_tracegate(policy_yaml(issuer.url))
    async with aiohttp.ClientSession() as client:
        for probe in probes.values():
            async with client.get(tg.admin_url + probe["path"]) as resp:
                assert resp.status == 200, probe
