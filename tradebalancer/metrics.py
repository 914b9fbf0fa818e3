"""The instance's numbers as one snapshot, and that snapshot as Prometheus metrics.

Owns what an instance reports about itself beyond the log: ``Snapshot`` gathers it from the
parts (the stats, the forwarder's histograms, the pipes, the workers) into one JSON-able dict,
which ``tradebalancer status`` shows (statusview.py) and ``exposition`` turns into the
Prometheus text format with prometheus_client. One source, so the status view and the
dashboards never disagree. Gathering happens when asked (a scrape, a status request), never on
the hot path, which only bumps the counters the parts keep anyway.

Names follow Prometheus' conventions: a ``tradebalancer_`` prefix, base units (seconds, bytes),
``_total`` on counters (prometheus_client adds it), labels for what varies (pipe, worker,
reason), an info metric for the constant facts, and a 0/1 gauge per value of an enumeration
(connection state, TLS path), so that a dashboard can plot each.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__
from .config import FeedConfig
from .forward import Forwarder
from .histogram import Histogram
from .pipes import PipeSet
from .stats import Stats
from .workers import WorkerPool

__all__ = ["SCHEMA", "STATES", "TLS_PATHS", "Snapshot", "exposition", "gather", "histogram_view"]

SCHEMA = 1  # the snapshot's layout; `status` refuses one it does not know

STATES = ("starting", "connecting", "connected", "streaming", "refused", "closing", "reconnecting")
TLS_PATHS = ("kernel", "user", "kernel tx/user rx", "none")

Snapshot = dict[str, Any]


def histogram_view(histogram: Histogram) -> dict[str, Any]:
    """A histogram as the snapshot holds it: bounds, per-bucket counts, sum, count."""
    return {
        "bounds": list(histogram.bounds),
        "counts": histogram.reading(),
        "sum": histogram.sum,
        "count": histogram.count,
    }


def exposition(snapshot: Snapshot) -> bytes:
    """The snapshot in the Prometheus text format (version 0.0.4)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        info = InfoMetricFamily("tradebalancer", "The instance: its feed, version and URL.")
        info.add_metric([], {"feed": s["feed"], "version": __version__, "url": s["url"]})
        yield info
        yield from _counters(s)
        yield from _per_pipe(s["pipes"])
        yield from _per_worker(s["workers"])
        yield _one_hot(
            "tradebalancer_connection_state",
            "1 for the connection's current state, 0 for the others.",
            "state",
            STATES,
            s["state"],
        )
        yield _one_hot(
            "tradebalancer_tls_path",
            "1 for the TLS path of the current connection (kernel, user space), 0 for others.",
            "path",
            TLS_PATHS,
            s["tls"],
        )
        yield _gauge(
            "tradebalancer_refused_channels",
            "Subscriptions the feed refused on the current connection.",
            len(s["refused_channels"]),
        )
        yield _gauge(
            "tradebalancer_backlog_bytes",
            "Bytes held for the workers in all the pipes' backlogs.",
            sum(pipe["backlog"] for pipe in s["pipes"]),
        )
        yield _gauge(
            "tradebalancer_behind_market",
            "1 while the delay behind the market is over delay_warning (a warning was logged).",
            1.0 if s["behind"] else 0.0,
        )
        yield _histogram(
            "tradebalancer_market_delay_seconds",
            "Delay behind the market: the wall clock minus the timestamp of each frame's "
            "last event.",
            s["delay"],
        )
        yield _histogram(
            "tradebalancer_forward_latency_seconds",
            "From the balancer's wake-up for the socket to the write into the pipes, per batch.",
            s["latency"],
        )
        yield _gauge(
            "tradebalancer_start_time_seconds",
            "When the instance started, in seconds since the epoch.",
            s["started"],
        )


def _counters(s: Snapshot) -> Iterator[Metric]:
    plain = (
        ("frames_received", "Websocket data messages received from the feed.", "frames"),
        ("received_bytes", "Plaintext bytes read from the feed.", "received_bytes"),
        ("events_received", "Events found in valid frames.", "events_received"),
        ("events_forwarded", "Events written or queued to a pipe.", "events"),
        ("forwarded_bytes", "Bytes of the events forwarded, without pipe headers.", "bytes"),
        ("backpressure_seconds", "Time reading the feed was paused for the workers.", "paused"),
        (
            "frames_ahead_of_clock",
            "Frames stamped later than this host's clock (counted as no delay): clock skew.",
            "ahead",
        ),
    )
    for name, documentation, key in plain:
        counter = CounterMetricFamily(f"tradebalancer_{name}", documentation)
        counter.add_metric([], s[key])
        yield counter
    labelled = (
        ("frames_rejected", "Frames dropped as not a JSON array of objects.", "rejected", "reason"),
        ("events_not_forwarded", "Events never written, by reason.", "not_forwarded", "reason"),
        ("reconnects", "Connections to the feed that ended, by reason.", "reconnects", "reason"),
        ("reloads", "Reloads of the configuration, by result.", "reloads", "result"),
    )
    for name, documentation, key, label_name in labelled:
        counter = CounterMetricFamily(f"tradebalancer_{name}", documentation, labels=[label_name])
        for label, value in sorted(s[key].items()):
            counter.add_metric([label], value)
        yield counter


