"""The chart's Grafana dashboard and Prometheus alert rules for tracegate's own metrics: shaped as
Grafana's dashboard sidecar and the Prometheus Operator take them, covering decisions by
reason, upstream errors, the outbox, JWKS freshness and reloads, and naming in every PromQL
expression only metrics tracegate exports, read from a fresh ``Metrics()`` registry: a renamed
metric fails here rather than leaving a dashboard panel empty or an alert silent."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import pytest

from proxy.observe.metrics import Metrics
from tests.test_chart import CHART, CI_VALUES, POLICY, PROMETHEUS_RULE_API, render

#: PromQL's functions and aggregation operators (prometheus/promql/parser/functions.go, lex.go).
FUNCTIONS = {
    *("abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time"),
    *("ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month"),
    *("day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv", "exp", "floor", "histogram_avg"),
    *("histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev", "histogram_stdvar"),
    *("histogram_sum", "holt_winters", "hour", "idelta", "increase", "irate", "label_join", "label_replace"),
    *("last_over_time", "ln", "log10", "log2", "max_over_time", "min_over_time", "minute", "month", "pi"),
    *("predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round", "scalar"),
    *("sgn", "sin", "sinh", "sort", "sort_desc", "sqrt", "stddev_over_time", "stdvar_over_time"),
    *("sum_over_time", "tan", "tanh", "time", "timestamp", "vector", "year"),
}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"}
AGGREGATIONS |= {"bottomk", "topk", "quantile", "limitk", "limit_ratio"}
#: Followed by a parenthesised list of label names, not of expressions.
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"bool", "and", "or", "unless", "offset", "atan2"}

TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
      | (?P<range>\[[^\]]*\])
      | (?P<duration>\d+(?:ms|[smhdwy])(?![\w:]))
      | (?P<number>(?:0[xX][0-9a-fA-F]+|\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+)(?![\w:]))
      | (?P<variable>\$\w+|\$\{[^}]*\})
      | (?P<name>[A-Za-z_:][\w:]*)
      | (?P<punct>[(){},=!~<>+\-*/%^@])""",
    re.VERBOSE,
)


def tokens(expr: str) -> list[tuple[str, str]]:
    found, pos = [], 0
    while pos < len(expr):
        match = TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot read PromQL at {expr[pos : pos + 20]!r} in {expr!r}")
        pos = match.end()
        if match.lastgroup != "space":
            found.append((match.lastgroup or "", match.group()))
    return found


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: every name that is not a function, an
    aggregation, a keyword, a label in ``{…}`` or in a ``by (…)``-style list."""
    toks = tokens(expr)
    depth = 0
    for _, text in toks:
        depth += (text == "(") - (text == ")")
        if depth < 0:
            break
    if depth:
        raise ValueError(f"unbalanced parentheses in {expr!r}")
    names: set[str] = set()
    i = 0

    def skip_to(closer: str, opener: str) -> int:
        depth, j = 0, i
        while j < len(toks):
            depth += toks[j][1] == opener
            depth -= toks[j][1] == closer
            if depth == 0:
                return j
            j += 1
        raise ValueError(f"unbalanced {opener!r} in {expr!r}")

    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if text == "{":
            end = skip_to("}", "{")  # label matchers
            if ("name", "__name__") in toks[i:end]:
                raise ValueError(f"select metrics by name, not by __name__: {expr!r}")
            i = end
        elif kind == "name" and text in LABEL_LISTS:
            if following == "(":
                i += 1
                i = skip_to(")", "(")
        elif kind == "name" and (text in KEYWORDS or text in AGGREGATIONS):
            pass
        elif kind == "name" and following == "(":
            if text not in FUNCTIONS:
                raise ValueError(f"unknown PromQL function {text!r} in {expr!r}")
        elif kind == "name":
            names.add(text)
        i += 1
    return names


def exported_metrics() -> set[str]:
    """What tracegate's /metrics can show: counters with ``_total``, histograms as
    ``_bucket``/``_sum``/``_count``, gauges as named (``_created`` is not in the multiprocess
    rendering that every pod with workers > 1 serves, so it is not offered)."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


