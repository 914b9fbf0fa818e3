"""How many nanoseconds per event tradebalancer.split spends (not collected by pytest).

Frames of 300 trades (the feed's usual layout, about 115 bytes per event) over 4,000 symbols
drawn with Zipf weights (rank r has weight 1/r), as a busy feed sends them. Every case routes
the same 20 frames over and over after one warm-up pass (so the pipe caches are as warm as a
live feed's) and prints the best of ``--repeat`` runs:

    .venv/bin/python tests/bench_split.py [--events 300] [--repeat 15]

``C`` and ``C mixed`` are the C router (_fastsplit.c) on them; ``layout`` is the Python fast
path on trade frames; ``mixed`` the fast path on frames of trades and
quotes interleaved; ``strict`` the layout frames with ``strict=True``; ``slow`` the same trades
written with spaces after ``,`` and ``:`` (the exact slow path); ``orjson`` is ``orjson.loads``
alone on the layout frames, for scale.

Designs compared on this 2-core machine, ns per event on one 300-trade frame (venv CPython
3.11.7 / Debian's PGO-built 3.11.2), before the chosen one:

- one compiled regex, ``findall`` of (event, key) with a strict JSON grammar: 1,660 (a loose
  ``[^{}]*`` grammar: 830); the regex engine steps byte by byte;
- ``orjson.loads`` to validate everything: 440-500 alone, over the whole budget;
- ``split`` on ``},{"ev":"``, then ``find`` and slice for each key, concatenation for each
  event: 480 / 230; keying a pipe cache on the event's first bytes instead: 281 / 234;
- ``replace`` of ``},{`` by ``}\0{`` then ``split`` on NUL, so the pieces are the events: 264 /
  219, but proving no nested object then needs ``bytes.count(b"{")``, 40-100 more;
- C-level pipelines (``map``, ``zip``, ``itemgetter``, ``deque(..., 0)``) instead of the loop:
  no faster (288-340 / 232-240);
- chosen: ``split`` on the first event's whole head, ``join`` and memchr checks, an 8-byte key
  window, ``piece.join((head, b"}"))`` (one allocation where ``+`` takes two: 42 against
  75 ns): 290 / 265-285 here, with 20 distinct frames.

Unit costs behind that (venv / Debian, ns): ``split`` 75-115 / 50-86 per piece, a short slice
38-45 / 24-34, ``dict.get`` 20, header from a list 18 / 16 (``struct.pack`` 35), two appends
and an index 35-50, ``in`` (memchr) 1-2 per event, ``bytes.count`` of one byte 39 / 98. Two
allocations and four list operations per event already cost 150-180, so 150 ns per event is
out of reach for pure Python here; a small C helper would be the next step.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import time
from collections.abc import Callable
from typing import Any

import orjson

from tradebalancer.split import Splitter

FRAMES = 20
SYMBOLS = 4000


def make_symbols(rng: random.Random) -> list[str]:
    """Return distinct tickers of one to five capital letters, most common first."""
    symbols: dict[str, None] = {}
    while len(symbols) < SYMBOLS:
        symbols["".join(rng.choices(string.ascii_uppercase, k=rng.randint(1, 5)))] = None
    return list(symbols)


Event = dict[str, Any]


def make_events(rng: random.Random, symbols: list[str], count: int, quotes: bool) -> list[Event]:
    """Return ``count`` trade events (every other one a quote if ``quotes``) in feed order."""
    weights = [1 / rank for rank in range(1, len(symbols) + 1)]
    events: list[Event] = []
    for symbol in rng.choices(symbols, weights, k=count):
        if quotes and len(events) % 2:
            event: Event = {"ev": "Q", "sym": symbol, "bx": rng.randint(1, 20)}
            event |= {"bp": round(rng.uniform(1, 500), 2), "bs": rng.randint(1, 90)}
            event |= {"ax": rng.randint(1, 20), "ap": round(rng.uniform(1, 500), 2)}
            event |= {"as": rng.randint(1, 90), "c": 1, "i": [604]}
        else:
            event = {"ev": "T", "sym": symbol, "i": str(rng.randrange(10**13, 10**14))}
            event |= {"x": rng.randint(1, 20), "p": round(rng.uniform(1, 500), 4)}
            event |= {"s": rng.randint(1, 1000)}
            if rng.random() < 0.6:
                event["c"] = sorted(rng.sample([12, 14, 37, 41, 53], rng.randint(1, 3)))
        event |= {"t": 1_700_000_000_000 + len(events), "q": rng.randint(1, 10**7)}
        event["z"] = rng.randint(1, 3)
        events.append(event)
    return events


def best_ns_per_event(run: Callable[[], int], repeat: int) -> float:
    """Return the best of ``repeat`` timings of ``run`` (which returns its event count)."""
    run()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        events = run()
        best = min(best, (time.perf_counter_ns() - start) / events)
    return best


def router(
    frames: list[bytes], pipes: int, strict: bool, path: str, accelerate: bool
) -> Callable[[], int]:
    """Return a function routing every frame once with one Splitter; it checks the path."""
    splitter = Splitter(pipes, strict=strict, accelerate=accelerate)
    out: list[list[bytes]] = [[] for _ in range(pipes)]
    status: list[bytes] = []

    def run() -> int:
        events = 0
        for frame in frames:
            for target in out:
                target.clear()
            events += splitter.route(frame, out, status)
        counted = splitter.fast_frames if path == "fast" else splitter.slow_frames
        assert counted % len(frames) == 0 and counted > 0, f"not all frames took the {path} path"
        return events

    return run


def main() -> None:
    """Print ns per event for each case, with 4 and 16 pipes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300, help="events per frame")
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per case")
    args = parser.parse_args()
    rng = random.Random(20240601)
    symbols = make_symbols(rng)
    trades = [make_events(rng, symbols, args.events, quotes=False) for _ in range(FRAMES)]
    mixed = [make_events(rng, symbols, args.events, quotes=True) for _ in range(FRAMES)]
    layout_frames = [json.dumps(events, separators=(",", ":")).encode() for events in trades]
    mixed_frames = [json.dumps(events, separators=(",", ":")).encode() for events in mixed]
    spaced_frames = [json.dumps(events).encode() for events in trades]
    size = sum(map(len, layout_frames)) / FRAMES / args.events
    print(f"python {sys.version.split()[0]}, {args.events} events per frame, {size:.0f} B/event")

    def parse_only() -> int:
        for frame in layout_frames:
            orjson.loads(frame)
        return int(FRAMES * args.events)

    print(f"{'orjson':8s}           {best_ns_per_event(parse_only, args.repeat):7.1f} ns/event")
    cases = [
        ("C", layout_frames, False, "fast", True),
        ("C mixed", mixed_frames, False, "fast", True),
        ("layout", layout_frames, False, "fast", False),
        ("mixed", mixed_frames, False, "fast", False),
        ("strict", layout_frames, True, "fast", False),
        ("slow", spaced_frames, False, "slow", False),
    ]
    for name, frames, strict, path, accelerate in cases:
        for pipes in (4, 16):
            run = router(frames, pipes, strict, path, accelerate)
            ns = best_ns_per_event(run, args.repeat)
            print(f"{name:8s} {pipes:2d} pipes  {ns:7.1f} ns/event")


if __name__ == "__main__":
    main()
