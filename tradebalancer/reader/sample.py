"""The sample worker: per-symbol trade statistics from the balancer's pipes, printed as a table.

What a trader looks at first on a trade feed: per symbol the number of trades, the volume (the
sum of the sizes ``s``), the VWAP (the sum of price times size over the volume) and the last
price. Every ``--interval`` seconds the worker prints the ``--top`` symbols by volume with the
event totals and rate; at end of file on every pipe, or on SIGTERM or SIGINT, it prints a final
summary and exits 0 (a pipe that does not carry the balancer's framing: exit 71)::

    python -m tradebalancer.sample [--name NAME] [--interval 5] [--top 10] FD [FD ...]
    python -m tradebalancer.reader.sample ...     the same, on a host with the reader alone

    == demo-0 14:03:05  events 24,689 (4,937/s)  trades 24,689  symbols 312
    symbol     trades         volume         vwap         last
    AAPL          812         61,350     189.4127     189.4400

Owns the statistics and their table; reads its pipes only through ``tradebalancer.reader`` and
knows nothing else of the balancer. Non-trade events (quotes, aggregates, ...) are counted by
their ``ev``; events that are not JSON objects, and trades without a numeric price and size, are
counted as invalid and otherwise ignored: a worker never dies of a bad event.

Design notes: messages are parsed one by one with orjson where it is installed, else with the
standard library's json (the reader needs no third-party package; joining a batch into one JSON
array and parsing it once measured no faster); a symbol's figures live in a ``__slots__`` object,
whose attribute updates are the cheapest per-trade work CPython offers. Signals only set a flag:
the reader wakes up at least every quarter second, so the loop stops between batches and the
final summary is consistent.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from types import FrameType

try:  # orjson when the worker host has it (3-4x faster), the standard library's json else
    from orjson import loads as _loads
except ImportError:  # pragma: no cover - a reader-only host
    from json import loads as _loads  # type: ignore[assignment]

from . import ProtocolError, Reader

logger = logging.getLogger(__name__)

EX_OK, EX_OSERR = 0, 71  # sysexits.h: a pipe that does not carry the framing is an OS error
WAKE_UP = 0.25  # seconds: the longest a stop signal or a due table waits while pipes are idle


class SymbolStats:
    """One symbol's trades: count, volume, notional (sum of price * size) and last price."""

    __slots__ = ("count", "last", "notional", "volume")

    def __init__(self) -> None:
        self.count = 0
        self.volume: int | float = 0
        self.notional = 0.0
        self.last = 0.0

    @property
    def vwap(self) -> float | None:
        """The volume-weighted average price, or None before any volume."""
        return self.notional / self.volume if self.volume else None


class Tally:
    """Everything the worker has counted so far; no I/O and no clock."""

    def __init__(self) -> None:
        self.symbols: dict[str, SymbolStats] = {}
        self.events = 0
        self.trades = 0
        self.invalid = 0
        self.other: Counter[str] = Counter()  # non-trade events by their "ev"

    def add(self, messages: Sequence[bytes]) -> None:
        """Count the events in ``messages`` (one event's JSON each)."""
        self.events += len(messages)
        symbols = self.symbols
        loads = _loads
        for message in messages:
            try:
                event = loads(message)
                kind = event["ev"]
            except (ValueError, KeyError, TypeError):  # JSONDecodeError is a ValueError
                self.invalid += 1
                continue
            if kind != "T":
                self.other[str(kind)] += 1
                continue
            try:
                symbol = event["sym"]
                price = event["p"] + 0.0  # TypeError unless a number: no string arithmetic
                size = event["s"] + 0
                notional = price * size
            except (KeyError, TypeError):
                symbol = None
            if not isinstance(symbol, str):
                self.invalid += 1
                continue
            stats = symbols.get(symbol)
            if stats is None:
                stats = symbols[symbol] = SymbolStats()
            stats.count += 1
            stats.volume += size
            stats.notional += notional
            stats.last = price
            self.trades += 1

    def top(self, count: int) -> list[tuple[str, SymbolStats]]:
        """The ``count`` symbols with the largest volume, largest first (ties: by symbol)."""
        ranked = sorted(self.symbols.items(), key=lambda item: (-item[1].volume, item[0]))
        return ranked[:count]


