"""The service: the one event loop that wires the connection, the forwarder and the workers.

Owns the order of things and nothing of their insides. One thread, one epoll selector:

    socket readable -> FeedConnection.receive into one big buffer (a *batch*): messages
        -> Forwarder.forward: events on their pipes, one write per pipe per batch
    pipe writable   -> flush that pipe's backlog
    signals         -> a wakeup fd (signals.py): SIGTERM/SIGINT stop, SIGHUP reloads,
                       SIGCHLD reaps workers; acted on at the top of every turn
    endpoints       -> the control socket and the metrics listener (control.py): status,
                       reload and metrics requests, answered from the loop
    timers          -> the connection's (connect timeout, keepalive), reconnect, worker
                       respawn, stats/STATUS, READY, watchdog

A reload (SIGHUP, or ``tradebalancer reload`` over the control socket, which is what
``systemctl reload`` runs) reads the file again and applies what reload.py allows to the
running instance, or nothing; the subscriptions change on the live connection.

Connect and disconnect are decided in one place, at the end of every turn (``_settle``): an
attempt that is over says why (``FeedConnection.outcome``), and the reconnect policy
(backoff.py) says when to try again. Connecting never blocks the loop (transport/), so pipes
are served, timers run and a stop is honoured meanwhile.
"""

from __future__ import annotations

import logging
import os
import random
import selectors
import signal
import time
from collections.abc import Callable, Mapping

from . import config as configuration
from . import delivery, keyguard, metrics, reload
from .backoff import Backoff
from .config import FeedConfig
from .connection import FeedConnection
from .control import Endpoints
from .errors import AuthError, ConfigError, ExitCode, KernelTLSUnavailable, TradeBalancerError
from .forward import Forwarder
from .ledger import Ledger
from .listener import Client, Listener
from .pipes import Pipe, PipeSet, pipe_max_size
from .plan import plan_workers
from .poller import CONNECTION, WAKEUP, Poller
from .signals import Signals, install
from .stats import Stats
from .status import StatusReporter
from .systemd import Notifier
from .units import format_size
from .workers import WorkerPool

logger = logging.getLogger(__name__)

