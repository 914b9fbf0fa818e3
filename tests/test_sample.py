"""The sample worker: its statistics, its tables, and how it ends, as a real child process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import orjson
import pytest

from tradebalancer.reader.sample import EX_OSERR, Tally, format_number, format_table

ROOT = Path(__file__).resolve().parents[1]

# (symbol, price as the feed writes it, size)
TRADES = [
    ("AAPL", "189.25", 100),
    ("MSFT", "410.10", 5),
    ("AAPL", "189.27", 300),
    ("AAPL", "189.2", 50),
    ("MSFT", "409.95", 20),
    ("BRK.A", "612000.5", 1),
    ("AAPL", "189.31", 1),
]


def frame(body: bytes) -> bytes:
    """Frame one event the way the balancer does."""
    return len(body).to_bytes(4, "little") + body


def trade(symbol: str, price: str, size: int) -> bytes:
    """A trade event with the price written exactly as given."""
    return b'{"ev":"T","sym":"%s","x":4,"p":%s,"s":%d,"c":[12],"t":1700000000000}' % (
        symbol.encode(),
        price.encode(),
        size,
    )


def start_sample(*arguments: str, fds: list[int]) -> subprocess.Popen[str]:
    """Run ``python -m tradebalancer.sample`` on ``fds``; the caller's copies are closed."""
    child = subprocess.Popen(
        [sys.executable, "-m", "tradebalancer.sample", *arguments, *map(str, fds)],
        pass_fds=fds,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    for fd in fds:
        os.close(fd)
    return child


def table_rows(output: str, title: str) -> dict[str, list[str]]:
    """The rows of the last table whose totals line contains ``title``, by symbol."""
    blocks = output.split("== ")
    block = [b for b in blocks if b and title in b.splitlines()[0]][-1]
    rows = block.splitlines()[2:]
    return {row.split()[0]: row.split()[1:] for row in rows}


def number(text: str) -> float:
    return float(text.replace(",", ""))


def test_the_final_table_shows_count_volume_vwap_and_last_of_known_trades() -> None:
    """On known trades the final table's VWAP is sum(p*s)/sum(s), computed exactly here."""
    read_fd, write_fd = os.pipe()
    child = start_sample("--name", "known", "--interval", "60", "--top", "5", fds=[read_fd])
    os.write(write_fd, b"".join(frame(trade(*t)) for t in TRADES))
    os.close(write_fd)
    output, errors = child.communicate(timeout=30)
    assert child.returncode == 0, errors
    rows = table_rows(output, "known final (end of file)")
    for symbol in ("AAPL", "MSFT", "BRK.A"):
        mine = [(Fraction(price), size) for s, price, size in TRADES if s == symbol]
        volume = sum(size for _, size in mine)
        vwap = sum((price * size for price, size in mine), Fraction(0)) / volume
        count, shown_volume, shown_vwap, last = rows[symbol]
        assert int(count) == len(mine)
        assert number(shown_volume) == volume
        assert abs(Fraction(shown_vwap.replace(",", "")) - vwap) <= Fraction(1, 20000)
        assert Fraction(last.replace(",", "")) == mine[-1][0]
    assert list(rows) == ["AAPL", "MSFT", "BRK.A"]  # by volume: 451, 25, 1
    assert f"events {len(TRADES)}" in output


def test_non_trade_events_are_counted_by_type_across_several_pipes() -> None:
    """Quotes and aggregates on two pipes are counted by "ev" next to the trades."""
    (read_a, write_a), (read_b, write_b) = os.pipe(), os.pipe()
    child = start_sample("--interval", "60", fds=[read_a, read_b])
    os.write(write_a, frame(trade("SPY", "450.5", 10)) + frame(b'{"ev":"Q","sym":"SPY"}'))
    os.write(write_b, frame(b'{"ev":"AM","sym":"QQQ"}') + frame(b'{"ev":"Q","sym":"QQQ"}'))
    os.close(write_a)
    os.close(write_b)
    output, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    summary = output.split("== ")[-1].splitlines()[0]
    assert "events 4 " in summary
    assert "trades 1 " in summary
    assert "other: AM 1, Q 2" in summary


def test_tables_are_printed_every_interval_while_the_pipes_stay_open() -> None:
    """With the pipe idle, a table still comes out each interval, live (line-buffered)."""
    read_fd, write_fd = os.pipe()
    child = start_sample("--name", "live", "--interval", "0.1", fds=[read_fd])
    os.write(write_fd, frame(trade("AAPL", "1.5", 2)))
    assert child.stdout is not None
    seen = [child.stdout.readline() for _ in range(6)]
    assert any(line.startswith("== live ") and "events 1 " in line for line in seen)
    os.close(write_fd)
    child.communicate(timeout=30)
    assert child.returncode == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_prints_the_final_summary_and_exits_0(signum: int) -> None:
    """SIGTERM or SIGINT while the pipe is open ends the worker cleanly with its figures."""
    read_fd, write_fd = os.pipe()
    child = start_sample("--name", "sig", "--interval", "0.05", fds=[read_fd])
    os.write(write_fd, b"".join(frame(trade(*t)) for t in TRADES))
    assert child.stdout is not None
    for line in child.stdout:  # wait until the worker has counted every trade
        if f"events {len(TRADES)} " in line:
            break
    child.send_signal(signum)
    output, errors = child.communicate(timeout=30)
    os.close(write_fd)
    assert child.returncode == 0, errors
    final = output.split("== ")[-1]
    assert final.startswith("sig final (stopped)")
    assert f"events {len(TRADES)} " in final
    assert "Traceback" not in errors


def test_a_corrupt_pipe_exits_71_after_the_summary() -> None:
    """A body that is not a JSON object after good events is a protocol error: exit 71."""
    read_fd, write_fd = os.pipe()
    child = start_sample("--name", "bad", fds=[read_fd])
    os.write(write_fd, frame(trade("AAPL", "1.0", 1)) + frame(b"[not an object]"))
    output, errors = child.communicate(timeout=30)
    os.close(write_fd)
    assert child.returncode == EX_OSERR
    assert "bad final (protocol error)" in output
    assert "events 1 " in output
    assert "not '{'" in errors


def test_a_worker_started_mid_message_reports_the_skipped_bytes() -> None:
    """Bytes left by a dead predecessor are skipped and shown in the table, not parsed."""
    read_fd, write_fd = os.pipe()
    stream = b"".join(frame(trade(*t)) for t in TRADES)
    os.write(write_fd, stream)
    os.close(write_fd)
    os.read(read_fd, 9)  # the predecessor took the header and 5 bytes of the first event
    child = start_sample("--name", "next", fds=[read_fd])
    output, _ = child.communicate(timeout=30)
    assert child.returncode == 0
    skipped = len(frame(trade(*TRADES[0]))) - 9
    assert f"skipped {skipped} bytes" in output
    assert f"events {len(TRADES) - 1} " in output


def test_bad_arguments_exit_with_usage_errors() -> None:
    """A zero interval or no fd at all is refused by the command line."""
    for arguments in (["--interval", "0", "3"], ["--name", "x"]):
        done = subprocess.run(
            [sys.executable, "-m", "tradebalancer.sample", *arguments],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        assert done.returncode == 2
        assert "usage:" in done.stderr


def test_the_tally_ignores_events_it_cannot_use() -> None:
    """Invalid JSON, non-objects, and trades without a numeric price, size or text symbol."""
    tally = Tally()
    tally.add(
        [
            b"{oops",
            b"[1,2]",
            b'{"no_ev":1}',
            b'{"ev":"T","sym":"A","p":"1.5","s":10}',
            b'{"ev":"T","sym":"A","p":1.5}',
            b'{"ev":"T","sym":["A"],"p":1.5,"s":1}',
            b'{"ev":"T","sym":7,"p":1.5,"s":1}',
            orjson.dumps({"ev": "T", "sym": "A", "p": 2, "s": 3}),
        ]
    )
    assert (tally.events, tally.trades, tally.invalid) == (8, 1, 7)
    stats = tally.symbols["A"]
    assert (stats.count, stats.volume, stats.vwap, stats.last) == (1, 3, 2.0, 2.0)


def test_the_top_symbols_are_by_volume_then_by_name() -> None:
    """Ties in volume are broken by symbol so tables are stable from one print to the next."""
    tally = Tally()
    tally.add([trade(symbol, "1", size) for symbol, size in [("B", 5), ("A", 5), ("C", 9)]])
    assert [symbol for symbol, _ in tally.top(3)] == ["C", "A", "B"]
    assert [symbol for symbol, _ in tally.top(1)] == ["C"]
    table = format_table(tally, title="t", rate=0.0, top=0)
    assert table.count("\n") == 1


def test_quantities_are_shown_with_separators_and_fractions_only_when_present() -> None:
    """Whole volumes print as integers; fractional share volumes keep two decimals."""
    assert format_number(1234567) == "1,234,567"
    assert format_number(1234.0) == "1,234"
    assert format_number(0.5) == "0.50"
