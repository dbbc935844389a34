"""The Helm chart at deploy/helm/tracegate: lint, render and validate every manifest against
the Kubernetes schema (strict: unknown fields fail) for each supported shape, the
chart-testing value sets in its ci/ first; wrong values fail at install, the common mistakes
with a sentence saying what to set; deploy/gateway-api/ fits a chart install; and what the
chart sets agrees with tracegate's own settings and routes. All offline: Helm's library via
helm-python-sdk, schemas bundled in kubernetes-validate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from helm_python import _native

from proxy.dev.standins import StandInIssuer
from proxy.settings.config import OPTIONS, Settings
from proxy.settings.cpus import usable_cpus
from proxy.settings.values import host_port
from tests.conftest import PAYMENTS_KEY, environ, policy_yaml

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "tracegate"
GATEWAY_API = CHART.parent.parent / "gateway-api" / "tracegate.yaml"
POLICY = {"files": {"main.yaml": "service_accounts: {}\n"}}
#: Settings other branches add (the OTLP/gRPC door); the chart sets them ahead of the merge.
PENDING_SETTINGS = {"TRACEGATE_GRPC_LISTEN"}
#: CRDs: no bundled schema; their own tests check them by hand.
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}
PROMETHEUS_RULE_API = "monitoring.coreos.com/v1/PrometheusRule"

#: The chart-testing value sets (`ct lint`/`ct install` read ci/*-values.yaml), then more shapes.
CI_VALUES = {path.name: yaml.safe_load(path.read_text()) for path in sorted((CHART / "ci").glob("*-values.yaml"))}
AUTHZ_FROM = [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}}]
VALUE_SETS: dict[str, dict[str, Any]] = {
    **CI_VALUES,
    "authz-nginx-secret-file": {
        "policies": POLICY,
        "authz": {"enabled": True, "dialect": "nginx", "secret": {"name": "tracegate-authz"}, "from": AUTHZ_FROM},
    },
    "authz-traefik-secret-env-tls": {
        "policies": POLICY,
        "service": {"type": "LoadBalancer"},
        "tls": {"enabled": True, "secretName": "tracegate-tls"},
        "authz": {
            "enabled": True,
            "dialect": "traefik",
            "port": 9000,
            "secret": {"name": "gateway-auth", "key": "shared", "mountAs": "env"},
            "from": AUTHZ_FROM,
        },
    },
    "tls-on": {
        "policies": POLICY,
        "tls": {"enabled": True, "secretName": "tracegate-tls", "clientCASecretName": "ci-client-ca"},
        "secretEnv": [{"name": "LS_TOKEN_PAYMENTS", "secretName": "lightstep-tokens", "key": "payments"}],
        "extraEnv": [{"name": "TRACEGATE_UPSTREAM_TIMEOUT", "value": "20"}],
    },
}


def render(
    values: dict[str, Any], *, name: str = "tg", namespace: str = "observability", api_versions: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """Validate ``values`` as `helm install` does, then render. ``api_versions``: what the
    cluster serves beyond the built-in kinds (`helm template --api-versions`), which
    helm-python-sdk's ``Chart.render`` does not take, so its library is called directly."""
    options = {"name": name, "namespace": namespace, "is_install": True, "api_versions": list(api_versions)}
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)
        rendered = _native.call_string("helm_render", chart._raw(), json.dumps(values), json.dumps(options))
    manifests: dict[str, str] = json.loads(rendered)
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


def service(docs: list[dict[str, Any]], name: str) -> dict[str, Any]:
    [found] = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == name]
    return found


def test_the_chart_testing_value_sets_are_shipped() -> None:
    assert set(CI_VALUES) == {"sqlite-single-values.yaml", "postgres-fleet-values.yaml", "gateway-values.yaml"}


