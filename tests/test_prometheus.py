"""The metrics endpoint as an operator uses it: a real Prometheus scrapes a real balancer.

One deployment for the module: the replay feed on 127.0.0.1, stamping each event's ``t`` with
the current time less ``DELAY`` seconds; ``tradebalancer run`` with its metrics on a free port,
its real pipes and real workers (bench/sink.py, which records every message it reads);
Debian's prometheus scraping it every second, with examples/tradebalancer-alerts.yml loaded;
promtool linting a raw scrape. The first test watches the stream while it flows, stops the
feed, and compares Prometheus's totals with what the workers read; the others use what is left.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import Prometheus, free_port, promtool, require_prometheus, scrape
from test_service import KEY, Balancer, read_records

from tradebalancer.plan import pipe_block
from tradebalancer.replay import ReplayOptions, ReplayServer

REPO = Path(__file__).resolve().parent.parent
ALERTS = REPO / "examples" / "tradebalancer-alerts.yml"
PIPES, WORKERS = 4, 2
RATE = 3000.0  # events per second: a steady stream, the feed's delay measurable
DELAY = 8.0  # seconds behind the market: over the alert's 5 s
WINDOW = "5s"  # five scrapes: what rate() and the histogram quantiles look over


@dataclass
class Deployment:
    """The parts of one running deployment."""

    server: ReplayServer
    balancer: Balancer
    prometheus: Prometheus
    metrics: str  # host:port of the balancer's endpoint


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Feed, balancer and Prometheus, started together (Prometheus takes ~5 s to scrape)."""
    require_prometheus()
    tmp_path = tmp_path_factory.mktemp("deployment")
    metrics = f"127.0.0.1:{free_port()}"
    options = ReplayOptions(
        accept_keys=frozenset({KEY}), rate=RATE, pool_events=20_000, delay=DELAY
    )
    with (
        ReplayServer(options) as server,
        Prometheus(tmp_path / "prometheus", [metrics], [ALERTS]) as prometheus,
    ):
        balancer = Balancer(
            tmp_path, server.url, pipes=PIPES, workers=WORKERS, extra=f'metrics = "{metrics}"'
        )
        try:
            yield Deployment(server, balancer, prometheus, metrics)
        finally:
            if balancer.process.poll() is None:
                balancer.process.kill()
            balancer.process.wait()


