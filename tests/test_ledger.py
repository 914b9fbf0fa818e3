"""The bridge's ledger: counts that outlive a bridge, and the loss a successor finds with them."""

from __future__ import annotations

import os

import pytest

from tradebalancer import delivery
from tradebalancer.ledger import LEDGER_VARIABLE, Ledger, Loss


@pytest.fixture
def ledger() -> Ledger:
    return Ledger.create(4)


def test_a_first_bridge_numbers_on_from_the_stream_and_loses_nothing(ledger: Ledger) -> None:
    """The run's first bridge takes the stream's last number as its base; nothing was read."""
    slot = ledger.slot(2)
    assert slot.account(1_000) is None
    assert (slot.base, slot.read, slot.lost) == (1_000, 0, 0)
    assert ledger.slot(1).based is False


@pytest.mark.parametrize(
    ("stored", "read", "loss"),
    [
        (None, 0, None),  # nothing read, nothing stored
        (None, 30, Loss(0, 30, 1)),  # read, none stored: all lost
        (20, 30, Loss(0, 10, 21)),  # the tail after the last stored
        (30, 30, None),  # all stored, the last ack never seen
    ],
)
def test_a_successor_counts_what_was_read_after_the_last_stored_event(
    ledger: Ledger, stored: int | None, read: int, loss: Loss | None
) -> None:
    """Events read after the subject's last stored number are lost, numbered from there."""
    slot = ledger.slot(0)
    slot.account(None)
    slot.add_read(read)
    assert slot.account(stored) == loss
    assert slot.lost == (loss.events if loss else 0)
    assert slot.account(stored) is None  # a third bridge counts nothing twice


def test_a_loss_is_a_gap_the_next_bridge_numbers_after(ledger: Ledger) -> None:
    """Lost events keep their numbers: after a loss of 31-40, a later loss starts after 40."""
    slot = ledger.slot(1)
    slot.account(0)
    slot.add_read(40)
    assert slot.account(30) == Loss(1, 10, 31)
    slot.add_read(5)  # 41-45, never stored either
    assert slot.account(30) == Loss(1, 5, 41)
    assert slot.lost == 15


def test_a_cut_event_is_one_more_lost_with_the_next_number(ledger: Ledger) -> None:
    """A message whose head went with the predecessor counts once, numbered after the others."""
    slot = ledger.slot(3)
    slot.account(100)
    slot.add_read(10)
    assert slot.account(110) is None
    assert slot.cut() == 111
    assert (slot.read, slot.accounted, slot.lost) == (11, 11, 1)


def test_a_batch_stored_late_is_uncounted(ledger: Ledger) -> None:
    """Numbers counted lost that turn up stored are subtracted; never more than were counted."""
    slot = ledger.slot(0)
    slot.account(0)
    slot.add_read(50)
    assert slot.account(20) == Loss(0, 30, 21)
    assert slot.stored_late(35, 20) == 15
    assert slot.stored_late(60, 35) == 15  # capped at the last number read before the loss
    assert ledger.lost() == {}


def test_the_counts_outlive_the_process_that_wrote_them(ledger: Ledger) -> None:
    """A child maps the fd, counts and is killed; the parent's ledger holds its counts."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        child = Ledger.from_environment({LEDGER_VARIABLE: str(ledger.fd)}, 4)
        child.slot(2).account(7)
        child.slot(2).add_read(12)
        os.kill(os.getpid(), 9)
    os.waitpid(pid, 0)
    assert ledger.slot(2).account(9) == Loss(2, 10, 10)
    assert ledger.lost() == {2: 10}


def test_an_fd_that_is_no_ledger_is_refused(tmp_path: object) -> None:
    """A ledger too small for the partitions is a ValueError naming the variable."""
    small = Ledger.create(1)
    with pytest.raises(ValueError, match=LEDGER_VARIABLE):
        Ledger.from_environment({LEDGER_VARIABLE: str(small.fd)}, 3)
    assert Ledger.from_environment({}, 3).pipes == 3


def test_the_last_line_counts_a_bridges_loss_as_not_delivered() -> None:
    """Events a killed bridge lost move from delivered to not delivered, and the line says why."""
    accounts = delivery.account([10, 10, 10], {}, {0: 0, 1: 1, 2: 1}, {2: 4})
    assert accounts == [
        delivery.WorkerAccount(0, 10, 0),
        delivery.WorkerAccount(1, 16, 4, 4),
    ]
    line = delivery.describe(accounts)
    assert line.startswith("stopped: 4 events of 30 not delivered, read by a JetStream bridge")
    assert "worker 1 16 delivered, 4 not delivered (4 lost by a killed JetStream bridge)" in line
