"""Complete messages -> their events on the pipes, and the word to stop reading when those fill.

Owns the hot path after the feed: the splitter (split.py) cuts each message into its events
and routes them, each pipe's share of a batch goes out in one write (pipes.py), the counts of
what was forwarded, the frames rejected as not JSON (logged with an excerpt, at most once per
stats interval), and backpressure: when the pipes' backlogs together pass ``backlog_limit``
the connection stops reading the socket (TCP then slows the feed down) and says which worker
is behind; it reads again once the backlogs are below half the limit. Nothing is dropped. A
slow worker turns it on and off several times a second: the log tells it as an episode
(episode.py), not as two lines each time.
Must not touch: the socket, the feed protocol (status events found in data frames are handed
back to the caller), the workers.

Why batches: one write() per pipe per receive batch instead of one per event is about 8x
fewer syscalls (0.4 M -> 3 M events/s measured on CPython 3.11), and flushing per websocket
message instead of per batch halves throughput at 16 pipes. A batch is bounded by the receive
buffer (``batch_bytes``, 1 MiB by default: about 3 ms of the full firehose), which bounds the
latency it adds.

Most messages come as runs of plain websocket frames still in the receive buffer (frames.py),
which the splitter routes in one pass (``Splitter.route_frames``); the rest as bytes.

Each frame's delay behind the market (delay.py: the wall clock minus its last event's own
timestamp) goes into a histogram, and each batch's time from the loop's wake-up to the pipe
write into another (histogram.py). For a run the timestamp is read by the C router as it
routes, and only the bisect and two adds are Python's, a few hundred ns a frame: about 1 ns an
event in the replay's frames of 250 events, but as much as the routing itself for frames of
one event. The issue asks for a sample per frame; sampling a batch's last frame only would cut
it where frames are small.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from .config import MAX_PIPES, FeedConfig
from .delay import DelayWatch
from .episode import Episode
from .errors import FrameError
from .frames import Run
from .histogram import DELAY_BOUNDS, LATENCY_BOUNDS, Histogram
from .pipes import PipeSet
from .reader.format import HEADER_SIZE, LIMIT
from .routing import balance_warning, pipe_for
from .split import Splitter, accelerated
from .stats import Stats
from .units import format_size

__all__ = ["Forwarder"]

logger = logging.getLogger(__name__)


class Forwarder:
    """Routes every complete message to the pipes, and watches their backlogs."""

    def __init__(
        self,
        config: FeedConfig,
        pipes: PipeSet,
        stats: Stats,
        pipe_owners: Mapping[int, int],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.pipes = pipes
        self.stats = stats
        self.splitter = Splitter(config.pipes, config.route_keys, config.route_key_default)
        self.pipe_owners = dict(pipe_owners)  # pipe index -> worker index: the log, the stop
        self._out: list[list[bytes]] = [[] for _ in range(config.pipes)]
        self._rejected_unlogged = 0
        self._last_rejected: FrameError | None = None
        self._next_reject_log = 0.0
        self._unkeyed_logged = 0
        self.paused = False  # backpressure: the connection must not read
        self.clock, self.wall = clock, wall
        self.delay = Histogram(DELAY_BOUNDS)  # seconds behind the market, one per frame
        self.latency = Histogram(LATENCY_BOUNDS)  # wake-up to pipe write, one per batch
        self.delay_watch = DelayWatch(logger, config.delay_warning, config.delay_warning_after)
        self.rejected_kinds: dict[str, int] = {}  # FrameError.kind -> frames
        self.ahead_frames = 0  # timestamps ahead of this host's clock: a delay of 0
        # Backpressure comes and goes several times a second with a slow worker: one line when
        # it starts, a summary per stats interval, one when a whole interval passed without it.
        self._backpressure = Episode(logger, "backpressure", "reading paused")
        if (warning := balance_warning(config.pipes, MAX_PIPES)) is not None:
            logger.warning("%s", warning)
        if not accelerated():
            logger.warning(
                "the C router (tradebalancer._fastsplit) is not built: events are split in "
                "Python, at about twice the CPU per event; reinstall the package to build it"
            )

    def forward(self, messages: list[bytes | Run], now: float) -> list[bytes]:
        """Route ``messages`` and write each pipe's share once; return the status events found.

        A message is a frame's payload, or a ``Run`` of whole plain frames still in the receive
        buffer (frames.py), which the splitter routes in one pass.
        """
        out = self._out
        status: list[bytes] = []
        stamps: list[float] = []
        route = self.splitter.route_message
        max_size = self.config.max_message_size
        events = frames = 0
        for message in messages:
            if isinstance(message, Run):
                count, routed, rejected = self.splitter.route_frames(
                    message.view, max_size, out, status, stamps
                )
                frames, events = frames + count, events + routed
                for exc in rejected:
                    self._log_rejected(exc, now)
                continue
            frames += 1
            try:
                events += route(message, out, status, stamps)
            except FrameError as exc:
                self._log_rejected(exc, now)
        if stamps:
            self._observe(stamps, now)
        stats = self.stats
        stats.events += events
        stats.frames += frames
        # The events' own bytes, as Stats.bytes and the metric say: not the pipe headers.
        stats.bytes += self.pipes.write_batch(out) - HEADER_SIZE * events
        self.latency.observe(self.clock() - now)
        if self.pipes.backlog_bytes > self.config.backlog_limit and not self.paused:
            self._pause(now)
        return status

    def _observe(self, stamps: list[float], now: float) -> None:
        # One sample of the delay behind the market per frame; the watch takes the batch's last.
        observe, wall, delay = self.delay.observe, self.wall(), 0.0
        for stamp in stamps:
            delay = wall - stamp
            if delay < 0.0:  # the feed's clock ahead of ours: counted, never a falling _sum
                self.ahead_frames += 1
                delay = 0.0
            observe(delay)
        self.delay_watch.sample(delay, now)

    def reconfigure(self, config: FeedConfig) -> None:
        """Take a reloaded configuration's live keys (reload.py): the delay warning's."""
        self.config = config
        self.delay_watch.threshold = config.delay_warning
        self.delay_watch.after = config.delay_warning_after

    def update_backpressure(self, now: float) -> bool:
        """Lift backpressure once the backlogs are below half the limit; True if it was lifted."""
        if self.paused and self.pipes.backlog_bytes <= self.config.backlog_limit // 2:
            self.paused = False
            self._backpressure.stop(now)
            return True
        return False

    def account(self, now: float) -> None:
        """Bring the stats up to date with the splitter and the pipes (each stats tick).

        The rate-limited lines are written here too, once per tick at most: the rejected frames
        not logged yet, the refused events (too long for the pipe format), the unkeyed events,
        the backpressure episode's summary or end.
        """
        stats, splitter = self.stats, self.splitter
        self._backpressure.tick(now, self._behind())
        if self._rejected_unlogged and self._last_rejected is not None:
            self._write_rejected(self._last_rejected)
        if splitter.unkeyed_events > self._unkeyed_logged:
            logger.warning(
                '%d event(s) had no route key that is a string (missing, or like "sym":7): '
                "each went to the pipe of the empty key, pipe %d",
                splitter.unkeyed_events - self._unkeyed_logged,
                pipe_for(b"", self.config.pipes),
            )
            self._unkeyed_logged = splitter.unkeyed_events
        stats.fast_frames = splitter.fast_frames
        stats.slow_frames = splitter.slow_frames
        stats.rejected_frames = splitter.rejected_frames
        stats.unkeyed_events = splitter.unkeyed_events
        if splitter.refused_events > stats.refused_events and splitter.last_refused is not None:
            size, excerpt = splitter.last_refused
            logger.warning(
                "refused %d event(s) of %s or more, which the pipe format cannot carry (no "
                "worker could read them); the last, %s: %r",
                splitter.refused_events - stats.refused_events,
                format_size(LIMIT),
                format_size(size),
                excerpt,
            )
            stats.refused_events = splitter.refused_events
        worst = self.pipes.worst()
        stats.largest_backlog = worst.backlog_bytes
        stats.largest_backlog_worker = self.pipe_owners.get(worst.index)

    def paused_seconds(self, now: float) -> float:
        """Seconds reading was paused for the workers since the start, the pause under way too."""
        return self._backpressure.seconds_on(now)

    def _pause(self, now: float) -> None:
        self.paused = True
        self._backpressure.start(
            now,
            f"backpressure: {format_size(self.pipes.backlog_bytes)} queued for the workers "
            f"(limit {format_size(self.config.backlog_limit)}); {self._behind()}; not reading "
            "the feed until it catches up",
        )
        self.stats.backpressure_episodes = self._backpressure.episodes

    def _behind(self) -> str:
        worst = self.pipes.worst()
        return (
            f"worker {self.pipe_owners.get(worst.index, -1)} is behind (pipe {worst.index} "
            f"holds {format_size(worst.backlog_bytes)})"
        )

    def _log_rejected(self, exc: FrameError, now: float) -> None:
        # One line per stats interval at most: a feed gone wrong must not flood the journal;
        # what comes after the line waits for the next stats tick (account).
        self._rejected_unlogged += 1
        self.rejected_kinds[exc.kind] = self.rejected_kinds.get(exc.kind, 0) + 1
        self._last_rejected = exc
        if now >= self._next_reject_log:
            self._write_rejected(exc)
            self._next_reject_log = now + self.config.stats_interval

    def _write_rejected(self, exc: FrameError) -> None:
        logger.warning(
            "dropped %d frame(s) that are not a JSON array of objects; the last (%s): %r",
            self._rejected_unlogged,
            exc.reason,
            exc.excerpt,
        )
        self._rejected_unlogged = 0