@pytest.mark.parametrize("name", VALUE_SETS)
def test_chart_lints_renders_and_validates_strictly(name: str) -> None:
    values = VALUE_SETS[name]
    report = helm.lint(str(CHART), values, strict=True)
    assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == []
    docs = render(values, api_versions=(PROMETHEUS_RULE_API,))
    kinds = sorted(d["kind"] for d in docs)
    for doc in docs:
        if doc["kind"] in CRD_KINDS:  # no bundled schema: checked by hand here and in test_chart_monitoring.py
            if doc["kind"] == "ServiceMonitor":
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
    assert "PrometheusRule" in kinds  # the CRD is there (api_versions)
    if name == "sqlite-single-values.yaml":
        assert workload(docs)["kind"] == "StatefulSet" and workload(docs)["spec"]["replicas"] == 1
        assert workload(docs)["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
        assert env["TRACEGATE_OUTBOX"].startswith("sqlite:///var/lib/tracegate/")
        assert "HorizontalPodAutoscaler" not in kinds
    if name == "postgres-fleet-values.yaml":
        assert workload(docs)["kind"] == "Deployment"
        assert env["TRACEGATE_OUTBOX"] == {"secretKeyRef": {"name": "tracegate-db", "key": "url"}}
        assert {"HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy", "ServiceMonitor"} <= set(kinds)
        assert "replicas" not in workload(docs)["spec"]  # the HPA owns it
    authz = values.get("authz", {})
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    if not authz.get("enabled"):
        assert "authz" not in ports and not {k for k in env if k.startswith("TRACEGATE_AUTHZ_")}
    else:
        port = authz.get("port", 4319)
        assert ports["authz"] == port and env["TRACEGATE_AUTHZ_LISTEN"] == f"0.0.0.0:{port}"
        assert env["TRACEGATE_AUTHZ_DIALECT"] == authz["dialect"]
        # Its own Service, ClusterIP whatever the ingest Service is: the answers carry account keys.
        svc = service(docs, "tg-tracegate-authz")
        assert svc["spec"]["type"] == "ClusterIP"
        assert svc["spec"]["ports"] == [
            {
                "name": "authz",
                "port": port,
                "targetPort": "authz",
                "protocol": "TCP",
                "appProtocol": "https" if values.get("tls", {}).get("enabled") else "http",
            }
        ]
        assert "authz" not in {p["name"] for p in service(docs, "tg-tracegate")["spec"]["ports"]}
        [policy] = [d for d in docs if d["kind"] == "NetworkPolicy"]
        [rule] = [r for r in policy["spec"]["ingress"] if r["ports"] == [{"port": "authz", "protocol": "TCP"}]]
        assert rule["from"] == authz["from"]
        secret = authz.get("secret", {})
        if not secret:
            assert "TRACEGATE_AUTHZ_SECRET" not in env
        elif secret.get("mountAs") == "env":
            assert env["TRACEGATE_AUTHZ_SECRET"] == "env:AUTHZ_GATEWAY_SECRET"
            assert env["AUTHZ_GATEWAY_SECRET"] == {"secretKeyRef": {"name": secret["name"], "key": secret["key"]}}
        else:
            [volume] = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret["name"]]
            [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
            [item] = volume["secret"]["items"]
            assert item["key"] == secret.get("key", "secret") and mount["readOnly"] is True
            assert env["TRACEGATE_AUTHZ_SECRET"] == f"file:{mount['mountPath']}/{item['path']}"
    if name == "tls-on":
        assert env["TRACEGATE_TLS_CERT"] == "/etc/tracegate/tls/tls.crt"
        assert env["TRACEGATE_TLS_CLIENT_CA"] == "/etc/tracegate/client-ca/ca.crt"
        assert env["LS_TOKEN_PAYMENTS"] == {"secretKeyRef": {"name": "lightstep-tokens", "key": "payments"}}


@pytest.mark.parametrize(
    "values",
    [
        {"policies": POLICY, "outbox": {"mode": "mysql"}},
        {"policies": POLICY, "autoscaling": {"enabled": True}},  # SQLite cannot scale out
        {"policies": {"existingConfigMap": "Not A Name"}},
        # Secrets by reference only: no literal value anywhere.
        {"policies": POLICY, "secretEnv": [{"name": "LS_TOKEN"}]},
        {"policies": POLICY, "extraEnv": [{"name": "TRACEGATE_OUTBOX", "value": "postgresql://u:pw@db/x"}]},
        {"policies": POLICY, "extraEnv": [{"name": "TRACEGATE_AUTHZ_SECRET", "value": "env:X"}]},
        {"policies": POLICY, "extraEnv": [{"name": "LS_TOKEN_PAYMENTS", "value": "ls-key-abc"}]},
        {"policies": POLICY, "tls": {"enabled": True}},
        {"policies": POLICY, "drainSeconds": 0},
        {"policies": POLICY, "replicaCount": "three"},
        {"policies": POLICY, "unknownKey": 1},
        # Gateway mode.
        {"policies": POLICY, "authz": {"enabled": True, "dialect": "istio", "from": AUTHZ_FROM}},
        {"policies": POLICY, "authz": {"port": 4318}},  # the ingest's
        {"policies": POLICY, "authz": {"keyHeader": "authorization"}},
        {"policies": POLICY, "authz": {"maxAgeSeconds": 301}},
        {"policies": POLICY, "authz": {"secret": {"name": "s", "mountAs": "volume"}}},
        {"policies": POLICY, "authz": {"secret": {"name": "s", "value": "x"}}},
        {"policies": POLICY, "prometheusRule": {"thresholds": {"refusedRatio": 2}}},
        {"policies": POLICY, "grafanaDashboard": {"enabled": "yes"}},
    ],
)
def test_wrong_values_fail_at_install(values: dict[str, Any]) -> None:
    with helm.Chart.load(str(CHART)) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(values)


GATEWAY_ON = {"enabled": True, "dialect": "nginx", "from": AUTHZ_FROM}
LITERAL = "hunter2-5f0c8e1b"  # a secret given where a reference belongs: never echoed back


@pytest.mark.parametrize(
    ("values", "says"),
    [
        ({}, ["no policies", "kubectl create configmap", "--from-file=policies/", "policies.existingConfigMap="]),
        ({"policies": {"files": {}, "existingConfigMap": ""}}, ["no policies", "policies.files"]),
        (
            {"policies": {**POLICY, "existingConfigMap": "mine"}},
            ["policies.files and policies.existingConfigMap (mine) are both set"],
        ),
        (
            {"policies": POLICY, "outbox": {"mode": "postgresql"}},
            ["outbox.postgresql.urlSecret.name=", "create secret"],
        ),
        (
            {
                "policies": POLICY,
                "outbox": {"mode": "postgresql", "postgresql": {"url": f"postgresql://u:{LITERAL}@db/x"}},
            },
            ["outbox.postgresql.url is a literal", "outbox.postgresql.urlSecret.name="],
        ),
        (
            {
                "policies": POLICY,
                "outbox": {"mode": "postgresql", "postgresql": {"urlSecret": f"postgresql://u:{LITERAL}@db/x"}},
            },
            ["must name an existing Secret", "outbox.postgresql.urlSecret.name="],
        ),
        (
            {"policies": POLICY, "secretEnv": [{"name": "LS_TOKEN", "value": LITERAL}]},
            ["secretEnv[0] (LS_TOKEN) has a literal value", "secretEnv[0].secretName", "secretEnv[0].key"],
        ),
        (
            {"policies": POLICY, "authz": {**GATEWAY_ON, "secret": LITERAL}},
            ["authz.secret must name an existing Secret", "authz.secret.name="],
        ),
        (
            {"policies": POLICY, "authz": {"enabled": True, "from": AUTHZ_FROM}},
            ["authz.dialect", "nginx", "envoy", "traefik"],
        ),
        ({"policies": POLICY, "authz": {"enabled": True, "dialect": "envoy"}}, ["authz.from", "account keys"]),
    ],
)
def test_common_mistakes_stop_the_install_saying_what_to_set(values: dict[str, Any], says: list[str]) -> None:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema(values)  # past the schema: the sentence comes from the templates
        with pytest.raises(helm.HelmRenderError) as failed:
            chart.render(values, name="tg", namespace="observability", is_install=True)
    message = str(failed.value)
    assert "tracegate: " in message
    for words in says:
        assert words in message
    assert LITERAL not in message


def test_the_gateway_api_files_work_against_a_chart_install() -> None:
    """deploy/gateway-api/tracegate.yaml asks a Service by name and port under a path prefix:
    `helm install tracegate … -f ci/gateway-values.yaml` in the gateway's namespace serves it."""
    values = CI_VALUES["gateway-values.yaml"]
    docs = render(values, name="tracegate", namespace="egress")
    [policy] = [d for d in yaml.safe_load_all(GATEWAY_API.read_text()) if d["kind"] == "SecurityPolicy"]
    http = policy["spec"]["extAuth"]["http"]
    [ref] = http["backendRefs"]
    assert "namespace" not in ref  # the Service is in the SecurityPolicy's namespace: install there
    svc = service(docs, ref["name"])
    [port] = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]]
    [container] = workload(docs)["spec"]["template"]["spec"]["containers"]
    [target] = [p for p in container["ports"] if p["name"] == port["targetPort"]]
    env = container_env(docs)
    assert host_port(env["TRACEGATE_AUTHZ_LISTEN"]) == ("0.0.0.0", target["containerPort"])
    assert env["TRACEGATE_AUTHZ_DIALECT"] == "envoy"
    assert env["TRACEGATE_AUTHZ_PATH_PREFIX"] == http["path"]
    assert "TRACEGATE_AUTHZ_SECRET" not in env  # Envoy Gateway cannot send one
    [netpol] = [d for d in docs if d["kind"] == "NetworkPolicy"]
    [rule] = [r for r in netpol["spec"]["ingress"] if r["ports"][0]["port"] == port["targetPort"]]
    assert rule["from"] == values["authz"]["from"] and rule["from"]
    header = "\n".join(line for line in GATEWAY_API.read_text().splitlines() if line.startswith("#"))
    assert "ci/gateway-values.yaml" in header


