"""The bridge's loop: pipes in, one JetStream message per partition per batch out.

Owns the publishing side of remote partitions: the balancer spawns it like any worker over the
pipes ``[feeds.NAME.jetstream]`` names (plan.py renders its arguments), it reads them with
``tradebalancer.reader``, and publishes each partition's events to ``PREFIX.PARTITION`` as one
JetStream message per batch whose payload is the pipe's own framed bytes (``[u32 LE length]
[event]`` ...), whole messages only (server.py creates or checks the stream first). It knows nothing
of what an event means and never touches the balancer's hot path: its only link to the balancer
is the pipes, so a slow JetStream is ordinary pipe backpressure (the bridge stops reading, the
pipe fills, the balancer keeps its backlog and logs it). Runs as::

    python -m tradebalancer.bridge --servers nats://h1:4222,nats://h2:4222 --stream TB \\
        --subject-prefix tb.stocks --partitions 3,4 [--credentials FILE] ...

Design notes
------------
* One message per partition per batch, and at most one in flight per partition: while batch
  ``n`` waits for its PubAck, batch ``n+1`` accumulates from the pipe (up to ``--max-batch-bytes``;
  then that pipe is not read until the ack). The batch size follows the latency by itself and
  JetStream sees a few thousand publishes a second, not one per event. One in flight per
  partition is what keeps the order under retries: with two in flight a retried ``n`` could be
  stored after ``n+1``. Partitions publish concurrently (asyncio; never a publish awaited in a
  sequential loop over partitions, nats.py issue #390).
* No batch is stored twice, whatever the outage's length. Each publish carries ``Nats-Msg-Id``
  (``RUN.PARTITION.SEQ``, ``RUN`` random per bridge start) for the duplicate window, and also
  ``Nats-Expected-Last-Subject-Sequence``, the partition subject's last sequence as the previous
  PubAck gave it (at start: the stream's last message on the subject). A retry of a batch that
  was in fact stored before the server died is refused by the server with "wrong last
  sequence"; the bridge then reads the subject's last message, finds its own Msg-Id there, and
  takes the batch as stored; a predecessor's batch stored late (below) is taken as stored
  too. Any other message there means another publisher writes the subject: the bridge stops
  with an error rather than interleave.
* A restarted bridge cannot repeat a batch: reading a pipe consumes it, and what the previous
  bridge read is gone from the pipe. The converse: a bridge killed with SIGKILL loses the events
  it had read and not yet stored (at most ``--max-batch-bytes`` being published plus what was
  read behind it, per partition). Those are counted, never silent: every batch carries the
  number of its last event (ledger.EVENT_HEADER), the balancer's ledger (ledger.py, memory that
  outlives the bridge) holds how many events this run's bridges took from each pipe, and the
  successor compares the two at its start, logs a WARNING per partition and counts the
  difference as lost; the balancer's last line counts it as not delivered (exit 75). Lost
  events keep their numbers, so a reader sees them as a gap. On end of file (the balancer
  stops) and on SIGTERM the bridge publishes everything it read before it exits.
* Never a drop on a slow or absent server: every publish is retried (with a capped backoff and
  a WARNING per failure) until it is stored; the client reconnects by itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext

from ..ledger import EVENT_HEADER, Ledger, Slot
from ..reader import MessageParser
from ..reader.format import header
from .options import EX_OK, EX_OSERR, EX_PROTOCOL, BridgeError, BridgeOptions
from .server import RETRY_MAX, LastMessage, ensure_stream, last_subject_message, open_connection

__all__ = ["Bridge", "Outbox"]

logger = logging.getLogger("tradebalancer.bridge")

WRONG_LAST_SEQUENCE = 10071  # JetStream's error code for a failed expected-last-sequence check
READ_SIZE = 1 << 20


@dataclass
class Outbox:
    """One partition: the framed bytes read and not yet published, and its publish state."""

    partition: int
    fd: int
    parser: MessageParser
    slot: Slot | None = None  # its counters in the ledger (None only in unit tests)
    pending: bytearray = field(default_factory=bytearray)
    taken: int = 0  # the run position (ledger.py) of the last event cut into a batch
    stored: int = 0  # the number of the last event known stored
    events: int = 0
    sequence: int = 0  # batches published by this run
    last_subject_sequence: int = 0  # the subject's last stream sequence, from the last PubAck
    eof: bool = False
    cut: bool = False  # the pipe began inside a message (counted once)
    reading: bool = False
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Bridge:
    """Reads the partitions' pipes and publishes their batches, one in flight per partition."""

    def __init__(
        self, options: BridgeOptions, fds: Sequence[int], run: str, ledger: Ledger | None = None
    ) -> None:
        if len(fds) != len(options.partitions):
            raise BridgeError(
                f"{len(fds)} pipe fds for {len(options.partitions)} partitions "
                f"({options.partitions}): the bridge must be started by the balancer"
            )
        self.options = options
        self.run = run
        self.outboxes = [
            Outbox(partition, fd, MessageParser(fd), ledger.slot(partition) if ledger else None)
            for partition, fd in zip(options.partitions, fds, strict=True)
        ]
        self.stopping = False
        self.published_events = 0
        self.lost_events = 0  # read by a predecessor (or cut) and never stored, found at start
        self.connecting: asyncio.Future[Client] | None = None
        self.failure: Exception | None = None  # a pipe that is not the balancer's framing

    async def run_until_done(self) -> int:
        """Publish until every pipe reached end of file (or SIGTERM) and all is stored."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop)
        self.connecting = asyncio.ensure_future(open_connection(self.options, time.monotonic))
        try:
            connection = await self.connecting
        except asyncio.CancelledError:
            logger.info("SIGTERM before JetStream was reached: nothing was read from the pipes")
            return EX_OK
        try:
            js = connection.jetstream(timeout=self.options.publish_timeout)
            await ensure_stream(js, self.options)
            limit = min(self.options.max_batch_bytes, max(connection.max_payload - 1024, 4096))
            for outbox in self.outboxes:
                last = await last_subject_message(js, self.options, outbox.partition)
                outbox.last_subject_sequence = last.sequence
                self._account(outbox, last)
                os.set_blocking(outbox.fd, False)
                self._resume(outbox, limit)
            await asyncio.gather(
                *(self._publish_all(js, outbox, limit) for outbox in self.outboxes)
            )
        finally:
            await connection.drain()
        if self.failure is not None:
            raise BridgeError(f"{self.failure}: is this fd one of the balancer's pipes?", EX_OSERR)
        logger.info(
            "all pipes closed; %d events published%s",
            self.published_events,
            f", {self.lost_events} lost by a previous bridge" if self.lost_events else "",
        )
        return EX_OK

    def _account(self, outbox: Outbox, last: LastMessage) -> None:
        """At start: what the previous bridges read and JetStream did not store is lost; say so."""
        slot = outbox.slot
        assert slot is not None
        loss = slot.account(last.event)
        outbox.taken = slot.read
        outbox.stored = last.event if last.event is not None else slot.base
        if loss is not None:
            self.lost_events += loss.events
            logger.warning(
                "%d events of partition %d were read by the previous bridge but never stored in "
                "JetStream (numbers %d-%d, a gap in %s): counted as not delivered",
                *(loss.events, loss.partition, loss.first, loss.first + loss.events - 1),
                self.options.subject(outbox.partition),
            )

    def stop(self) -> None:
        """SIGTERM: read no more; publish what was read, then exit."""
        self.stopping = True
        if self.connecting is not None:
            self.connecting.cancel()  # done already, once connected
        for outbox in self.outboxes:
            self._pause(outbox)
            outbox.eof = True
            outbox.ready.set()

    def _resume(self, outbox: Outbox, limit: int) -> None:
        if not outbox.reading and not outbox.eof and len(outbox.pending) < limit:
            asyncio.get_running_loop().add_reader(outbox.fd, self._read, outbox, limit)
            outbox.reading = True

    def _pause(self, outbox: Outbox) -> None:
        if outbox.reading:
            asyncio.get_running_loop().remove_reader(outbox.fd)
            outbox.reading = False

    def _read(self, outbox: Outbox, limit: int) -> None:
        try:
            data = os.read(outbox.fd, READ_SIZE)
        except BlockingIOError:
            return
        if not data:
            outbox.parser.receive_eof()
            outbox.eof = True
            self._pause(outbox)
        else:
            pending = outbox.pending
            messages = outbox.parser.receive_data(data)
            skipped = sum(len(run) for run in outbox.parser.skipped_received())
            if skipped:  # a predecessor died inside a message: before any event of this one
                self._cut(outbox, skipped)
            for message in messages:
                pending += header(len(message))
                pending += message
            outbox.events += len(messages)
            if outbox.slot is not None:
                outbox.slot.add_read(len(messages))
            if outbox.parser.error is not None:  # not the balancer's framing: publish no more
                self.failure = outbox.parser.error
                outbox.eof = True
                self._pause(outbox)
            elif len(pending) >= limit:  # backpressure: the pipe fills, the balancer holds back
                self._pause(outbox)
        outbox.ready.set()

    async def _publish_all(self, js: JetStreamContext, outbox: Outbox, limit: int) -> None:
        while True:
            await outbox.ready.wait()
            outbox.ready.clear()
            while outbox.pending:
                payload, events = self._take(outbox, limit)
                outbox.taken += events
                self._resume(outbox, limit)
                await self._publish(js, outbox, payload)
                self.published_events += events
            if outbox.eof:
                return
            self._resume(outbox, limit)

    def _cut(self, outbox: Outbox, skipped: int) -> None:
        if outbox.cut:  # the rest of the same message, in a later read
            return
        outbox.cut = True
        number = None
        if outbox.slot is not None and not outbox.pending and outbox.taken == outbox.slot.read:
            number = outbox.slot.cut()
            outbox.taken = outbox.slot.read
            self.lost_events += 1
        logger.warning(
            "1 event of partition %d was read in part by the previous bridge and never stored in "
            "JetStream (%d bytes of it skipped%s): counted as not delivered",
            *(outbox.partition, skipped, f", number {number}" if number else ""),
        )

    @staticmethod
    def _take(outbox: Outbox, limit: int) -> tuple[bytes, int]:
        """Cut the next batch: whole framed messages, at most ``limit`` bytes (one if larger)."""
        pending = outbox.pending
        if len(pending) <= limit:
            payload, events = bytes(pending), outbox.events
            pending.clear()
            outbox.events = 0
            return payload, events
        end = count = 0
        view = memoryview(pending)
        while end < len(pending):
            size = 4 + int.from_bytes(view[end : end + 4], "little")
            if end + size > limit and count:
                break
            end += size
            count += 1
        view.release()
        payload = bytes(pending[:end])
        del pending[:end]
        outbox.events -= count
        return payload, count

    async def _publish(self, js: JetStreamContext, outbox: Outbox, payload: bytes) -> None:
        outbox.sequence += 1
        msg_id = f"{self.run}.{outbox.partition}.{outbox.sequence}"
        subject = self.options.subject(outbox.partition)
        number = outbox.taken + (outbox.slot.base if outbox.slot is not None else 0)
        delay = 0.05
        while True:
            headers = {
                "Nats-Msg-Id": msg_id,
                "Nats-Expected-Last-Subject-Sequence": str(outbox.last_subject_sequence),
                EVENT_HEADER: str(number),
            }
            try:
                ack = await js.publish(
                    subject, payload, stream=self.options.stream, headers=headers
                )
                outbox.last_subject_sequence = ack.seq
                outbox.stored = number
                return
            except nats.js.errors.APIError as exc:
                if exc.err_code != WRONG_LAST_SEQUENCE:
                    logger.warning("publish to %s refused (%s); retrying", subject, exc)
                else:
                    last = await last_subject_message(js, self.options, outbox.partition)
                    if last.msg_id == msg_id:  # stored before the server went away: done
                        outbox.last_subject_sequence = last.sequence
                        outbox.stored = number
                        return
                    if not self._stored_late(outbox, last):
                        raise BridgeError(
                            f"another publisher writes {subject} (its last message "
                            f"{last.msg_id!r} is not this bridge's): give each feed its own "
                            "stream or subject_prefix",
                            EX_PROTOCOL,
                        ) from exc
                    continue  # on top of the predecessor's batch, at once
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                logger.warning(
                    "publish to %s not acknowledged (%s); retrying (%d bytes held)",
                    subject, type(exc).__name__, len(payload) + len(outbox.pending),
                )  # fmt: skip
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    def _stored_late(self, outbox: Outbox, last: LastMessage) -> bool:
        """Whether ``last`` is a predecessor's batch stored after this bridge started (its
        connection's last publish, taken in by the server late); if so, uncount its events."""
        slot = outbox.slot
        if (
            slot is None
            or last.event is None
            or not outbox.stored < last.event <= number_read(slot)
        ):
            return False
        late = slot.stored_late(last.event, outbox.stored)
        self.lost_events -= late
        outbox.stored = last.event
        outbox.last_subject_sequence = last.sequence
        logger.warning(
            "a batch of the previous bridge was stored in %s after this one started: %d events "
            "counted as not delivered arrived after all (up to number %d)",
            *(self.options.subject(outbox.partition), late, last.event),
        )
        return True


def number_read(slot: Slot) -> int:
    """The number of the last event the previous bridges of this run read (ledger.py)."""
    return slot.base + slot.accounted