def _per_pipe(pipes: list[Mapping[str, Any]]) -> Iterator[Metric]:
    labels = ["pipe", "worker"]
    events = CounterMetricFamily(
        "tradebalancer_pipe_events", "Events routed to each pipe.", labels=labels
    )
    written = CounterMetricFamily(
        "tradebalancer_pipe_written_bytes",
        "Bytes written into each pipe, 4-byte headers included.",
        labels=labels,
    )
    backlog = GaugeMetricFamily(
        "tradebalancer_pipe_backlog_bytes",
        "Bytes held for each pipe's worker because its pipe is full.",
        labels=labels,
    )
    lost = CounterMetricFamily(
        "tradebalancer_pipe_lost_events",
        "Events a JetStream bridge read from each pipe and never stored, counted by the bridge "
        "that followed it: not delivered (0 for pipes to local workers).",
        labels=labels,
    )
    for pipe in pipes:
        key = [str(pipe["index"]), str(pipe["worker"])]
        events.add_metric(key, pipe["events"])
        written.add_metric(key, pipe["written"])
        backlog.add_metric(key, pipe["backlog"])
        lost.add_metric(key, pipe.get("lost", 0))
    yield from (events, written, backlog, lost)


def _per_worker(workers: list[Mapping[str, Any]]) -> Iterator[Metric]:
    restarts = CounterMetricFamily(
        "tradebalancer_worker_restarts", "Times each worker was started again.", labels=["worker"]
    )
    up = GaugeMetricFamily(
        "tradebalancer_worker_up", "1 while the worker's process runs.", labels=["worker"]
    )
    for worker in workers:
        restarts.add_metric([str(worker["index"])], worker["restarts"])
        up.add_metric([str(worker["index"])], 1.0 if worker["pid"] else 0.0)
    yield from (restarts, up)


def _one_hot(
    name: str, documentation: str, label: str, values: tuple[str, ...], current: str
) -> GaugeMetricFamily:
    """A 0/1 gauge per value of an enumeration, 1 for ``current``."""
    gauge = GaugeMetricFamily(name, documentation, labels=[label])
    for value in values:
        gauge.add_metric([value], 1.0 if current == value else 0.0)
    return gauge


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    gauge = GaugeMetricFamily(name, documentation)
    gauge.add_metric([], value)
    return gauge


def _histogram(name: str, documentation: str, view: Mapping[str, Any]) -> HistogramMetricFamily:
    buckets, total = [], 0
    for bound, count in zip([*map(repr, view["bounds"]), "+Inf"], view["counts"], strict=True):
        total += count
        buckets.append((bound, total))
    family = HistogramMetricFamily(name, documentation)
    family.add_metric([], buckets, view["sum"])
    return family


def process_facts() -> dict[str, Any]:
    """The facts of this process the snapshot carries."""
    return {"pid": os.getpid(), "version": __version__, "schema": SCHEMA}


def gather(
    config: FeedConfig,
    stats: Stats,
    forwarder: Forwarder | None,
    pipes: PipeSet,
    pool: WorkerPool | None,
    *,
    received_bytes: int,  # by the connection under way: stats count those that are over
    now: float,
    lost: Mapping[int, int] | None = None,  # pipe -> events a bridge read, never stored
) -> Snapshot:
    """The instance's numbers now, as one JSON-able dict (the layout ``SCHEMA`` names)."""
    snapshot: Snapshot = process_facts() | {
        "ahead": 0,
        "feed": config.name,
        "url": config.url,
        "state": stats.state,
        "tls": stats.tls,
        "started": stats.started_wall,
        "uptime": now - stats.started_at if stats.started_at is not None else 0.0,
        "subscribe": list(config.subscribe),
        "refused_channels": list(stats.refused_channels),
        "frames": stats.frames,
        "received_bytes": stats.received_bytes + received_bytes,
        "events": stats.events,
        "bytes": stats.bytes,
        "reconnects": dict(stats.reconnect_kinds),
        "reloads": dict(stats.reloads),
        "worker_restarts": stats.worker_restarts,
        "delay_warning": config.delay_warning,
    }
    pipe_events = [0] * len(pipes)
    rejected: dict[str, int] = {}
    not_forwarded = {"too_long": 0}
    paused, behind = 0.0, False
    delay, latency = Histogram(()), Histogram(())
    if forwarder is not None:
        splitter = forwarder.splitter
        pipe_events = splitter.pipe_events()
        rejected = dict(forwarder.rejected_kinds)
        not_forwarded["too_long"] = splitter.refused_events
        paused, behind = forwarder.paused_seconds(now), forwarder.delay_watch.behind
        snapshot["ahead"] = forwarder.ahead_frames
        delay, latency = forwarder.delay, forwarder.latency
    owners = forwarder.pipe_owners if forwarder is not None else {}
    snapshot |= {
        "events_received": stats.events + not_forwarded["too_long"],
        "rejected": rejected,
        "not_forwarded": not_forwarded,
        "paused": paused,
        "behind": behind,
        "delay": histogram_view(delay),
        "latency": histogram_view(latency),
        "pipes": [
            {
                "index": pipe.index,
                "worker": owners.get(pipe.index, -1),
                "events": pipe_events[pipe.index],
                "written": pipe.bytes_written,
                "backlog": pipe.backlog_bytes,
                "lost": (lost or {}).get(pipe.index, 0),
            }
            for pipe in pipes
        ],
        "workers": [
            {
                "index": worker.index,
                "pid": worker.pid,
                "restarts": worker.restarts,
                "pipes": list(worker.pipe_indexes),
            }
            for worker in (pool.workers if pool is not None else [])
        ],
    }
    return snapshot
