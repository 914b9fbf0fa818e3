"""The benchmark's source: a pool of pre-generated frames, and what every pipe must receive.

Owns the trades the replay feed serves during a benchmark and the expected result, per pipe,
of sending them: the message count and the CRC-32 chained over every event's bytes in order,
as ``bench/sink.py`` computes them on the other side.

The expectation is computed by an independent reference, not by the balancer's splitter:
``synth.split_events`` (a tokenizing splitter) cuts each frame into its events' exact bytes,
``orjson`` reads each event's ``sym``, and ``routing.pipe_for`` (FNV-1a without any cache)
names its pipe. Equal counts and CRCs on every pipe then prove that the balancer delivered the
exact bytes of every event, once, in order, on the right pipe. The reference costs about 7 us
per event (the tokenizer loops in Python), so it runs once over the pool, for every pipe count
at once.

The stream of a run is the pool sent over and over (``replay.stream.Stream`` with ``loop``) and
cut at a frame boundary: ``trades`` is rounded up to the next boundary, so that the expected CRC
of a pipe is its share of the pool chained ``passes`` times, then its share of the frames of the
partial pass. Trades, not their order within a pass, repeat: for the balancer a symbol seen
before is no cheaper than the first time it was cached, and a pool of a million trades holds
every one of the 4,000 symbols many times over.

Does no networking; builds the ``replay.stream.Stream`` the driver hands to the replay feed.
"""

from __future__ import annotations

import bisect
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from tradebalancer.replay import synth
from tradebalancer.replay.stream import Stream
from tradebalancer.routing import pipe_for


@dataclass(frozen=True)
class PipeShare:
    """One pipe's part of the pool: its events joined in order, and where each frame ends."""

    data: bytes  # the pipe's events of the whole pool, joined, in order
    ends: list[int]  # ends[i]: bytes of ``data`` taken by frames 0..i
    counts: list[int]  # counts[i]: events of the pipe in frames 0..i


class Pool:
    """The pre-generated frames of a benchmark, and the reference split of them by pipe."""

    def __init__(
        self,
        events: int,
        pipe_counts: Sequence[int],
        *,
        seed: int = synth.DEFAULT_SEED,
        symbols: int = synth.DEFAULT_SYMBOLS,
    ) -> None:
        """Generate ``events`` trades and split them for each of ``pipe_counts``."""
        self.seed = seed
        self.symbols = symbols
        self.frames = list(synth.generate_frames(seed, symbols, events))
        self.frame_bytes = sum(len(frame) for frame in self.frames)
        self.counts: list[int] = []  # events per frame, by the reference splitter
        self.shares: dict[int, list[PipeShare]] = {}
        pipes_of: dict[bytes, tuple[int, ...]] = {}  # sym bytes -> its pipe for each count
        parts: dict[int, list[list[bytes]]] = {n: [[] for _ in range(n)] for n in pipe_counts}
        ends: dict[int, list[list[int]]] = {n: [[] for _ in range(n)] for n in pipe_counts}
        tallies: dict[int, list[list[int]]] = {n: [[] for _ in range(n)] for n in pipe_counts}
        sizes = {n: [0] * n for n in pipe_counts}
        numbers = {n: [0] * n for n in pipe_counts}
        for frame in self.frames:
            events_of_frame = synth.split_events(frame)
            self.counts.append(len(events_of_frame))
            for event in events_of_frame:
                key = orjson.loads(event)["sym"].encode()
                pipes = pipes_of.get(key)
                if pipes is None:
                    pipes = pipes_of[key] = tuple(pipe_for(key, n) for n in pipe_counts)
                for n, pipe in zip(pipe_counts, pipes, strict=True):
                    parts[n][pipe].append(event)
                    sizes[n][pipe] += len(event)
                    numbers[n][pipe] += 1
            for n in pipe_counts:
                for pipe in range(n):
                    ends[n][pipe].append(sizes[n][pipe])
                    tallies[n][pipe].append(numbers[n][pipe])
        for n in pipe_counts:
            self.shares[n] = [
                PipeShare(b"".join(parts[n][pipe]), ends[n][pipe], tallies[n][pipe])
                for pipe in range(n)
            ]
        self.cumulative = []  # cumulative[i]: events in frames 0..i
        total = 0
        for count in self.counts:
            total += count
            self.cumulative.append(total)
        self.events = total

    def boundary(self, trades: int) -> int:
        """Return the smallest count of events, at least ``trades``, that ends a frame."""
        passes, rest = divmod(max(trades, 1), self.events)
        if rest == 0:
            return passes * self.events
        return passes * self.events + self.cumulative[bisect.bisect_left(self.cumulative, rest)]

    def _cut(self, trades: int) -> tuple[int, int]:
        """Split a boundary count into whole passes and the frames of the partial pass."""
        if trades != self.boundary(trades):
            raise ValueError(f"{trades} trades do not end a frame; use boundary()")
        passes, rest = divmod(trades, self.events)
        frames = 0 if rest == 0 else bisect.bisect_left(self.cumulative, rest) + 1
        return passes, frames

    def expected(self, pipes: int, trades: int) -> dict[int, tuple[int, int]]:
        """Return ``{pipe: (count, crc32)}`` for a stream of ``trades`` events (a boundary)."""
        passes, frames = self._cut(trades)
        result = {}
        for pipe, share in enumerate(self.shares[pipes]):
            crc = 0
            for _ in range(passes):
                crc = zlib.crc32(share.data, crc)
            count = passes * (share.counts[-1] if share.counts else 0)
            if frames:
                crc = zlib.crc32(memoryview(share.data)[: share.ends[frames - 1]], crc)
                count += share.counts[frames - 1]
            result[pipe] = (count, crc)
        return result

    def payload_bytes(self, trades: int) -> int:
        """Return the bytes of the events (JSON only, as the pipes carry them) in ``trades``."""
        passes, frames = self._cut(trades)
        any_split = next(iter(self.shares.values()))
        whole = sum(len(share.data) for share in any_split)
        partial = sum(share.ends[frames - 1] for share in any_split) if frames else 0
        return passes * whole + partial

    def stream(self, trades: int) -> Stream:
        """Return a replay stream of the pool, looped, that ends after ``trades`` events."""
        self._cut(trades)
        return Stream(self.frames, self.counts, loop=True, limit=trades)
