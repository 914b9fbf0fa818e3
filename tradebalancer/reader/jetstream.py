"""A worker's events from NATS JetStream: the remote partitions, with the pipes' message API.

Owns the consuming side of remote partitions (the balancer's ``tradebalancer.bridge`` publishes
them): a durable pull consumer over the worker's partitions, the unpacking of each JetStream
message (one batch: the pipe's framed bytes, ``format.py``) into the messages a pipe reader
gives, the acknowledgement, and the local cursor that keeps a restart from handing an event to
the user's code twice. Imports nothing of the daemon; needs ``nats-py`` beside the reader
(``pip install tradebalancer-reader[jetstream]``), imported only when a source is opened::

    from tradebalancer.reader.jetstream import JetStreamSource

    servers = ["nats://10.0.0.5:4222"]
    with JetStreamSource(servers, stream="TB", durable="vwap-host2", partitions=[3, 4],
                         cursor="/var/lib/vwap/cursor") as source:
        for partition, messages in source.batches():  # as Reader.batches, per batch
            for message in messages:
                ...                                   # the event's JSON bytes, as the feed sent

``for message in source`` yields one by one (``source.partition`` names its partition);
``async with`` / ``async for`` and ``abatches()`` do the same on the asyncio loop. A source
never reaches end of file: ``stop()`` ends it (call it from a signal handler), and with
``timeout`` ``(-1, [])`` is yielded when idle.

Guarantees, and how they are kept
---------------------------------
* Every event of the named partitions, in the order the feed sent it, per partition: one
  consumer with ``filter_subjects`` delivers in stream order, and ``max_ack_pending = 1`` means a
  message is never delivered before the one before it was acknowledged (a higher limit would
  let a new message overtake an unacknowledged one being redelivered).
* Resumes where it stopped: the consumer is durable; it is created at the first start and
  checked (its partitions) at every other.
* Acknowledged after the user's code returns: a batch is acknowledged when the next one is
  asked for (or the source stops), never before. A worker killed before that gets the message
  again after ``ack_wait`` seconds (default 5): the longest pause a worker restart causes.
* Each event once into the user's code, with ``cursor=PATH``: before an event (with
  ``batches``, a batch) is handed over, the source writes to PATH the stream sequence of its
  JetStream message and how many of that message's events were handed over and returned (16
  bytes, ``pwrite``; the page cache keeps it across a process kill, not across a power loss).
  A redelivered message is skipped up to there. What this cannot cover is a crash *inside* the
  user's code: the event (batch) in hand when the worker died is delivered again after the
  restart, because the source cannot know whether the code finished with it. Code whose effects
  must be exactly once keeps its own record beside them. Without a cursor the guarantee is at
  least once: after a crash the whole last batch may be delivered again.
* Events lost before JetStream stored them (a bridge killed with SIGKILL: the balancer counts
  them as not delivered), or discarded by the stream's limits before this reader got to them,
  show as a jump in the events' numbers (``format.EVENT_HEADER``). The source logs each jump
  it sees once, with the numbers missing, and counts them in ``missing`` (per partition); the
  events around it are delivered as they are. Only jumps between messages this source reads
  are seen: not one across its own restart.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import re
import struct
from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any

from .format import EVENT_HEADER
from .framing import MessageParser, ReaderError

__all__ = ["Cursor", "JetStreamSource", "connect_options"]

logger = logging.getLogger(__name__)

_USER_SEED = re.compile(r"SU[A-Z2-7]{56}")  # a user NKey seed: 'S' for seed, 'U' for user
_CURSOR = struct.Struct("<QQ")  # the message's stream sequence, the events handed over
# Seconds before the client tries a server it just lost again (nats-py annotates an int and
# takes a float): a cluster's other servers are tried at once.
RECONNECT_WAIT: dict[str, Any] = {"reconnect_time_wait": 0.25}


def connect_options(path: str | None) -> dict[str, Any]:
    """The nats.connect() arguments a credentials file gives; the bridge reads it the same way.

    A NATS ``.creds`` file (a user JWT and its NKey seed, as ``nsc`` writes it) and a file
    holding one user NKey seed (``SU`` and 56 more base32 characters, as ``nk -gen user``
    writes it; the server lists the public key, ``authorization { users = [{nkey: U...}] }``)
    are passed on by path: nats-py signs the server's nonce with the seed, through the
    ``nkeys`` package (``pip install 'tradebalancer-reader[jetstream]'`` installs it). Any
    other file holds one line, ``USER:PASSWORD`` or a token. The secret never appears in an
    error message.
    """
    if path is None:
        return {}
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except (OSError, UnicodeDecodeError) as exc:
        raise ReaderError(
            f"cannot read the NATS credentials file {path}: {getattr(exc, 'strerror', exc)}; "
            f"check the path and that this user may read it"
        ) from exc
    line = text.strip()
    if "BEGIN NATS USER JWT" in text or _USER_SEED.fullmatch(line):
        if importlib.util.find_spec("nkeys") is None:
            kind = ".creds file" if "BEGIN NATS USER JWT" in text else "user NKey seed"
            raise ReaderError(
                f"the NATS credentials file {path} is a {kind}, which needs the nkeys package, "
                "not installed beside this Python: pip install nkeys (or the jetstream extra), "
                "or use a USER:PASSWORD or token file"
            )
        if "BEGIN NATS USER JWT" in text:
            return {"user_credentials": path}
        return {"nkeys_seed": path}
    if not line or "\n" in line:
        raise ReaderError(
            f"the NATS credentials file {path} must be a .creds file or one line, "
            f"USER:PASSWORD or a token"
        )
    user, colon, password = line.partition(":")
    return {"user": user, "password": password} if colon else {"token": line}


class Cursor:
    """The local record of what was handed to the user's code: (stream sequence, events)."""

    def __init__(self, path: str | None) -> None:
        self.fd = (
            -1 if path is None else os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        )
        data = os.pread(self.fd, _CURSOR.size, 0) if self.fd >= 0 else b""
        self.sequence, self.done = _CURSOR.unpack(data) if len(data) == _CURSOR.size else (0, 0)

    def skip(self, sequence: int, events: int) -> int:
        """How many events of the message at stream ``sequence`` were already handed over."""
        if sequence < self.sequence:
            return events
        return min(self.done, events) if sequence == self.sequence else 0

    def write(self, sequence: int, done: int) -> None:
        """Record that ``done`` events of the message at ``sequence`` were handed over.

        Never backwards: a server that crashed may restore its consumer's state from before
        the crash and deliver again what this cursor is past.
        """
        if (sequence, done) <= (self.sequence, self.done):
            return
        self.sequence, self.done = sequence, done
        if self.fd >= 0:
            os.pwrite(self.fd, _CURSOR.pack(sequence, done), 0)

    def close(self) -> None:
        """Close the file; idempotent."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class JetStreamSource:
    """A durable JetStream consumer over a worker's partitions, read like a Reader."""

    def __init__(
        self,
        servers: Sequence[str],
        *,
        stream: str,
        durable: str,
        partitions: Sequence[int],
        credentials: str | None = None,
        cursor: str | None = None,
        ack_wait: float = 5.0,
        connect_timeout: float = 5.0,
    ) -> None:
        if not partitions or len(set(partitions)) != len(partitions):
            raise ValueError(f"partitions must be distinct pipe indexes, got {list(partitions)}")
        self.servers = list(servers)
        self.stream = stream
        self.durable = durable
        self.partitions = list(partitions)
        self.credentials = credentials
        self.ack_wait = ack_wait
        self.connect_timeout = connect_timeout
        self.cursor = Cursor(cursor)
        self.messages = 0  # events handed over
        self.partition = -1  # the partition of the last event (batch) handed over
        self.missing: dict[int, int] = {}  # partition -> events lost before they were stored
        self._numbers: dict[int, int] = {}  # partition -> the last event's number seen
        self.stopped = False
        self._connection: Any = None
        self._subscription: Any = None
        self._errors: Any = None  # nats.errors, once opened
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the asyncio API ---------------------------------------------------------------------

    async def aopen(self) -> None:
        """Connect, check the stream, create or check the durable consumer."""
        try:
            import nats
            import nats.errors
            import nats.js.errors
            from nats.aio.client import Client
            from nats.js.api import AckPolicy, ConsumerConfig
        except ImportError as exc:  # a host without the extra (tests/test_reader_wheel.py)
            raise ReaderError(
                "JetStreamSource needs nats-py: pip install 'tradebalancer-reader[jetstream]'"
            ) from exc
        self._errors = nats.errors
        where = ",".join(self.servers)

        async def on_error(exc: Exception) -> None:
            logger.warning("JetStream connection: %s", exc or type(exc).__name__)

        try:
            # The first connection fails at once (a wrong password must not loop); once
            # connected, the client reconnects by itself for ever.
            self._connection = Client()
            await self._connection.connect(
                self.servers,
                **connect_options(self.credentials),
                name=f"tradebalancer-reader {self.durable}",
                connect_timeout=self.connect_timeout,
                max_reconnect_attempts=-1,
                allow_reconnect=False,
                error_cb=on_error,
                **RECONNECT_WAIT,
            )
            self._connection.options["allow_reconnect"] = True
        except (nats.errors.Error, OSError) as exc:
            await self.aclose()  # the failed attempt's socket
            raise ReaderError(
                f"cannot connect to JetStream at {where} with credentials "
                f"{self.credentials or 'none'}: {exc or type(exc).__name__}; check the URLs and "
                f"the credentials file"
            ) from exc
        js = self._connection.jetstream()
        try:
            info = await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            await self.aclose()
            raise ReaderError(
                f"no JetStream stream {self.stream!r} at {where}: check the name, or start the "
                f"balancer first (its bridge creates the stream)"
            ) from None
        if self.cursor.sequence > (info.state.last_seq or 0):
            await self.aclose()
            raise ReaderError(
                f"the cursor file is at message {self.cursor.sequence} but stream "
                f"{self.stream!r} ends at {info.state.last_seq}: the stream was made anew; "
                f"delete the cursor file (and the durable consumer) to read it from its start"
            )
        prefixes = [s[:-2] for s in info.config.subjects or [] if s.endswith(".>")]
        if len(prefixes) != 1:
            await self.aclose()
            raise ReaderError(
                f"stream {self.stream!r} has subjects {info.config.subjects}, not one PREFIX.> "
                f"as the balancer's bridge makes: is it the balancer's stream?"
            )
        subjects = sorted(f"{prefixes[0]}.{partition}" for partition in self.partitions)
        try:
            existing = await js.consumer_info(self.stream, self.durable)
        except nats.js.errors.NotFoundError:
            existing = None
        if existing is not None:
            found = sorted(existing.config.filter_subjects or [existing.config.filter_subject])
            if found != subjects:
                await self.aclose()
                raise ReaderError(
                    f"durable consumer {self.durable!r} of {self.stream!r} reads {found}, not "
                    f"{subjects}: use another durable name for other partitions, or delete it "
                    f"(nats consumer rm {self.stream} {self.durable})"
                )
        else:
            await js.add_consumer(
                self.stream,
                ConsumerConfig(
                    durable_name=self.durable,
                    filter_subjects=subjects,
                    ack_policy=AckPolicy.EXPLICIT,
                    max_ack_pending=1,
                    ack_wait=self.ack_wait,
                ),
            )
            logger.info("created durable consumer %s on %s %s", self.durable, self.stream, subjects)
        self._subscription = await js.pull_subscribe_bind(durable=self.durable, stream=self.stream)

    async def aclose(self) -> None:
        """Close the connection (unacknowledged messages come back after ack_wait)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()
        self.cursor.close()

    async def __aenter__(self) -> JetStreamSource:
        await self.aopen()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def stop(self) -> None:
        """End the iteration at the next batch boundary (safe from a signal handler)."""
        self.stopped = True

    async def abatches(
        self, timeout: float | None = None
    ) -> AsyncIterator[tuple[int, list[bytes]]]:
        """Yield ``(partition, messages)`` per JetStream message, until ``stop()``."""
        async for partition, sequence, messages, skip in self._deliveries(timeout):
            if partition < 0:
                yield -1, []
            elif skip < len(messages):
                self.cursor.write(sequence, skip)
                self.partition = partition
                self.messages += len(messages) - skip
                yield partition, messages[skip:]

    async def __aiter__(self) -> AsyncIterator[bytes]:
        """Yield the messages one by one, the cursor advanced per event."""
        write = self.cursor.write
        async for partition, sequence, messages, skip in self._deliveries(None):
            if partition < 0:
                continue
            self.partition = partition
            for index in range(skip, len(messages)):
                write(sequence, index)
                self.messages += 1
                yield messages[index]

    async def _deliveries(
        self, timeout: float | None
    ) -> AsyncIterator[tuple[int, int, list[bytes], int]]:
        """Each JetStream message as (partition, stream sequence, events, events to skip); the
        message is acknowledged, and the cursor set past it, when the next one is asked for."""
        errors = self._errors
        if self._subscription is None or errors is None:
            raise ReaderError("the source is not open: use it in a with block")
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        wait = 1.0 if timeout is None else min(timeout, 1.0)
        while not self.stopped:
            try:
                fetched = await self._subscription.fetch(1, timeout=wait)
            except errors.TimeoutError:
                if timeout is not None and loop.time() - idle_since >= timeout:
                    idle_since = loop.time()
                    yield -1, 0, [], 0
                continue
            except errors.Error as exc:
                logger.warning("fetch from %s failed (%s); retrying", self.stream, exc)
                await asyncio.sleep(0.25)
                continue
            for message in fetched:
                sequence = message.metadata.sequence.stream
                partition = int(message.subject.rpartition(".")[2])
                parser = MessageParser()
                events = parser.receive_data(message.data)
                if parser.error is not None or parser.skipped_bytes:
                    raise ReaderError(
                        f"message {sequence} of stream {self.stream!r} is not whole framed "
                        f"events: was it published by the balancer's bridge?"
                    )
                self._check_numbers(partition, message.headers, len(events))
                yield partition, sequence, events, self.cursor.skip(sequence, len(events))
                self.cursor.write(sequence, len(events))
                await message.ack()
            idle_since = loop.time()

    def _check_numbers(self, partition: int, headers: dict[str, str] | None, count: int) -> None:
        """Log and count a jump in the partition's event numbers (events never stored)."""
        number = (headers or {}).get(EVENT_HEADER, "")
        if not (number.isascii() and number.isdecimal()):
            return  # an older bridge's message, or not the bridge's: no number to check
        last, before = int(number), self._numbers.get(partition)
        first = last - count + 1
        if before is not None and first > before + 1:
            lost = first - before - 1
            self.missing[partition] = self.missing.get(partition, 0) + lost
            logger.warning(
                "%d event(s) of partition %d are missing from stream %s (numbers %d-%d): lost "
                "before JetStream stored them (the balancer counted them as not delivered), or "
                "discarded by the stream's max_age or max_bytes before this reader got to them",
                lost,
                partition,
                self.stream,
                before + 1,
                first - 1,
            )
        if before is None or last > before:
            self._numbers[partition] = last

    # -- the synchronous API: the same, on a private event loop -----------------------------

    def __enter__(self) -> JetStreamSource:
        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(self.aopen())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._loop is not None:
            self._loop.run_until_complete(self.aclose())
            self._loop.close()
            self._loop = None

    def batches(self, timeout: float | None = None) -> Iterator[tuple[int, list[bytes]]]:
        """Yield ``(partition, messages)`` per JetStream message, until ``stop()``."""
        yield from self._run(self.abatches(timeout))

    def __iter__(self) -> Iterator[bytes]:
        """Yield the messages one by one, until ``stop()``."""
        yield from self._run(self.__aiter__())

    def _run(self, iterator: AsyncIterator[Any]) -> Iterator[Any]:
        if self._loop is None:
            raise ReaderError("the source is not open: use it in a with block")
        step = iterator.__anext__
        try:
            while True:
                try:
                    item = self._loop.run_until_complete(step())
                except StopAsyncIteration:
                    return
                yield item
        finally:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                self._loop.run_until_complete(aclose())
