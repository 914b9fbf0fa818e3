"""The service: the one event loop that wires transport, feed, splitter, pipes and workers.

Owns the order of things and nothing of their insides. One thread, one epoll selector:

    socket readable -> receive_into one big buffer (a *batch*) -> Feed.receive_data
        -> Splitter.route every complete message into per-pipe chunk lists
        -> one write() per pipe per batch; what a pipe does not take waits in its backlog
    pipe writable   -> flush that pipe's backlog
    signals         -> a wakeup fd (signals.py): SIGTERM/SIGINT stop, SIGHUP is logged,
                       SIGCHLD reaps workers; acted on at the top of every turn
    timers          -> keepalive, reconnect, worker respawn, stats/STATUS, watchdog

Why batches: one write() per pipe per receive batch instead of one per event is about 8x
fewer syscalls (0.4 M -> 3 M events/s measured on CPython 3.11), and flushing per websocket
message instead of per batch halves throughput at 16 pipes. A batch is bounded by the receive
buffer (``batch_bytes``, 1 MiB by default: about 3 ms of the full firehose), which bounds the
latency it adds. A 64 KiB buffer costs 20-45% more CPU.

Backpressure: when the backlogs of all pipes together pass ``backlog_limit`` the loop stops
reading the socket (TCP then slows the feed down) and says which worker is behind; it reads
again once the backlogs are below half the limit. Nothing is ever dropped.

Connecting (name lookup, TCP, TLS handshake, kernel TLS hand-off) is a transport.Connector the
loop steps whenever its fd is ready: it never blocks the loop, so pipes are served, timers run
and a stop is honoured meanwhile, and ``connect_timeout`` bounds all of it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import selectors
import signal
import time
from collections.abc import Callable, Mapping

from .backoff import Backoff
from .config import FeedConfig
from .errors import AuthError, ExitCode, KernelTLSUnavailable, TradeBalancerError, TransportError
from .feed import Feed
from .pipes import Pipe, close_pipes, flush_pipes, open_pipes, pipe_max_size
from .plan import plan_workers
from .reader.format import LIMIT
from .routing import balance_warning
from .signals import Signals, install
from .split import FrameError, Splitter
from .stats import Stats
from .systemd import Notifier
from .transport import Connector, Transport
from .units import format_size
from .workers import Worker, WorkerPool, describe_status

logger = logging.getLogger(__name__)

_WAKEUP, _SOCKET, _CONNECTING = "wakeup", "socket", "connecting"
_EXCERPT = 200  # bytes of a rejected frame shown in the log
_MAX_READS_PER_WAKEUP = 16  # then serve timers and pipes before reading on
# READY=1 waits for the first connection attempt to settle (streaming, or failed and retrying),
# so that `systemctl start` fails on a refused key; a feed that accepts the connection but does
# not answer holds it back this long at most (systemd's start timeout is 90 s by default).
_READY_WAIT = 20.0
FLUSH_TIMEOUT = 10.0  # on shutdown: how long backlogs may take to reach the pipes
WORKER_EXIT_TIMEOUT = 10.0  # on shutdown: how long workers get to drain their pipes and exit
WORKER_TERM_TIMEOUT = 5.0  # then SIGTERM, and SIGKILL after this


class Service:
    """Runs one feed instance until it is told to stop or cannot go on."""

    def __init__(
        self,
        feed: FeedConfig,
        api_key: str,
        *,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        environ: Mapping[str, str] | None = None,
        signals: Signals | None = None,
    ) -> None:
        self.config = feed
        self._api_key = api_key
        self.notifier = notifier or Notifier({})
        self.clock = clock
        self.backoff = Backoff(feed.reconnect, rng or random.Random())
        self.environ = dict(os.environ if environ is None else environ)
        self.stats = Stats(url=feed.url)
        self.exit_code = ExitCode.OK
        self.pipes: list[Pipe] = []
        self.pool: WorkerPool | None = None
        self.transport: Transport | None = None
        self.connector: Connector | None = None  # the connection being opened, if any
        self.feed: Feed | None = None
        self.splitter = Splitter(feed.pipes, feed.route_keys, feed.route_key_default)
        self._selector = selectors.DefaultSelector()
        self._buffer = memoryview(bytearray(feed.batch_bytes))
        self._out: list[list[bytes]] = [[] for _ in range(feed.pipes)]
        self._pipe_worker: dict[int, int] = {}
        self._watched: set[int] = set()  # pipes whose writability the selector watches
        self._rejected_unlogged = 0
        self._next_reject_log = 0.0
        self._stopping = False
        self._reap_needed = False
        self._paused = False
        self._more_to_read = False
        self._reconnect_at: float | None = None
        self._next_stats = 0.0
        self._next_watchdog: float | None = None
        self._ready_by: float | None = None  # READY=1 is due by then; None once sent
        self._fallback_logged = False
        self.signals = signals

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the process exit code."""
        try:
            if self.signals is None:
                self.signals = install()
            # From here on a stop must wind things down: the loop acts on it (signals.py).
            self.signals.hand_to_loop()
            self._selector.register(self.signals.fileno(), selectors.EVENT_READ, _WAKEUP)
            self._handle_signals()
            self._start_workers()
            now = self.clock()
            self._ready_by = now + _READY_WAIT
            self._connect(now)
            self._ready_when_settled(now)
            if self.notifier.watchdog_interval:
                self._next_watchdog = now
            self._next_stats = now + self.config.stats_interval
            self._loop()
        except TradeBalancerError as exc:
            logger.error("%s", exc)
            self.exit_code = exc.exit_code
        except Exception:
            logger.exception("unexpected error; stopping (this is a bug, please report it)")
            self.exit_code = ExitCode.FAILURE
        finally:
            self._shutdown()
        return int(self.exit_code)

    def stop(self) -> None:
        """Ask the loop to stop (from a signal handler or a test)."""
        self._stopping = True

    def _handle_signals(self, woken: bool = False) -> None:
        """Act on the signals received since the last turn (see signals.py for why here).

        ``woken``: the wakeup fd is readable, and must be drained whatever it holds.
        """
        signals = self.signals
        if signals is None or not (woken or signals.pending):
            return
        for signum in signals.take():
            if signum is signal.SIGCHLD:
                self._reap_needed = True
            elif signum is signal.SIGHUP:
                logger.warning(
                    "SIGHUP received: reloading the configuration is not supported yet; "
                    "nothing changed (restart the service to apply a new configuration)"
                )
            elif not self._stopping:
                logger.info("%s received: stopping", signum.name)
                self._stopping = True

    def _start_workers(self) -> None:
        config = self.config
        if (warning := balance_warning(config.pipes)) is not None:
            logger.warning("%s", warning)
        if not self.splitter.accelerated:
            logger.warning(
                "the C router (tradebalancer._fastsplit) is not built: events are split in "
                "Python, at about twice the CPU per event; reinstall the package to build it"
            )
        largest = config.pipe_size == "max"
        size = pipe_max_size() if largest else int(config.pipe_size)
        plans = plan_workers(config, self.environ)  # a bad template fails before any pipe
        self.pipes = open_pipes(config.pipes, size, largest=largest)
        workers = []
        for worker in plans:
            for pipe_index in worker.pipes:
                self._pipe_worker[pipe_index] = worker.index
            workers.append(
                Worker(
                    index=worker.index,
                    argv=list(worker.argv),
                    read_fds=[self.pipes[i].read_fd for i in worker.pipes],
                    pipe_indexes=list(worker.pipes),
                    env=worker.env,
                )
            )
        self.pool = WorkerPool(
            workers,
            cwd=plans[0].cwd,
            respawn_initial=config.worker_restart.initial,
            respawn_max=config.worker_restart.max,
            scheduling=config.worker_scheduling,
            on_exit=self._on_worker_exit,
        )
        self.pool.spawn_all(self.clock())

    def _on_worker_exit(self, worker: Worker, status: int) -> None:
        if self._stopping:
            logger.info("worker %d %s", worker.index, describe_status(status))
            return
        assert worker.respawn_at is not None
        logger.warning(
            "worker %d (pid %d) %s; restarting it in %.1f s on the same pipes",
            worker.index,
            worker.history[-1],
            describe_status(status),
            worker.respawn_at - self.clock(),
        )

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        select = self._selector.select
        while True:
            # Every turn, whatever woke it: a stop is honoured within one turn.
            self._handle_signals()
            if self._stopping:
                return
            now = self.clock()
            timeout = 0.0 if self._more_to_read else self._timeout(now)
            events = select(timeout)
            self._more_to_read = False
            now = self.clock()
            for key, mask in events:
                data = key.data
                if data is _SOCKET:
                    if mask & selectors.EVENT_READ:
                        self._receive(now)
                    if mask & selectors.EVENT_WRITE and self.transport is not None:
                        self._flush_transport(now)
                elif data is _WAKEUP:
                    self._handle_signals(woken=True)
                elif data is _CONNECTING:
                    self._advance_connector(now)
                else:
                    self._flush_pipe(data)
            if self._paused or self._more_to_read:
                self._update_backpressure()
            self._run_timers(self.clock())

    def _timeout(self, now: float) -> float:
        deadlines = [self._next_stats]
        if self._ready_by is not None:
            deadlines.append(self._ready_by)
        if self._next_watchdog is not None:
            deadlines.append(self._next_watchdog)
        if self._reconnect_at is not None:
            deadlines.append(self._reconnect_at)
        if self.connector is not None:
            deadlines.append(self.connector.deadline)
        if self.feed is not None and (deadline := self.feed.next_deadline()) is not None:
            deadlines.append(deadline)
        if self.pool is not None and (deadline := self.pool.next_deadline()) is not None:
            deadlines.append(deadline)
        return max(0.0, min(deadlines) - now)

    def _ready_when_settled(self, now: float) -> None:
        """Send READY=1 once the first attempt streams or failed, or at the latest _ready_by."""
        if self._ready_by is None:
            return
        if self.stats.state in ("streaming", "reconnecting") or now >= self._ready_by:
            self._ready_by = None
            self.notifier.ready(self.stats.status_line(self.stats.rates(now)))

    def _run_timers(self, now: float) -> None:
        self._ready_when_settled(now)
        if self._reap_needed and self.pool is not None:
            self._reap_needed = False
            self.pool.reap(now)
        if self.pool is not None:
            before = self.pool.restarts
            self.pool.respawn_due(now)
            self.stats.worker_restarts += self.pool.restarts - before
        if self.feed is not None:
            self.feed.tick(now)
            self._send_feed_output(now)
        if self.connector is not None and now >= self.connector.deadline:
            self._advance_connector(now)  # it says it timed out, and in which phase
        if self._reconnect_at is not None and now >= self._reconnect_at and not self._stopping:
            self._reconnect_at = None
            self._connect(now)
        if now >= self._next_stats:
            self._report(now)
            self._next_stats = now + self.config.stats_interval
        if self._next_watchdog is not None and now >= self._next_watchdog:
            # Sent from the loop itself: a wedged loop stops petting and systemd restarts us.
            self.notifier.watchdog()
            assert self.notifier.watchdog_interval is not None
            self._next_watchdog = now + self.notifier.watchdog_interval

    # -- the hot path ----------------------------------------------------------------------

    def _receive(self, now: float) -> None:
        transport, feed = self.transport, self.feed
        assert transport is not None and feed is not None
        buffer = self._buffer
        for _ in range(_MAX_READS_PER_WAKEUP):
            try:
                count = transport.receive_into(buffer)
            except BlockingIOError:
                return
            except TransportError as exc:
                self._dispatch(now)
                self._disconnect(str(exc), now)
                return
            if count == 0:
                feed.receive_eof(now)
                self._dispatch(now)
                self._disconnect(str(feed.error) if feed.error else "end of stream", now)
                return
            self.stats.received_bytes += count
            feed.receive_data(buffer[:count], now)
            self._dispatch(now)
            if feed.closed:
                self._disconnect(str(feed.error), now)
                return
            if self._paused:
                return
        # User-space TLS may hold decrypted bytes the socket no longer signals: come back soon.
        self._more_to_read = True

    def _dispatch(self, now: float) -> None:
        """Route every complete message, then write each pipe's share with one write()."""
        feed = self.feed
        assert feed is not None
        messages = feed.messages_received()
        if messages:
            out = self._out
            status: list[bytes] = []
            route = self.splitter.route
            events = 0
            for message in messages:
                try:
                    events += route(message, out, status)
                except FrameError as exc:
                    self._log_rejected(exc, now)
            stats = self.stats
            stats.events += events
            stats.frames += len(messages)
            for event in status:
                feed.receive_status(event, now)
            written = 0
            total_backlog = 0
            for pipe, chunks in zip(self.pipes, out, strict=True):
                if chunks:
                    data = b"".join(chunks)
                    chunks.clear()
                    written += len(data)
                    total_backlog += pipe.write(data)
                elif pipe.backlog_bytes:
                    total_backlog += pipe.flush()
                if pipe.backlog_bytes:
                    self._watch_pipe(pipe)
            stats.bytes += written
            if total_backlog > self.config.backlog_limit and not self._paused:
                self._pause()
        self._send_feed_output(now)

    def _log_rejected(self, exc: FrameError, now: float) -> None:
        # One line per stats interval at most: a feed gone wrong must not flood the journal.
        self._rejected_unlogged += 1
        if now < self._next_reject_log:
            return
        logger.warning(
            "dropped %d frame(s) that are not a JSON array of objects; the last (%s): %r",
            self._rejected_unlogged,
            exc.reason,
            exc.excerpt[:_EXCERPT],
        )
        self._rejected_unlogged = 0
        self._next_reject_log = now + self.config.stats_interval

    def _flush_pipe(self, pipe: Pipe) -> None:
        if pipe.flush() == 0:
            self._selector.unregister(pipe.write_fd)
            self._watched.discard(pipe.index)

    def _watch_pipe(self, pipe: Pipe) -> None:
        if pipe.index not in self._watched:
            self._selector.register(pipe.write_fd, selectors.EVENT_WRITE, pipe)
            self._watched.add(pipe.index)

    # -- backpressure ----------------------------------------------------------------------

    def _backlogs(self) -> tuple[int, Pipe]:
        worst = max(self.pipes, key=lambda pipe: pipe.backlog_bytes)
        return sum(pipe.backlog_bytes for pipe in self.pipes), worst

    def _pause(self) -> None:
        total, worst = self._backlogs()
        self._paused = True
        self.stats.backpressure_episodes += 1
        if self.feed is not None:
            self.feed.paused = True
        self._update_socket_events()
        logger.warning(
            "backpressure: %s queued for the workers (limit %s); worker %d is behind "
            "(pipe %d holds %s); not reading the feed until it catches up",
            format_size(total),
            format_size(self.config.backlog_limit),
            self._pipe_worker.get(worst.index, -1),
            worst.index,
            format_size(worst.backlog_bytes),
        )

    def _update_backpressure(self) -> None:
        if not self._paused:
            return
        total, _ = self._backlogs()
        if total <= self.config.backlog_limit // 2:
            self._paused = False
            if self.feed is not None:
                self.feed.paused = False
            self._update_socket_events()
            logger.info("backpressure over: reading the feed again")

    # -- the connection --------------------------------------------------------------------

    def _connect(self, now: float) -> None:
        """Start opening the connection; the loop steps it whenever its fd is ready."""
        config = self.config
        self.stats.state = "connecting"
        logger.debug("connecting to %s:%d", config.host, config.port)
        self.connector = Connector(
            config.host,
            config.port,
            tls=config.secure,
            tls_mode=config.tls,
            ca_file=config.ca_file,
            server_hostname=config.server_hostname,
            timeout=config.connect_timeout,
            now=now,
        )
        self._advance_connector(now)

    def _advance_connector(self, now: float) -> None:
        """Step the connection being opened: wait on its next fd, or take the transport."""
        connector = self.connector
        assert connector is not None
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(connector.fileno())
        try:
            transport = connector.step(now)
        except KernelTLSUnavailable:
            self.connector = None
            raise
        except TransportError as exc:
            self.connector = None
            self._schedule_reconnect(f"cannot connect: {exc}", now, cooldown=False, healthy=False)
            return
        if transport is None:
            self._selector.register(connector.fileno(), connector.events(), _CONNECTING)
            return
        self.connector = None
        self._connected(transport, now)

    def _connected(self, transport: Transport, now: float) -> None:
        config = self.config
        self.transport = transport
        self.stats.tls = _describe_tls(transport)
        if transport.fallback_reason and not self._fallback_logged:
            self._fallback_logged = True
            logger.warning(
                "kernel TLS not used, TLS stays in user space: %s", transport.fallback_reason
            )
        logger.info("connected to %s (TLS: %s)", transport.address, self.stats.tls)
        self.feed = Feed(
            config.url,
            self._api_key,
            config.subscribe,
            now=now,
            max_message_size=config.max_message_size,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
        )
        self.feed.paused = self._paused
        self.stats.state = "connected"
        self._update_socket_events()
        self._send_feed_output(now)

    def _send_feed_output(self, now: float) -> None:
        feed, transport = self.feed, self.transport
        if feed is None or transport is None:
            return
        try:
            for data in feed.data_to_send():
                if data:  # b"" asks for a half-close: the socket is closed as a whole instead
                    transport.send(data)
        except TransportError as exc:  # the peer went away (EPIPE, ECONNRESET): reconnect
            self._disconnect(str(exc), now)
            return
        if transport.wants_write():
            self._flush_transport(now)
        if feed.streaming_since is not None and self.stats.state != "streaming":
            self.stats.state = "streaming"
        if feed.closed:
            self._disconnect(str(feed.error) if feed.error else "closed", now)

    def _flush_transport(self, now: float) -> None:
        transport = self.transport
        assert transport is not None
        try:
            transport.flush()
        except TransportError as exc:
            self._disconnect(str(exc), now)
            return
        self._update_socket_events()

    def _update_socket_events(self) -> None:
        transport = self.transport
        if transport is None:
            return
        mask = 0 if self._paused else selectors.EVENT_READ
        if transport.wants_write():
            mask |= selectors.EVENT_WRITE
        try:
            key = self._selector.get_key(transport.fileno())
        except (KeyError, ValueError):
            key = None
        if key is None:
            if mask:
                self._selector.register(transport.fileno(), mask, _SOCKET)
        elif mask == 0:
            self._selector.unregister(transport.fileno())
        elif key.events != mask:
            self._selector.modify(transport.fileno(), mask, _SOCKET)

    def _disconnect(self, reason: str, now: float) -> None:
        feed, transport = self.feed, self.transport
        if transport is None:
            return
        if feed is not None and not feed.closed:
            feed.close()
        if feed is not None:
            # The close frame, if the socket still takes it: a peer that is gone already
            # (EPIPE, ECONNRESET) is what we are disconnecting from.
            with contextlib.suppress(TransportError):
                for data in feed.data_to_send():
                    if data:
                        transport.send(data)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(transport.fileno())
        transport.close()
        self.transport = None
        self.feed = None
        if self._stopping:
            return
        if feed is not None and isinstance(feed.error, AuthError):
            raise feed.error
        healthy = (
            feed is not None
            and feed.streaming_since is not None
            and now - feed.streaming_since >= self.config.reconnect.healthy_after
        )
        self._schedule_reconnect(
            reason, now, cooldown=feed is not None and feed.cooldown, healthy=healthy
        )

    def _schedule_reconnect(
        self, reason: str, now: float, *, cooldown: bool, healthy: bool
    ) -> None:
        delay = self.backoff.next_delay(healthy=healthy, cooldown=cooldown)
        if cooldown:
            logger.error("%s; reconnecting in %.0f s", reason, delay)
        else:
            logger.warning(
                "%s; reconnecting in %.1f s (attempt %d)", reason, delay, self.backoff.attempt
            )
        self.stats.reconnects += 1
        self.stats.state = "reconnecting"
        self._reconnect_at = now + delay

    # -- stats -----------------------------------------------------------------------------

    def _report(self, now: float) -> None:
        stats = self.stats
        splitter = self.splitter
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
        if self.pipes:
            worst = max(self.pipes, key=lambda pipe: pipe.backlog_bytes)
            stats.largest_backlog = worst.backlog_bytes
            stats.largest_backlog_worker = self._pipe_worker.get(worst.index)
        rates = stats.rates(now)
        logger.info("%s", stats.log_line(rates))
        self.notifier.status(stats.status_line(rates))

    # -- shutdown --------------------------------------------------------------------------

    def _shutdown(self) -> None:
        self._stopping = True
        backlog = sum(pipe.backlog_bytes for pipe in self.pipes)
        self.notifier.stopping(f"stopping: flushing {format_size(backlog)} to the workers")
        if self.connector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self.connector.fileno())
            self.connector.close()
            self.connector = None
        if self.transport is not None:
            self._disconnect("stopping", self.clock())
        if self.pool is not None:
            self.pool.cancel_respawns()
        self._flush_all()
        close_pipes(self.pipes)
        if self.pool is not None:
            # The pipes are closed: each worker reads what is left, sees end of file and exits.
            self.pool.stop(WORKER_EXIT_TIMEOUT, WORKER_TERM_TIMEOUT, self.clock)
        self._selector.close()
        logger.info("stopped: %s events forwarded", f"{self.stats.events:,}")

    def _flush_all(self) -> None:
        lost = flush_pipes(self.pipes, FLUSH_TIMEOUT, self.clock, self._read_pipes)
        if lost:
            logger.error(
                "%s could not reach the workers within %.0f s (a worker is stuck or dead)",
                format_size(lost),
                FLUSH_TIMEOUT,
            )

    def _read_pipes(self) -> set[int]:
        """The pipes a live worker reads (dead ones reaped first: they take nothing more)."""
        if self.pool is None:
            return set()
        self.pool.reap(self.clock())
        return {index for worker in self.pool.running() for index in worker.pipe_indexes}


def _describe_tls(transport: Transport) -> str:
    tx, rx = str(transport.tx_mode), str(transport.rx_mode)
    return tx if tx == rx else f"{tx} tx/{rx} rx"