_MAX_READS_PER_WAKEUP = 16  # then serve timers and pipes before reading on
WORKER_TERM_TIMEOUT = 5.0  # on shutdown, after drain_timeout twice: SIGTERM, SIGKILL after this


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
        key_file: str | None = None,
        config_path: str | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.config = feed
        self.config_path = config_path  # read again on reload
        self._api_key = api_key
        self._key_file = key_file  # where the key was read from: hidden from the workers
        self.notifier = notifier or Notifier({})
        self.clock = clock
        self.wall = wall
        self.backoff = Backoff(feed.reconnect, rng or random.Random())
        self.environ = dict(os.environ if environ is None else environ)
        self.signals = signals
        self.stats = Stats(url=feed.url)
        self.exit_code = ExitCode.OK
        self.pipes = PipeSet([])
        self.pool: WorkerPool | None = None
        self.ledger: Ledger | None = None
        self.forwarder: Forwarder | None = None
        self.connection: FeedConnection | None = None
        self.poller = Poller()
        self.endpoints = Endpoints(self.poller)
        self._reload_due = False
        self._buffer = memoryview(bytearray(feed.batch_bytes))
        self._stopping = False
        self._reap_needed = False
        self._more_to_read = False
        self._reconnect_at: float | None = None
        self.status: StatusReporter | None = None
        self._fallback_logged = False

    # -- lifecycle -------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped; return the process exit code."""
        try:
            if self.signals is None:
                self.signals = install()
            # From here on a stop must wind things down: the loop acts on it (signals.py).
            self.signals.hand_to_loop()
            self.poller.watch_wakeup(self.signals.fileno())
            self._handle_signals()
            self._start_workers()
            self._open_endpoints()
            now = self.clock()
            self.stats.started_at, self.stats.started_wall = now, self.wall()
            self._reconnect_at = now  # the first attempt, made by the first turn
            self.status = StatusReporter(self.notifier, self.stats, self.config.stats_interval, now)
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
                self._reload_due = True  # in the turn, not in the middle of draining signals
            elif not self._stopping:
                logger.info("%s received: stopping", signum.name)
                self._stopping = True

    def _start_workers(self) -> None:
        config = self.config
        plans = plan_workers(config, self.environ)  # a bad template fails before any pipe
        cover = keyguard.prepare(config, self.environ, self._key_file)
        largest = config.pipe_size == "max"
        size = pipe_max_size() if largest else int(config.pipe_size)
        self.pipes = PipeSet.open(config.pipes, size, largest=largest, feed=config.name)
        owners = {pipe: plan.index for plan in plans for pipe in plan.pipes}
        self.forwarder = Forwarder(
            config, self.pipes, self.stats, owners, clock=self.clock, wall=self.wall
        )
        read_fds = [pipe.read_fd for pipe in self.pipes]
        if config.jetstream is not None:  # what a bridge read, kept past its death (ledger.py)
            self.ledger = Ledger.create(config.pipes)
        ledger_fd = self.ledger.fd if self.ledger is not None else None
        self.pool = WorkerPool.from_plans(plans, read_fds, config, cover, ledger_fd)
        self.pool.spawn_all(self.clock())

    # -- the loop --------------------------------------------------------------------------

    def _loop(self) -> None:
        select = self.poller.select
        while True:
            # Every turn, whatever woke it: a stop is honoured within one turn.
            self._handle_signals()
            if self._stopping:
                return
            if self._reload_due:
                self._reload_due = False
                logger.info("SIGHUP received: reloading %s", self.config_path)
                self.reload(self.clock())
            before = self.clock()
            due = self._next_deadline(before)
            timeout = 0.0 if self._more_to_read else max(0.0, due - before)
            events = select(timeout)
            self._more_to_read = False
            now = self.clock()
            for tag, mask, hangup in events:
                if tag is CONNECTION:
                    self._serve_feed(mask, hangup, now)
                elif tag is WAKEUP:
                    self._handle_signals(woken=True)
                elif isinstance(tag, Pipe):
                    if self.pipes.flush(tag) == 0:
                        self.poller.unwatch_pipe(tag)
                elif isinstance(tag, Listener | Client):
                    self.endpoints.serve(tag, now)
            now = self.clock()
            # The timers only when one is due (a deadline of this turn's start passed), a child
            # exited, READY waits for the stream, or reading is paused (each turn of a pause
            # restarts the wait for a pong, which cannot come): a batch of the feed is most
            # turns, and asks none of them.
            if now >= due or self._reap_needed or self._waiting():
                self._run_timers(now)
            self._settle(now)

    def _serve_feed(self, mask: int, hangup: bool, now: float) -> None:
        """The hot path: read batches and forward their messages, until the socket is empty."""
        connection, forwarder = self.connection, self.forwarder
        assert connection is not None and forwarder is not None
        if hangup and not mask & selectors.EVENT_READ:
            connection.hung_up(now)  # while paused: noticed now, read later
        if mask & selectors.EVENT_WRITE:
            connection.writable(now)
        if not mask & selectors.EVENT_READ:
            return
        for _ in range(_MAX_READS_PER_WAKEUP):
            again = connection.receive(self._buffer, now, forwarder.forward)
            if forwarder.paused:
                connection.pause(True)
                break
            if not again:
                break
        else:
            # Every read filled the buffer: more may wait, on any transport. Serve the timers
            # and the pipes first, then come back without waiting for the poll.
            self._more_to_read = True
        if self.pipes.backlog_bytes:
            for pipe in self.pipes.backlogged():
                self.poller.watch_pipe(pipe)

    def _waiting(self) -> bool:
        status, forwarder = self.status, self.forwarder
        return (status is not None and not status.ready) or (
            forwarder is not None and forwarder.paused
        )

    def _next_deadline(self, now: float) -> float:
        """The earliest timer, or a second from ``now`` if none is set."""
        deadlines = [deadline for deadline in (self._reconnect_at,) if deadline is not None]
        if self.status is not None:
            deadlines.append(self.status.deadline())
        if self.connection is not None and (deadline := self.connection.deadline()) is not None:
            deadlines.append(deadline)
        if self.pool is not None and (deadline := self.pool.next_deadline()) is not None:
            deadlines.append(deadline)
        if (deadline := self.endpoints.deadline()) is not None:
            deadlines.append(deadline)
        return min(deadlines, default=now + 1.0)

    def _run_timers(self, now: float) -> None:
        pool, connection = self.pool, self.connection
        if self._reap_needed and pool is not None:
            self._reap_needed = False
            pool.reap(now)
        if pool is not None:
            self.stats.worker_restarts += pool.respawn_due(now)
        if connection is not None:
            connection.tick(now)
        self.endpoints.tick(now)
        if self.status is not None and self.forwarder is not None:
            self.status.tick(now, self.forwarder.account)

    # -- connecting and disconnecting: decided here, once a turn ----------------------------

    def _settle(self, now: float) -> None:
        """Close an attempt that is over and schedule the next; start one that is due."""
        connection, forwarder = self.connection, self.forwarder
        if connection is not None:
            if forwarder is not None and forwarder.update_backpressure(now):
                connection.pause(False)
            outcome = connection.outcome(now)
            if outcome is None:
                self.stats.state = connection.state
                self.stats.refused_channels = connection.refused_channels()
                self.poller.watch_connection(
                    connection.pollable(), connection.events(), hangup=connection.watches_hangup()
                )
                if (why := connection.fallback_reason) and not self._fallback_logged:
                    self._fallback_logged = True
                    logger.warning("kernel TLS not used, TLS stays in user space: %s", why)
                self.stats.tls = connection.tls
                return
            self._drop_connection()
            if isinstance(outcome.error, AuthError | KernelTLSUnavailable):
                raise outcome.error
            self.stats.count(self.stats.reconnect_kinds, outcome.kind)
            healthy = outcome.streamed >= self.config.reconnect.healthy_after
            self._schedule_reconnect(outcome.reason, now, outcome.cooldown, healthy)
        elif self._reconnect_at is not None and now >= self._reconnect_at:
            self._reconnect_at = None
            self.stats.state = "connecting"
            self.connection = FeedConnection(
                self.config, self._api_key, now, paused=bool(forwarder and forwarder.paused)
            )
            self._settle(now)  # a refused connect is over at once

    def _schedule_reconnect(self, reason: str, now: float, cooldown: bool, healthy: bool) -> None:
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

    def _drop_connection(self) -> None:
        if self.connection is not None:
            self.stats.received_bytes += self.connection.received_bytes
            self.connection.close()
            self.connection = None
        self.poller.watch_connection(None, 0)

    # -- reload, status and metrics: what the endpoints ask ---------------------------------

    def reload(self, now: float) -> tuple[bool, str]:
        """Read the configuration file again and apply it (reload.py), or nothing; say which.

        The service manager hears RELOADING=1 first and READY=1 after, whatever the result;
        before the start's own READY=1 it hears nothing (READY then still means "started").
        """
        ready = self.status is not None and self.status.ready
        if ready:
            self.notifier.reloading(time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        try:
            result, message = self._reload(now)
        finally:
            if ready:
                self.notifier.ready(self.stats.status_line(self.stats.rates(now)))
        self.stats.count(self.stats.reloads, result)
        ok = result == "applied"
        (logger.info if ok else logger.error)("%s", message)
        return ok, message

    def _reload(self, now: float) -> tuple[str, str]:
        """(result, what to say): "applied", "invalid" (the file) or "refused" (a restart key)."""
        if self.config_path is None:
            return "invalid", "reload refused: this instance was started without a file"
        try:
            loaded = configuration.load(self.config_path).feed(self.config.name)
        except ConfigError as exc:
            return "invalid", f"reload refused, the running configuration stays: {exc}"
        change = reload.compare(self.config, loaded)
        if change.restart:
            return "refused", change.refusal()
        self.config = change.apply(self.config, loaded)
        if self.forwarder is not None:
            self.forwarder.reconfigure(self.config)
        if self.status is not None:
            self.status.retime(self.config.stats_interval, now)
        summary = change.summary()
        if self.connection is not None:
            sent = self.connection.resubscribe(self.config, now)
            if change.subscribes and sent == ([], []):
                summary += " (a change of case only: sent at the next connection)"
        return "applied", summary

    def snapshot(self, now: float) -> metrics.Snapshot:
        """The instance's numbers now (metrics.py), for the status view and the metrics."""
        connection = self.connection
        return metrics.gather(
            self.config,
            self.stats,
            self.forwarder,
            self.pipes,
            self.pool,
            received_bytes=connection.received_bytes if connection else 0,
            now=now,
            lost=self.ledger.lost() if self.ledger is not None else None,
        )

    def _open_endpoints(self) -> None:
        try:
            self.endpoints.open(
                self.config,
                self.environ,
                reload=lambda: self.reload(self.clock()),
                snapshot=lambda: self.snapshot(self.clock()),
            )
        except OSError as exc:
            raise ConfigError(
                f"feeds.{self.config.name}.metrics",
                f"cannot listen on {self.config.metrics}: {exc.strerror or exc}; choose another "
                "address, or stop what listens there",
            ) from exc

    # -- shutdown --------------------------------------------------------------------------

    def _shutdown(self) -> None:
        """Stop reading, give the workers ``drain_timeout`` to take what is held for them and
        as long again to exit, then count what each took (delivery.py) and say it."""
        self._stopping = True
        backlog = self.pipes.backlog_bytes
        self.notifier.stopping(f"stopping: flushing {format_size(backlog)} to the workers")
        self._drop_connection()
        self.endpoints.close()
        pool, drain = self.pool, self.config.drain_timeout
        if pool is not None:
            pool.cancel_respawns()
        self.pipes.drain(drain, self.clock, pool.read_pipes if pool is not None else None)
        self.pipes.close_writes()
        if pool is not None:
            # Each worker reads what is left, sees end of file and exits, or is made to.
            pool.stop(drain, WORKER_TERM_TIMEOUT, self.clock)
        if self.forwarder is not None and pool is not None:
            remainders = [(pipe.index, pipe.remainder()) for pipe in self.pipes]
            accounts = delivery.tally(
                self.forwarder.splitter.pipe_events(),
                remainders,
                self.forwarder.pipe_owners,
                self.ledger.lost() if self.ledger is not None else {},
            )
            if any(account.undelivered for account in accounts):
                logger.error("%s", delivery.describe(accounts))
                if self.exit_code == ExitCode.OK:
                    self.exit_code = ExitCode.UNDELIVERED
            else:
                logger.info("%s", delivery.describe(accounts))
        self.pipes.close()
        if self.ledger is not None:
            self.ledger.close()
        self.poller.close()