@pytest.mark.parametrize("name", ["authz-nginx-secret-file", "authz-traefik-secret-env-tls"])
async def test_a_real_tracegate_serves_the_charts_gateway_settings(
    name: str, start_tracegate: Any, issuer: StandInIssuer, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The authz settings the chart renders, the shared secret where the chart puts it, given
    to a real tracegate: a check with the secret is answered with the key, one without is refused."""
    docs = render(VALUE_SETS[name])
    env = {k: v for k, v in container_env(docs).items() if k.startswith("TRACEGATE_AUTHZ_") and isinstance(v, str)}
    secret = "gateway-secret-9e2d41c7"
    process_env = environ()
    ref = env["TRACEGATE_AUTHZ_SECRET"]
    if ref.startswith("file:"):  # the mounted Secret's file, here under tmp_path
        mounted = tmp_path / ref.removeprefix("file:/")
        mounted.parent.mkdir(parents=True)
        mounted.write_text(secret)
        ref = f"file:{mounted}"
    else:
        process_env[ref.removeprefix("env:")] = secret
    flags = {o.field: env[o.env] for o in OPTIONS if o.env in env}
    tg = await start_tracegate(
        policy_yaml(issuer.url), env=process_env, **{**flags, "authz_listen": "127.0.0.1:0", "authz_secret": ref}
    )
    await tg.keys_ready()
    url = f"http://127.0.0.1:{tg.runners[2].addresses[0][1]}"
    original = (
        {"X-Original-Method": "POST", "X-Original-URI": "/v1/traces"}
        if env["TRACEGATE_AUTHZ_DIALECT"] == "nginx"
        else {"X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/v1/traces", "X-Forwarded-Proto": "https"}
    )
    check = {"Authorization": f"Bearer {issuer.mint()}", **original}
    async with client.get(url, headers=check) as resp:
        assert resp.status == 403
    async with client.get(url, headers={**check, "X-Tracegate-Authz-Secret": secret}) as resp:
        assert resp.status == 200
        assert resp.headers[env["TRACEGATE_AUTHZ_KEY_HEADER"]] == PAYMENTS_KEY


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
    authz_defaults = chart_defaults["authz"]
    assert authz_defaults["keyHeader"] == defaults["TRACEGATE_AUTHZ_KEY_HEADER"]
    assert str(authz_defaults["maxAgeSeconds"]) == defaults["TRACEGATE_AUTHZ_MAX_AGE_SECONDS"]
    assert str(authz_defaults["denyMaxAgeSeconds"]) == defaults["TRACEGATE_AUTHZ_DENY_MAX_AGE_SECONDS"]
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
        assert {p["port"] for p in service(docs, "tg-tracegate")["spec"]["ports"]} == {4318, 4317, 9464}
        # tracegate itself accepts every setting the chart gives it.
        plain = {k: v for k, v in env.items() if isinstance(v, str)}
        if "TRACEGATE_OUTBOX" not in plain:  # from the URL Secret
            plain["TRACEGATE_OUTBOX"] = "postgresql://tracegate:pw@db:5432/tracegate"
        settings = Settings.load({}, plain)
        assert settings.admin_listen == ("0.0.0.0", ports["admin"])
        if "authz" in ports:
            assert settings.authz_listen == ("0.0.0.0", ports["authz"])
            assert settings.authz_dialect == values["authz"]["dialect"]
            assert (settings.authz_secret is not None) == bool(values["authz"].get("secret"))
        else:
            assert settings.authz_listen is None
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