def format_number(value: float) -> str:
    """Thousands separators; a fraction only for a quantity that has one."""
    if isinstance(value, int) or value.is_integer():
        return f"{value:,.0f}"
    return f"{value:,.2f}"


def format_price(value: float | None) -> str:
    """Prices with four decimals (sub-penny prices exist below $1); '-' for none."""
    return "-" if value is None else f"{value:,.4f}"


def format_table(tally: Tally, *, title: str, rate: float, top: int, skipped_bytes: int = 0) -> str:
    """The report: a totals line, then the top symbols by volume, one per line."""
    totals = [
        f"== {title}",
        f"events {tally.events:,} ({rate:,.0f}/s)",
        f"trades {tally.trades:,}",
        f"symbols {len(tally.symbols):,}",
    ]
    if tally.other:
        kinds = ", ".join(f"{kind} {count:,}" for kind, count in sorted(tally.other.items()))
        totals.append(f"other: {kinds}")
    if tally.invalid:
        totals.append(f"invalid {tally.invalid:,}")
    if skipped_bytes:
        totals.append(f"skipped {skipped_bytes:,} bytes")
    rows = tally.top(top)
    if not rows:
        return "  ".join(totals) + "\n"
    width = max(6, *(len(symbol) for symbol, _ in rows))
    header = f"{'symbol':<{width}} {'trades':>10} {'volume':>14} {'vwap':>12} {'last':>12}"
    lines = ["  ".join(totals), header]
    lines.extend(
        f"{symbol:<{width}} {stats.count:>10,} {format_number(stats.volume):>14} "
        f"{format_price(stats.vwap):>12} {format_price(stats.last):>12}"
        for symbol, stats in rows
    )
    return "\n".join(lines) + "\n"


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """The command line; argparse exits 2 on a bad one."""
    parser = argparse.ArgumentParser(
        prog="python -m tradebalancer.sample",
        description="Per-symbol trades, volume, VWAP and last price from tradebalancer pipes.",
    )
    parser.add_argument("--name", default="sample", help="shown in every table (default: sample)")
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between tables")
    parser.add_argument("--top", type=int, default=10, help="symbols per table, by volume")
    parser.add_argument("fds", metavar="FD", type=int, nargs="+", help="pipe read ends")
    arguments = parser.parse_args(argv)
    if arguments.interval <= 0:
        parser.error(f"--interval must be positive, got {arguments.interval}")
    if arguments.top < 0:
        parser.error(f"--top must be 0 or more, got {arguments.top}")
    return arguments


def run(arguments: argparse.Namespace) -> int:
    """Read until every pipe ends or a signal comes; print tables; return the exit code."""
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tally = Tally()
    code = EX_OK
    started = last_report = time.monotonic()
    reported_events = 0
    reader = Reader(arguments.fds)
    try:
        for _, messages in reader.batches(timeout=min(arguments.interval, WAKE_UP)):
            if messages:
                tally.add(messages)
            now = time.monotonic()
            if now - last_report >= arguments.interval:
                rate = (tally.events - reported_events) / (now - last_report)
                title = f"{arguments.name} {time.strftime('%H:%M:%S')}"
                show(tally, title, rate, arguments.top, reader.skipped_bytes)
                last_report, reported_events = now, tally.events
            if stopping:
                break
    except ProtocolError as exc:
        logger.error("%s: %s", arguments.name, exc)
        code = EX_OSERR
    finally:
        reader.close()
    elapsed = time.monotonic() - started
    why = "stopped" if stopping else ("protocol error" if code else "end of file")
    title = f"{arguments.name} final ({why}) after {elapsed:,.1f} s"
    show(tally, title, tally.events / max(elapsed, 1e-9), arguments.top, reader.skipped_bytes)
    return code


def show(tally: Tally, title: str, rate: float, top: int, skipped_bytes: int) -> None:
    """Print one table in one write and flush it, so tables never interleave with other output."""
    sys.stdout.write(
        format_table(tally, title=title, rate=rate, top=top, skipped_bytes=skipped_bytes)
    )
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """The entry point of ``python -m tradebalancer.sample``."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # live output under `make demo` and systemd
    return run(parse_arguments(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
