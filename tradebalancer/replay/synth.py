"""Synthetic trades and recording files: the frames the replay feed serves.

Owns two things the replay feed reads from (``stream.py``): a deterministic generator of
realistic stock trades, and the recording file format. It does no networking.

Synthetic trades look like the Massive (Polygon.io) stocks trade events, with the fields in the
order ``ev,sym,i,x,p,s,c,t,q,z`` and, for trades reported to a Trade Reporting Facility
(exchange 4), ``trfi`` and ``trft`` after them::

    {"ev":"T","sym":"AAPL","i":"52983525029461","x":4,"p":187.31,"s":100,"c":[14,41],
     "t":1704205800000,"q":1234,"z":3,"trfi":202,"trft":1704205799998}

``c`` (the conditions) is absent for regular trades. Symbols (4,000 by default) are unique
names of 1 to 5 capital letters, a few with a share class (``BRK.B``); their popularity follows
a Zipf-Mandelbrot law, weight ``1 / (rank + 2)``, so the most traded symbol gets a few percent
of the trades (5% for 4,000 symbols) and the median one under 0.01%, as on a real tape. Everything
derives from ``random.Random(seed)``: the same arguments give the same bytes. A frame holds
``min_batch`` to ``max_batch`` trades (50 to 500); a trade is about 110 bytes.

Recording file format (what ``tradebalancer replay --source FILE`` reads)::

    # comment lines and blank lines are ignored
    [{"ev":"T","sym":"AAPL",...},{"ev":"T","sym":"MSFT",...}]
    [{"ev":"T","sym":"SPY",...}]

One websocket message per line: a JSON array of events, in UTF-8, sent byte for byte as it
appears on the line (surrounding white space stripped). The file may be compressed with gzip
(recognised by its magic bytes, whatever its name); ``write_recording`` compresses when the
name ends in ``.gz``. A line that is not a JSON array is an error naming the file and the line.
"""

from __future__ import annotations

import gzip
import math
import random
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

from ..errors import ConfigError

DEFAULT_SEED = 1
DEFAULT_SYMBOLS = 4000
# 2024-01-02 14:30:00 UTC, the opening bell in New York: timestamps start there (ms).
START_MS = 1_704_205_800_000

