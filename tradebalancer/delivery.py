"""The stop's account: the events each worker took, and those no worker took.

Owns the count in the balancer's last log line and its exit status. Per pipe: the events
routed to it (split.py counts them) less those still there when the stop is over. By then no
worker reads any more, so what is left (the bytes in the pipe, read out through the balancer's
own read end, then the backlog that never entered it) is cut into messages by the workers' own
parser (reader/framing.py). It finds the first whole message even when a worker ended halfway
through one; that part counts as one more event not delivered. Per worker: the sum over its
pipes.

"Delivered" is therefore "read from the pipe by a worker": an event a worker read and then
lost in its own code (a crash) counts as delivered, and the message a worker killed mid-run
was reading when it died is skipped by its successor's reader (``on_skip``), not counted here.
The JetStream bridge is the exception: for it "delivered" is "stored in JetStream", and what a
killed bridge had read and not stored is counted by its successor in the balancer's ledger
(ledger.py); ``lost`` carries that count, per pipe, into the bridge's share as not delivered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from .reader.framing import MessageParser
from .units import count

__all__ = ["WorkerAccount", "account", "describe", "left_in", "tally"]


@dataclass(frozen=True)
class WorkerAccount:
    """What one worker took of the events routed to its pipes."""

    worker: int
    delivered: int
    undelivered: int
    lost: int = 0  # of undelivered: read by a JetStream bridge killed before they were stored


def left_in(remainder: Iterable[bytes | memoryview]) -> int:
    """The events in a pipe's ``remainder`` (pipes.Pipe.remainder): whole messages, plus one
    if it starts inside a message that a worker had begun to read."""
    parser = MessageParser()
    messages = 0
    for chunk in remainder:
        messages += len(parser.receive_data(chunk))
    parser.receive_eof()
    return messages + (1 if parser.skipped_bytes else 0)


def account(
    routed: Sequence[int],
    left: Mapping[int, int],
    owners: Mapping[int, int],
    lost: Mapping[int, int] | None = None,
) -> list[WorkerAccount]:
    """Each worker's account from the events ``routed`` per pipe, those ``left`` per pipe, the
    pipes' ``owners`` (pipe index -> worker index) and those a bridge ``lost`` per pipe."""
    lost = lost or {}
    totals: dict[int, list[int]] = {}
    for pipe, worker in sorted(owners.items()):
        total = totals.setdefault(worker, [0, 0, 0])
        undelivered = left.get(pipe, 0) + lost.get(pipe, 0)
        total[0] += routed[pipe] - undelivered
        total[1] += undelivered
        total[2] += lost.get(pipe, 0)
    return [WorkerAccount(worker, *totals[worker]) for worker in sorted(totals)]


def tally(
    routed: Sequence[int],
    remainders: Iterable[tuple[int, Iterable[bytes | memoryview]]],
    owners: Mapping[int, int],
    lost: Mapping[int, int] | None = None,
) -> list[WorkerAccount]:
    """``account`` from each pipe's (index, remainder) as the stop left it."""
    return account(routed, {index: left_in(rest) for index, rest in remainders}, owners, lost)


def describe(accounts: Sequence[WorkerAccount]) -> str:
    """The last log line's text: the totals, then each worker's share."""
    delivered = sum(a.delivered for a in accounts)
    undelivered = sum(a.undelivered for a in accounts)
    shares = "; ".join(
        f"worker {a.worker} {a.delivered:,}"
        + (f" delivered, {a.undelivered:,} not delivered" if a.undelivered else "")
        + (f" ({a.lost:,} lost by a killed JetStream bridge)" if a.lost else "")
        for a in accounts
    )
    if not undelivered:
        return f"stopped: all {count(delivered, 'event')} delivered ({shares})"
    lost = sum(a.lost for a in accounts)
    where = "left in the pipes of workers that did not read them"
    if lost == undelivered:
        where = "read by a JetStream bridge that was killed before they were stored"
    elif lost:
        where += ", or read by a JetStream bridge killed before they were stored"
    return (
        f"stopped: {count(undelivered, 'event')} of {delivered + undelivered:,} not delivered, "
        f"{where} ({shares})"
    )