def scraped(address: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of the balancer itself: {(sample name, sorted labels): value}."""
    body, _ = scrape(address)
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def workers_read(balancer: Balancer) -> dict[int, list[bytes]]:
    """Every message each pipe's worker read, in order."""
    return {pipe: read_records(balancer.records, pipe) for pipe in range(PIPES)}


def alert_states(prometheus: Prometheus, name: str) -> set[str]:
    """The states (pending, firing) of the alert ``name`` in Prometheus now."""
    alerts: list[dict[str, Any]] = prometheus.api("/api/v1/alerts")["alerts"]
    return {a["state"] for a in alerts if a["labels"]["alertname"] == name}


@pytest.mark.timeout(90)
def test_prometheus_sees_the_stream_and_its_totals_match_what_the_workers_read(
    deployment: Deployment,
) -> None:
    """While the feed streams, Prometheus sees it streaming, its rates and its delay; once the
    feed is gone, its totals equal what the workers read, pipe by pipe."""
    prometheus, balancer = deployment.prometheus, deployment.balancer
    balancer.wait_for(lambda: sum(map(len, workers_read(balancer).values())) > 0, 30, "events")
    prometheus.wait_targets_up()
    up = prometheus.value(f'up{{instance="{deployment.metrics}"}}')
    assert up == 1

    # -- while it streams --
    streaming = 'tradebalancer_connection_state{state="streaming"}'
    prometheus.wait_value(streaming, lambda v: v == 1, what="the streaming state")
    states = prometheus.values("tradebalancer_connection_state")
    assert sum(states.values()) == 1, f"more than one current state: {states}"
    assert prometheus.values("tradebalancer_tls_path == 1"), "no current TLS path"
    rate = prometheus.wait_value(
        f"rate(tradebalancer_events_forwarded_total[{WINDOW}])", lambda v: v > 0
    )
    assert rate < 3 * RATE, rate
    delay = prometheus.wait_value(
        f"histogram_quantile(0.5, rate(tradebalancer_market_delay_seconds_bucket[{WINDOW}]))",
        lambda v: v > 0,
        what="a market delay",
    )
    assert DELAY / 2 <= delay <= 2 * DELAY, delay  # within the bucket that holds DELAY
    mean = prometheus.value(
        f"rate(tradebalancer_market_delay_seconds_sum[{WINDOW}])"
        f" / rate(tradebalancer_market_delay_seconds_count[{WINDOW}])"
    )
    assert mean is not None and DELAY - 0.01 <= mean < DELAY + 1.0, mean  # t is in ms
    latency = prometheus.wait_value(
        f"histogram_quantile(0.99, rate(tradebalancer_forward_latency_seconds_bucket[{WINDOW}]))",
        lambda v: v > 0,
        what="a forward latency",
    )
    assert latency < 1.0, latency  # a local pipe write, even on a busy machine
    behind = "TradebalancerBehindTheMarket"
    prometheus.wait_for(lambda: alert_states(prometheus, behind), 15, f"{behind} pending")
    assert deployment.server.stats.events_sent > 0

    # -- the feed stops: every event received is forwarded and read, and counted --
    deployment.server.stop()

    def settled() -> bool:
        samples = scraped(deployment.metrics)
        forwarded = samples[("tradebalancer_events_forwarded_total", ())]
        backlog = sum(v for (n, _), v in samples.items() if n == "tradebalancer_pipe_backlog_bytes")
        return backlog == 0 and forwarded == sum(map(len, workers_read(balancer).values()))

    balancer.wait_for(settled, 30, "the workers to read every event forwarded")
    read = workers_read(balancer)
    total = sum(map(len, read.values()))
    forwarded = prometheus.wait_value(
        "tradebalancer_events_forwarded_total", lambda v: v == total, what="the last scrape"
    )
    assert forwarded == total > 0
    assert prometheus.value("tradebalancer_events_received_total") == total
    assert prometheus.value("tradebalancer_forwarded_bytes_total") == sum(
        len(m) for messages in read.values() for m in messages
    )
    assert (prometheus.value("tradebalancer_frames_received_total") or 0) > 0
    owner = {p: str(w) for w in range(WORKERS) for p in pipe_block(PIPES, WORKERS, w)}
    for name, expected in (
        ("tradebalancer_pipe_events_total", {p: len(read[p]) for p in range(PIPES)}),
        (  # what was written: each message with its 4-byte header
            "tradebalancer_pipe_written_bytes_total",
            {p: sum(4 + len(m) for m in read[p]) for p in range(PIPES)},
        ),
    ):
        series = [dict(labels) | {"value": v} for labels, v in prometheus.values(name).items()]
        assert sorted((s["pipe"], s["worker"], s["value"]) for s in series) == [
            (str(p), owner[p], float(expected[p])) for p in range(PIPES)
        ], name

    # -- and the balancer, without its feed, says so --
    prometheus.wait_value(streaming, lambda v: v == 0, what="the state to leave streaming")
    reconnects = prometheus.wait_value(
        "sum(tradebalancer_reconnects_total)", lambda v: v >= 1, what="a reconnect"
    )
    assert reconnects >= 1
    assert balancer.process.poll() is None, balancer.log_text()


def test_the_histograms_have_buckets_that_add_up(deployment: Deployment) -> None:
    """Each histogram has cumulative buckets ending in +Inf, which equals its count."""
    prometheus = deployment.prometheus
    prometheus.wait_targets_up()
    for name in ("tradebalancer_market_delay_seconds", "tradebalancer_forward_latency_seconds"):
        prometheus.wait_value(f"{name}_count", lambda v: v > 0, what=f"{name} samples")
        at = time.time()  # one instant for every query: the counts move between scrapes
        buckets = {
            dict(labels)["le"]: v for labels, v in prometheus.values(f"{name}_bucket", at).items()
        }
        assert len(buckets) >= 10, f"{name}: {buckets}"
        ordered = [buckets[le] for le in sorted(buckets, key=float)]
        assert ordered == sorted(ordered), f"{name}: not cumulative: {buckets}"
        assert buckets["+Inf"] == prometheus.value(f"{name}_count", at) > 0, name
        assert (prometheus.value(f"{name}_sum", at) or 0) > 0, name


def test_a_raw_scrape_passes_promtool_check_metrics(deployment: Deployment) -> None:
    """The exposition is Prometheus text format that promtool finds no naming problem in."""
    deployment.prometheus.wait_targets_up()
    body, content_type = scrape(deployment.metrics)
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    assert "# TYPE tradebalancer_events_forwarded_total counter" in body
    lint = promtool("check", "metrics", stdin=body)
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")


def test_the_sample_alert_rules_evaluate_on_the_live_series(deployment: Deployment) -> None:
    """Prometheus evaluates every sample alert rule on the balancer's series without an error."""
    prometheus = deployment.prometheus
    prometheus.wait_targets_up()

    def evaluated() -> list[dict[str, Any]]:
        groups = prometheus.api("/api/v1/rules")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if all(rule["health"] != "unknown" for rule in rules) else []

    rules = prometheus.wait_for(evaluated, 15, "the rules to be evaluated")
    assert len(rules) == 4
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"


def documented_series() -> dict[str, str]:
    """README's table of the series: {name: type}, a row's names paired with its types."""
    readme = (REPO / "README.md").read_text()
    table = readme.split("\n| series | type | what |\n", 1)[1].split("\n\n", 1)[0]
    series: dict[str, str] = {}
    for row in table.splitlines()[1:]:
        names, kinds = row.split(" | ")[:2]
        names = re.findall(r"`(\w+)(?:\{[\w,]*\})?`", names)
        kinds = [kind.strip() for kind in kinds.split(",")]
        for name, kind in zip(names, kinds * len(names) if len(kinds) == 1 else kinds, strict=True):
            series[f"tradebalancer_{name}"] = kind
    return series


def test_the_readme_lists_every_series_with_its_type(deployment: Deployment) -> None:
    """README's table of the series names each one the balancer exports, its type, no other."""
    deployment.prometheus.wait_targets_up()
    body, _ = scrape(deployment.metrics)
    exported = {
        family.name + ("_total" if family.type == "counter" else ""): family.type
        for family in text_string_to_metric_families(body)
        if family.name.startswith("tradebalancer_")
    }
    assert documented_series() == exported
