"""examples/grafana-dashboard.json against what a running balancer exports and Prometheus parses.

The dashboard is checked as Grafana imports it (a ``${DS_PROMETHEUS}`` input, the feed and
instance variables, a grid of panels) and as it queries: every PromQL expression, its Grafana
variables replaced, is sent to a real Prometheus scraping a real balancer (the deployment of
test_prometheus.py), which must accept it, and must name only metrics the balancer exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import scrape
from test_prometheus import Deployment, deployment

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = json.loads((REPO / "examples" / "grafana-dashboard.json").read_text())
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
METRIC = re.compile(r"\btradebalancer_[a-z0-9_]+\b")
# What Grafana puts in place of its variables; 10 s holds several of the test's 1 s scrapes.
VARIABLES = {"$__rate_interval": "10s", "$__interval": "10s", "$instance": ".+", "$feed": ".+"}
# The panels a streaming balancer must fill (trouble panels may rightly be empty).
FILLED = {
    "Connection state",
    "TLS path",
    "Workers up",
    "Behind the market now",
    "Uptime",
    "Events received and forwarded",
    "Events per pipe",
    "Backlog per pipe",
    "Behind the market",
    "Forward latency",
}

__all__ = ["deployment"]  # the fixture, used by name


def panels() -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included, rows excepted."""
    found: list[dict[str, Any]] = []
    for panel in DASHBOARD["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def expressions() -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every query of the dashboard."""
    return [(panel["title"], target["expr"]) for panel in panels() for target in panel["targets"]]


def substitute(expression: str) -> str:
    """The expression as Grafana sends it, with the test's values for the variables."""
    for name, value in sorted(VARIABLES.items(), key=lambda item: -len(item[0])):
        expression = expression.replace(name, value)
    assert "$" not in expression, f"a variable the test does not know: {expression}"
    return expression


def exported_names(exposition: str) -> set[str]:
    """Every sample name the exposition's families may have, samples or not."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "gauge": ("",),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names |= {family.name + suffix for suffix in suffixes[family.type]}
        names |= {sample.name for sample in family.samples}
    return names


def test_the_dashboard_imports_with_a_prometheus_input_and_feed_and_instance_variables() -> None:
    """The dashboard asks for one Prometheus data source on import, and every query uses it."""
    assert DASHBOARD["schemaVersion"] >= 38  # Grafana 10
    assert DASHBOARD["__inputs"] == [
        {
            "name": "DS_PROMETHEUS",
            "label": "Prometheus",
            "description": DASHBOARD["__inputs"][0]["description"],
            "type": "datasource",
            "pluginId": "prometheus",
            "pluginName": "Prometheus",
        }
    ]
    variables = {v["name"]: v for v in DASHBOARD["templating"]["list"]}
    assert set(variables) == {"feed", "instance"}
    assert variables["feed"]["definition"] == "label_values(tradebalancer_info, feed)"
    assert "$feed" in variables["instance"]["definition"]
    for variable in variables.values():
        assert variable["datasource"] == DATASOURCE and variable["type"] == "query"
    rows = [panel for panel in DASHBOARD["panels"] if panel["type"] == "row"]
    ids = [panel["id"] for panel in rows + panels()]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels():
        title = panel["title"]
        assert panel["datasource"] == DATASOURCE, title
        assert panel["targets"] and panel.get("description"), title
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, title
            assert 'instance=~"$instance"' in target["expr"], f"{title}: not filtered"
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, title


def test_the_panels_cover_what_an_operator_watches() -> None:
    """Events, pipes, backlog, both delays, rejects, reconnects, backpressure, restarts, state."""
    used = {name for _, expression in expressions() for name in METRIC.findall(expression)}
    assert {
        "tradebalancer_events_received_total",
        "tradebalancer_events_forwarded_total",
        "tradebalancer_pipe_events_total",
        "tradebalancer_pipe_backlog_bytes",
        "tradebalancer_market_delay_seconds_bucket",
        "tradebalancer_forward_latency_seconds_bucket",
        "tradebalancer_frames_rejected_total",
        "tradebalancer_reconnects_total",
        "tradebalancer_backpressure_seconds_total",
        "tradebalancer_worker_restarts_total",
        "tradebalancer_connection_state",
        "tradebalancer_tls_path",
    } <= used
    quantiles = [e for _, e in expressions() if "histogram_quantile" in e]
    assert len(quantiles) == 6, quantiles  # p50, p90, p99 of both histograms


@pytest.mark.timeout(90)
def test_every_expression_names_exported_metrics_and_prometheus_accepts_it(
    deployment: Deployment,
) -> None:
    """Each query names only metrics a running balancer exports, Prometheus evaluates it, and
    the feed, pipe and delay panels show data from a streaming balancer."""
    prometheus = deployment.prometheus
    prometheus.wait_targets_up()
    body, _ = scrape(deployment.metrics)
    exported = exported_names(body)
    assert "tradebalancer_events_forwarded_total" in exported
    for title, expression in expressions():
        unknown = set(METRIC.findall(expression)) - exported
        assert not unknown, f"{title}: {sorted(unknown)} not exported by the balancer"
        status, answer = prometheus.request("/api/v1/query", {"query": substitute(expression)})
        assert (status, answer.get("status")) == (200, "success"), f"{title}: {answer}"
    for title, expression in expressions():
        if title in FILLED:
            prometheus.wait_for(
                lambda e=expression: prometheus.query(substitute(e)), 20, f"{title}: {expression}"
            )
    for variable in DASHBOARD["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["definition"])
        assert match is not None, variable["definition"]
        metric, label = substitute(match[1]), match[2]
        values = prometheus.query(f"group by ({label}) ({metric})")
        assert values and all(label in v["metric"] for v in values), variable["name"]