_GZIP_MAGIC = b"\x1f\x8b"
# The most traded US tickers lead the ranking so the demo's output looks familiar.
_LEADERS = (
    *("SPY", "TSLA", "NVDA", "AAPL", "QQQ", "AMD", "AMZN", "MSFT", "META", "PLTR", "SOXL"),
    *("TQQQ", "IWM", "GOOGL", "SQQQ", "INTC", "F", "BAC", "NIO", "MARA", "SOFI", "BRK.B"),
    *("XLF", "AAL", "T", "GOOG", "UBER"),
)
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Exchange ids (Massive's stock exchanges list) weighted roughly by their share of trades;
# 4 is the FINRA TRF (off-exchange), which carries trfi/trft.
_EXCHANGES = (4, 4, 4, 4, 11, 11, 12, 12, 12, 15, 8, 10, 19, 21, 7, 20, 1, 2, 3, 17)
_TRF_IDS = (201, 202, 203)
# Conditions of regular lots: mostly none; 37 odd lot is added for sizes under 100.
_CONDITIONS = ("", "", "", "", "", "14,41", "12", "41", "14", "12,37")
_SIZES = (100, 100, 100, 100, 200, 300, 500, 1000, 1, 2, 5, 10, 15, 25, 50, 60, 75, 99, 150, 400)


def make_symbols(count: int, seed: int = DEFAULT_SEED) -> list[str]:
    """Return ``count`` unique realistic ticker names, the most popular first."""
    rng = random.Random(f"symbols-{seed}")
    names = list(_LEADERS[:count])
    seen = set(names)
    while len(names) < count:
        length = rng.choices((1, 2, 3, 4, 5), weights=(1, 6, 30, 55, 8))[0]
        name = "".join(rng.choice(_LETTERS) for _ in range(length))
        if length <= 4 and rng.random() < 0.02:
            name += "." + rng.choice("AB")
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


def popularity(count: int) -> list[float]:
    """Return the cumulative Zipf-Mandelbrot weights ``1 / (rank + 2)`` of ``count`` symbols."""
    cumulative: list[float] = []
    total = 0.0
    for rank in range(1, count + 1):
        total += 1.0 / (rank + 2)
        cumulative.append(total)
    return cumulative


class _Symbol:
    """One symbol's constant parts: the JSON head of its trades, its tape and price ladder."""

    __slots__ = ("head", "prices", "tail")

    def __init__(self, name: str, rng: random.Random) -> None:
        self.head = f'{{"ev":"T","sym":"{name}","i":"'
        tape = rng.choice((1, 2, 3, 3))  # Nasdaq-listed (tape C) are the most numerous
        self.tail = f',"z":{tape}'
        base = min(max(math.exp(rng.gauss(3.3, 1.3)), 0.35), 4000.0)
        tick = 0.0001 if base < 1.0 else 0.01
        digits = 4 if base < 1.0 else 2
        # A ladder of 32 nearby prices: formatting floats per trade would cost a third of
        # the generation time.
        self.prices = [
            f"{max(tick, round(base * (1 + rng.gauss(0, 0.002)) / tick) * tick):.{digits}f}"
            for _ in range(32)
        ]


def _combination(rng: random.Random) -> tuple[bool, str, str]:
    """Draw one (off exchange, '","x":X,"p":', ',"s":S,"c":[C],"t":') combination."""
    exchange = rng.choice(_EXCHANGES)
    size = rng.choice(_SIZES)
    condition = rng.choice(_CONDITIONS)
    if size < 100:
        condition = condition + ",37" if condition else "37"
    conditions_field = f',"c":[{condition}]' if condition else ""
    return exchange == 4, f'","x":{exchange},"p":', f',"s":{size}{conditions_field},"t":'


def generate_frames(
    seed: int = DEFAULT_SEED,
    symbols: int = DEFAULT_SYMBOLS,
    count_events: int = 100_000,
    min_batch: int = 50,
    max_batch: int = 500,
) -> Iterator[bytes]:
    """Yield frames (compact JSON arrays as bytes) holding ``count_events`` trades in all.

    Deterministic: the same arguments give the same bytes. The last frame may be smaller
    than ``min_batch`` so the total is exact.
    """
    if symbols < 1 or min_batch < 1 or max_batch < min_batch or count_events < 0:
        raise ConfigError(
            "replay",
            f"synthetic trades need symbols >= 1 and 1 <= min_batch <= max_batch, got "
            f"symbols={symbols}, min_batch={min_batch}, max_batch={max_batch}",
        )
    rng = random.Random(seed)
    names = make_symbols(symbols, seed)
    table = [_Symbol(name, rng) for name in names]
    cumulative = popularity(symbols)
    # The exchange, size and conditions of a trade come from one draw in a table of 4,096
    # pre-formatted combinations: a third of the time of drawing and formatting each field.
    combos = [_combination(rng) for _ in range(4096)]
    sequence = 0
    choices = rng.choices
    randrange = rng.randrange
    getrandbits = rng.getrandbits
    left = count_events
    while left > 0:
        batch = min(left, randrange(min_batch, max_batch + 1))
        left -= batch
        parts: list[str] = []
        append = parts.append
        for symbol in choices(table, cum_weights=cumulative, k=batch):
            sequence += 1
            # About 20 trades per millisecond, a busy but ordinary minute of the firehose.
            stamp = START_MS + sequence // 20
            off_exchange, exchange_part, size_part = combos[getrandbits(12)]
            price = symbol.prices[sequence & 31]
            if off_exchange:
                # TRF trade ids have 14 digits; the TRF timestamp precedes the SIP one.
                append(
                    f"{symbol.head}{getrandbits(46) + 10_000_000_000_000}{exchange_part}{price}"
                    f'{size_part}{stamp},"q":{sequence}{symbol.tail}'
                    f',"trfi":{_TRF_IDS[sequence % 3]},"trft":{stamp - (sequence & 7)}}}'
                )
            else:
                append(
                    f"{symbol.head}{getrandbits(20)}{exchange_part}{price}"
                    f'{size_part}{stamp},"q":{sequence}{symbol.tail}}}'
                )
        yield ("[" + ",".join(parts) + "]").encode()


# -- recordings ------------------------------------------------------------------------------


def read_recording_events(path: str | Path) -> Iterator[tuple[bytes, int]]:
    """Yield each frame of a recording with its number of events; raise ConfigError if bad."""
    name = str(path)
    try:
        with open(path, "rb") as raw:
            compressed = raw.peek(2)[:2] == _GZIP_MAGIC
            with gzip.GzipFile(fileobj=raw, mode="rb") if compressed else raw as lines:
                yield from _parse_lines(name, lines)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ConfigError(name, f"cannot read the recording: {exc}") from exc


def _parse_lines(name: str, lines: Iterable[bytes]) -> Iterator[tuple[bytes, int]]:
    for number, line in enumerate(lines, 1):
        frame = line.strip()
        if not frame or frame.startswith(b"#"):
            continue
        try:
            value = orjson.loads(frame)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(
                f"{name}, line {number}", f"not valid JSON ({exc}); {_EXPECTED}"
            ) from exc
        if not isinstance(value, list):
            raise ConfigError(
                f"{name}, line {number}",
                f"a JSON {type(value).__name__}, not an array; {_EXPECTED}",
            )
        yield frame, len(value)


_EXPECTED = "each line must be one JSON array of events (or blank, or a # comment)"


def read_recording(path: str | Path) -> Iterator[bytes]:
    """Yield the frames of a recording file (plain or gzip), validated, in order."""
    for frame, _ in read_recording_events(path):
        yield frame


def write_recording(path: str | Path, frames: Iterable[bytes], comment: str | None = None) -> int:
    """Write ``frames`` to a recording file (gzip if the name ends in .gz); return the count."""
    written = 0
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as out:
        if comment:
            for line in comment.splitlines():
                out.write(b"# " + line.encode() + b"\n")
        for frame in frames:
            if b"\n" in frame or b"\r" in frame:
                frame = b"".join(frame.splitlines())
            out.write(frame)
            out.write(b"\n")
            written += 1
    return written


# -- frames ----------------------------------------------------------------------------------

# A JSON string (escapes included) or one structural character: enough to find the top-level
# commas of an array without parsing numbers or literals.
_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{},]')


def split_events(frame: bytes) -> list[bytes]:
    """Return the exact bytes of each element of a JSON array, white space around stripped."""
    events: list[bytes] = []
    depth = 0
    start = 0
    for token in _TOKEN.finditer(frame):
        char = frame[token.start()]
        if char in b"[{":
            depth += 1
            if depth == 1:
                start = token.end()
        elif char in b"]}":
            depth -= 1
            if depth == 0:
                element = frame[start : token.start()].strip()
                if element:
                    events.append(element)
                break
        elif char == 0x2C and depth == 1:  # a comma between two top-level elements
            events.append(frame[start : token.start()].strip())
            start = token.end()
    return events
