"""The JetStream bridge's own logic: its command line, and cutting a partition's batches."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradebalancer.bridge import Bridge, BridgeError, BridgeOptions, Outbox, parse_options
from tradebalancer.reader import MessageParser
from tradebalancer.reader.format import header

OPTIONS = BridgeOptions(servers=("nats://h:4222",), stream="s", subject_prefix="p", partitions=(3,))


def test_the_command_line_the_plan_renders_parses_back() -> None:
    """plan.bridge_argv's options become the bridge's options, the fds ignored."""
    options = parse_options(
        [
            *("--servers", "nats://a:1,nats://b:2", "--stream", "tb", "--subject-prefix", "x.y"),
            *("--partitions", "1,4", "--storage", "memory", "--replicas", "3", "--no-create"),
            *("--max-batch-bytes", "65536", "--credentials", "/c/n.creds", "3", "4"),
        ]
    )
    assert options == BridgeOptions(
        servers=("nats://a:1", "nats://b:2"),
        stream="tb",
        subject_prefix="x.y",
        partitions=(1, 4),
        credentials="/c/n.creds",
        storage="memory",
        replicas=3,
        create=False,
        max_batch_bytes=65536,
    )
    assert options.subject(4) == "x.y.4"


def test_fds_and_partitions_must_pair_up() -> None:
    """A bridge given two fds for one partition refuses to start, saying who must start it."""
    with pytest.raises(BridgeError, match="must be started by the balancer"):
        Bridge(OPTIONS, [3, 4], "run")


def outbox(events: list[bytes]) -> Outbox:
    """An outbox holding ``events`` framed, as _read leaves it."""

    async def make() -> Outbox:  # an asyncio.Event wants a loop in 3.11's dataclass default
        box = Outbox(3, -1, MessageParser())
        for event in events:
            box.pending += header(len(event)) + event
        box.events = len(events)
        return box

    return asyncio.run(make())


@given(
    st.lists(st.integers(min_value=2, max_value=300), min_size=1, max_size=40),
    st.integers(min_value=64, max_value=2000),
)
def test_batches_are_whole_events_in_order_and_bounded(sizes: list[int], limit: int) -> None:
    """Each batch is whole framed events, in order, within the limit unless one event is larger."""
    events = [b"{" + b"x" * (size - 2) + b"}" for size in sizes]
    box = outbox(events)
    seen: list[bytes] = []
    while box.pending:
        payload, count = Bridge._take(box, limit)
        messages = MessageParser().receive_data(payload)
        assert len(messages) == count
        assert len(payload) <= limit or count == 1
        seen += messages
    assert seen == events
    assert box.events == 0
