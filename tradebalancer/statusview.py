"""``tradebalancer status`` and ``reload``: ask a running instance over its control socket.

Owns the client side of the control socket (control.py serves it) and the terminal view of a
snapshot (metrics.py gathers it): state, URL, TLS path, rates, the delay percentiles, and per
pipe and worker their rates, backlog, PID and restarts. Rates and percentiles come from two
snapshots ``interval`` seconds apart, so they are those of the last seconds, not averages since
the start. Must not touch: the configuration beyond finding the socket, the daemon's parts.
"""

from __future__ import annotations

import errno
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson

from .errors import ControlError, ExitCode
from .histogram import quantile
from .metrics import SCHEMA, Snapshot
from .units import format_size

__all__ = ["ask", "fetch", "render", "watch"]

TIMEOUT = 10.0


def ask(path: str, method: str, target: str, name: str) -> tuple[int, bytes]:
    """Send one request over the control socket at ``path``; return (status, body)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(TIMEOUT)
    try:
        sock.connect(path)
        sock.sendall(f"{method} {target} HTTP/1.0\r\n\r\n".encode())
        answer = bytearray()
        while chunk := sock.recv(65536):
            answer += chunk
    except FileNotFoundError:
        raise ControlError(
            f"tradebalancer@{name} is not running here (no control socket at {path}): start it "
            f"with `systemctl start tradebalancer@{name}`, or give --socket"
        ) from None
    except PermissionError:
        raise ControlError(
            f"only root and the service's user may use {path}: run this with sudo"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ECONNREFUSED:
            raise ControlError(
                f"nothing answers on {path}: tradebalancer@{name} stopped (the socket is left "
                "from it)"
            ) from None
        raise ControlError(f"cannot ask tradebalancer@{name} at {path}: {exc}") from None
    finally:
        sock.close()
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    try:
        status = int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise ControlError(f"not an HTTP answer from {path}: {bytes(answer[:60])!r}") from None
    return status, body


def fetch(path: str, name: str) -> Snapshot:
    """The instance's snapshot."""
    status, body = ask(path, "GET", "/status", name)
    snapshot = orjson.loads(body) if status == 200 else None
    if not isinstance(snapshot, dict) or snapshot.get("schema") != SCHEMA:
        raise ControlError(
            f"tradebalancer@{name} answered something this version cannot read (HTTP {status}): "
            "is it the same version as this command? `systemctl restart` it after an upgrade"
        )
    return snapshot


def render(before: Snapshot, after: Snapshot, seconds: float) -> str:
    """The view of ``after``, with rates and percentiles since ``before``."""

    def rate(key: str, a: Any = before, b: Any = after) -> float:
        return (b[key] - a[key]) / seconds if seconds > 0 else 0.0

    s = after
    refused = ", ".join(s["refused_channels"]) or "-"
    rejected = sum(s["rejected"].values())
    reconnects = ", ".join(f"{k} {v}" for k, v in sorted(s["reconnects"].items())) or "none"
    lines = [
        f"tradebalancer@{s['feed']} {s['version']}, pid {s['pid']}, up {_duration(s['uptime'])}",
        f"  state       {s['state']}: {s['url']}, TLS {s['tls']}",
        f"  subscribed  {', '.join(s['subscribe'])}; refused: {refused}",
        f"  events      {rate('events'):,.0f}/s forwarded, {rate('frames'):,.0f} frames/s, "
        f"{rate('received_bytes') / 1e6:.1f} MB/s from the feed; {s['events']:,} in all",
        f"  delay       {_percentiles(before['delay'], after['delay'], 1.0)} behind the market"
        + ("  ** over delay_warning **" if s["behind"] else ""),
        f"  forwarding  {_percentiles(before['latency'], after['latency'], 1e6, 'us')} "
        "from wake-up to pipe write",
        f"  problems    rejected frames {rejected}, too long {s['not_forwarded']['too_long']}, "
        f"reconnects: {reconnects}; backpressure {s['paused']:.1f} s in all",
        "",
        "  pipe  worker      events/s       backlog",
    ]
    old_pipes = {pipe["index"]: pipe for pipe in before["pipes"]}
    for pipe in s["pipes"]:
        old = old_pipes.get(pipe["index"], pipe)
        lines.append(
            f"  {pipe['index']:>4}  {pipe['worker']:>6}  {rate('events', old, pipe):>12,.0f}  "
            f"{format_size(pipe['backlog']):>12}"
        )
    lines += ["", "  worker      pid  restarts  pipes"]
    for worker in s["workers"]:
        pid = str(worker["pid"]) if worker["pid"] else "(down)"
        pipes = ",".join(map(str, worker["pipes"]))
        lines.append(f"  {worker['index']:>6}  {pid:>7}  {worker['restarts']:>8}  {pipes}")
    return "\n".join(lines) + "\n"


def watch(
    path: str,
    name: str,
    *,
    interval: float,
    repeat: bool,
    out: TextIO = sys.stdout,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Show the status once (after one ``interval``), or refreshed every ``interval`` until
    interrupted; return the exit code."""
    before, at = fetch(path, name), clock()
    try:
        while True:
            sleep(interval)
            after, now = fetch(path, name), clock()
            if after["pid"] != before["pid"]:  # restarted meanwhile: counting starts over
                before, at = after, now
                continue
            view = render(before, after, now - at)
            out.write(("\x1b[H\x1b[2J" if repeat and out.isatty() else "") + view)
            out.flush()
            if not repeat:
                return int(ExitCode.OK)
            before, at = after, now
    except KeyboardInterrupt:
        return int(ExitCode.OK)


def _percentiles(before: Snapshot, after: Snapshot, scale: float, unit: str = "s") -> str:
    bounds = after["bounds"]
    values = [quantile(bounds, before["counts"], after["counts"], q) for q in (0.5, 0.9, 0.99)]
    if values[0] is None:
        return "(no samples)"
    return "p50 {} p90 {} p99 {} {}".format(*(f"{(v or 0.0) * scale:.3g}" for v in values), unit)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {secs}s"