#: What the issue asks the dashboard and the alerts to watch, by the metrics that show it.
WATCHED = {
    "decisions by reason": {"tracegate_requests_total"},
    "upstream errors": {"tracegate_upstream_responses_total"},
    "outbox backlog": {"tracegate_outbox_depth"},
    "outbox age": {"tracegate_outbox_oldest_pending_seconds"},
    "JWKS freshness": {"tracegate_jwks_fetches_total"},
    "reload failures": {"tracegate_policy_loaded", "tracegate_policy_loads_total", "tracegate_tls_reloads_total"},
}


def assert_watches_everything(used: set[str]) -> None:
    for what, metrics in WATCHED.items():
        assert used & metrics, f"nothing watches {what}"


def test_the_promql_reader_finds_names_and_refuses_what_it_cannot_read() -> None:
    assert exported_metrics() >= {"tracegate_requests_total", "tracegate_upstream_duration_seconds_bucket"}
    assert "tracegate_requests" not in exported_metrics()  # a counter is read as _total
    expr = (
        'sum by (reason, le) (rate(tracegate_x_total{job="a", status=~"5.."}[$__rate_interval] offset 5m)) '
        "/ ignoring (reason) group_left sum(tracegate_y) > 0.5 unless on (job) time() - tracegate_z_seconds > 1e3"
    )
    assert metric_names(expr) == {"tracegate_x_total", "tracegate_y", "tracegate_z_seconds"}
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(h_bucket{a="}"}[5m])))') == {"h_bucket"}
    for bad in ("rat(tracegate_x_total[5m])", "sum(rate(x[5m])", "{__name__=~'tracegate_.*'}", "x # y"):
        with pytest.raises(ValueError):
            metric_names(bad)


def alert_rules(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    [rule] = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def test_the_alert_rules_render_where_the_crd_exists_and_name_only_exported_metrics() -> None:
    values = CI_VALUES["sqlite-single-values.yaml"]
    assert "PrometheusRule" not in {d["kind"] for d in render(values)}  # no Prometheus Operator
    off = {**values, "prometheusRule": {"enabled": False}}
    assert "PrometheusRule" not in {d["kind"] for d in render(off, api_versions=(PROMETHEUS_RULE_API,))}
    rules = alert_rules(render(values, api_versions=(PROMETHEUS_RULE_API,)))
    exported, used = exported_metrics(), set()
    assert len({r["alert"] for r in rules}) == len(rules)
    for rule in rules:
        assert re.fullmatch(r"Tracegate[A-Z]\w+", rule["alert"])
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        assert re.fullmatch(r"\d+[smh]", rule.get("for", "0m"))
        names = metric_names(rule["expr"])
        assert names and names <= exported, (rule["alert"], names - exported)
        # This release's samples only: the labels its ServiceMonitor gives them.
        assert rule["expr"].count('job="tg-tracegate", namespace="observability"') == rule["expr"].count("{")
        used |= names
    assert_watches_everything(used)


def test_the_dashboard_is_a_sidecar_configmap_whose_panels_query_exported_metrics() -> None:
    assert "ConfigMap" not in {d["kind"] for d in render({"policies": {"existingConfigMap": "p"}})}  # off by default
    docs = render(CI_VALUES["postgres-fleet-values.yaml"])
    [config_map] = [d for d in docs if d["kind"] == "ConfigMap" and "grafana_dashboard" in d["metadata"]["labels"]]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Tracegate"}
    [(key, text)] = config_map["data"].items()
    assert key.endswith(".json")
    dashboard = json.loads(text)
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)

    exported, used = exported_metrics(), set()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("namespace", "job"):
        query = re.fullmatch(r"label_values\((.+), *(\w+)\)", variables[name]["query"]["query"])
        assert query is not None and query.group(2) == name
        assert metric_names(query.group(1)) <= exported

    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 6
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    for panel in panels:
        assert panel["title"] and panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"])
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names and names <= exported, (panel["title"], names - exported)
            assert target["expr"].count('namespace="$namespace", job="$job"') == target["expr"].count("{")
            used |= names
    assert_watches_everything(used)


def test_the_monitoring_values_are_checked_at_install() -> None:
    with helm.Chart.load(str(CHART)) as chart:
        chart.validate_schema({"policies": POLICY, "prometheusRule": {"labels": {"release": "kube-prometheus-stack"}}})
        for wrong in ({"enabled": True, "folder": "x"}, {"labels": {"n": 1}}):
            with pytest.raises(helm.HelmValuesError):
                chart.validate_schema({"policies": POLICY, "grafanaDashboard": wrong})
