"""The bridge's side of the server: connecting, the stream, a subject's last message.

Owns what the bridge asks of NATS besides publishing (publisher.py publishes): the first
connection, retried while no server answers and said once (``Unreachable``), a refused login
as a BridgeError (exit 77); the stream created or checked against the configuration, a
mismatch as a BridgeError naming both sides (exit 78); and ``last_subject_message``, which a
starting bridge and a refused publish both read. Knows nothing of pipes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from ..ledger import EVENT_HEADER
from ..reader import ReaderError
from ..reader.jetstream import RECONNECT_WAIT, connect_options
from .options import EX_NOPERM, BridgeError, BridgeOptions

__all__ = [
    "RETRY_MAX",
    "LastMessage",
    "Unreachable",
    "ensure_stream",
    "last_subject_message",
    "open_connection",
]

logger = logging.getLogger("tradebalancer.bridge")

RETRY_MAX = 2.0  # seconds: the longest wait between two attempts (a connection, a batch)
QUIET_RETRIES = 30.0  # seconds between two WARNINGs while JetStream stays unreachable


class Unreachable:
    """What the bridge says while no server answers its first connection: one WARNING that
    explains, then one every ``QUIET_RETRIES`` seconds, not one per attempt (nats-py tries
    every server every ``RECONNECT_WAIT`` seconds)."""

    def __init__(self, options: BridgeOptions, clock: Callable[[], float]) -> None:
        self.options = options
        self.clock = clock
        self.started = clock()
        self.said: float | None = None

    def note(self, exc: BaseException) -> None:
        """One more failed attempt, for ``exc``."""
        now, where = self.clock(), ",".join(self.options.servers)
        if self.said is None:
            self.said = now
            logger.warning(
                "cannot connect to JetStream at %s (%s): partitions %s are not read meanwhile, "
                "so their pipes fill and the balancer keeps their events in its backlog; "
                "retrying every %g s. Start the server, or correct jetstream.servers",
                where,
                describe_error(exc),
                ",".join(map(str, self.options.partitions)),
                RECONNECT_WAIT["reconnect_time_wait"],
            )
        elif now - self.said >= QUIET_RETRIES:
            self.said = now
            logger.warning(
                "still cannot connect to JetStream at %s after %.0f s (%s); retrying",
                *(where, now - self.started, describe_error(exc)),
            )

    def connected(self) -> None:
        """The connection is up: say so if a failure was said."""
        if self.said is not None:
            logger.info(
                "connected to JetStream at %s after %.0f s",
                ",".join(self.options.servers),
                self.clock() - self.started,
            )


async def open_connection(options: BridgeOptions, clock: Callable[[], float]) -> Client:
    """Connect to the servers, retrying while none answers; BridgeError if auth is refused.

    While none answers the bridge reads nothing, so the pipes fill and the balancer holds the
    events in its backlog (Unreachable says so). A SIGTERM meanwhile cancels this."""
    unreachable = Unreachable(options, clock)
    connected = False

    async def on_error(exc: Exception) -> None:
        if connected:
            logger.warning("JetStream connection: %s", exc)
        elif not isinstance(exc, nats.errors.Error) or "auth" not in str(exc).lower():
            unreachable.note(exc)

    async def on_disconnected() -> None:
        if not connection.is_closed:  # closed: the bridge's own drain at its end, not news
            logger.warning("disconnected from JetStream")

    async def on_reconnected() -> None:
        logger.info("reconnected to JetStream")

    try:
        credentials = connect_options(options.credentials)
    except ReaderError as exc:
        raise BridgeError(str(exc)) from exc
    delay = 0.1
    while True:
        connection = Client()
        try:
            # nats-py retries a refused TCP connection itself, for ever (max_reconnect_attempts
            # -1), every server in turn; allow_reconnect=False makes it raise on what happens
            # after the TCP connection (a refused login, a timeout), which this loop retries.
            await connection.connect(
                list(options.servers),
                **credentials,
                name="tradebalancer-bridge",
                max_reconnect_attempts=-1,
                **RECONNECT_WAIT,
                connect_timeout=2,
                allow_reconnect=False,
                error_cb=on_error,
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
            )
            connection.options["allow_reconnect"] = True  # from now on, for ever
            connected = True
            unreachable.connected()
            return connection
        except nats.errors.Error as exc:
            await connection.close()  # the failed attempt's socket
            if "authorization" in str(exc).lower() or "auth" in type(exc).__name__.lower():
                raise BridgeError(
                    f"JetStream at {','.join(options.servers)} refused the credentials "
                    f"({options.credentials or 'none'}): {exc}; check the credentials file",
                    EX_NOPERM,
                ) from exc
        except (OSError, TimeoutError):
            await connection.close()
        await asyncio.sleep(delay)
        delay = min(delay * 2, RETRY_MAX)


def describe_error(exc: BaseException) -> str:
    """An exception in a few words: its text, or its type when it has none."""
    return str(exc) or type(exc).__name__


async def ensure_stream(js: JetStreamContext, options: BridgeOptions) -> None:
    """Create the stream, or check that the existing one matches; BridgeError on a mismatch."""
    storage = StorageType.FILE if options.storage == "file" else StorageType.MEMORY
    wanted = f"{options.subject_prefix}.>"
    try:
        info = await js.stream_info(options.stream)
    except nats.js.errors.NotFoundError:
        if not options.create:
            raise BridgeError(
                f"no JetStream stream {options.stream!r} and jetstream.create is false: create "
                f"it with subjects [{wanted!r}], or set create = true"
            ) from None
        await js.add_stream(
            StreamConfig(
                name=options.stream,
                subjects=[wanted],
                storage=storage,
                num_replicas=options.replicas,
            )
        )
        logger.info("created JetStream stream %s (%s, %s storage, replicas %d)",
                    options.stream, wanted, options.storage, options.replicas)  # fmt: skip
        return
    config = info.config
    problems = []
    if wanted not in (config.subjects or []):
        problems.append(f"subjects {config.subjects} do not include {wanted!r}")
    if config.storage != storage:
        problems.append(f"storage is {config.storage}, the configuration says {options.storage}")
    if (config.num_replicas or 1) != options.replicas:
        problems.append(
            f"replicas is {config.num_replicas}, the configuration says {options.replicas}"
        )
    if problems:
        raise BridgeError(
            f"JetStream stream {options.stream!r} exists but {'; '.join(problems)}: change "
            f"[feeds.NAME.jetstream] to match it, or edit the stream (nats stream edit "
            f"{options.stream}) or remove it (nats stream rm {options.stream})"
        )
    logger.info("JetStream stream %s checked", options.stream)


@dataclass(frozen=True)
class LastMessage:
    """The partition subject's last stored message, as far as the bridge cares."""

    sequence: int = 0  # its stream sequence, 0 if the subject has none
    msg_id: str | None = None
    event: int | None = None  # the number of its last event (EVENT_HEADER), if it has one


async def last_subject_message(
    js: JetStreamContext, options: BridgeOptions, partition: int
) -> LastMessage:
    """The partition subject's last stored message; LastMessage() if it has none."""
    try:
        message = await js.get_last_msg(options.stream, options.subject(partition))
    except nats.js.errors.NotFoundError:
        return LastMessage()
    headers = message.headers or {}
    event = headers.get(EVENT_HEADER)
    return LastMessage(
        message.seq or 0,
        headers.get("Nats-Msg-Id"),
        int(event) if event is not None and event.isdigit() else None,
    )
