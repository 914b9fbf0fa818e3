"""The bridge's ledger: what the JetStream bridges of one balancer run took from each pipe.

Owns the memory, its layout and the one rule computed from it (``Slot.account``). The balancer
creates it (``Ledger.create``, an anonymous memfd) and holds it for its whole run; each bridge
it spawns gets the fd after its pipes (``LEDGER_VARIABLE`` names it) and maps it. The point is
that it outlives a bridge killed with SIGKILL: what that bridge had read from its pipes is gone
from the pipes and from its memory, but its count stays here for the successor, which compares
it with what JetStream stored, and for the balancer's last line (delivery.py), which counts the
difference as not delivered. Knows nothing of NATS and does no I/O beyond the mapping.

Numbering. Each event of a partition has a number: the stream's count of that partition's
events so far (the bridge stamps the last number of every batch in ``EVENT_HEADER``). The first
bridge of a balancer run sets ``base`` to the number on the subject's last stored message (0 if
none); the ``n``-th event this run's bridges read from the pipe is ``base + n``. Events lost
keep their numbers, so the stream shows them as a gap, and a successor continues after them.

Per partition (pipe index), six little-endian u64: ``read`` (events taken from the pipe, whole
messages), ``based`` (1 once ``base`` is set), ``base``, ``accounted`` (events up to this
position are stored or counted lost), ``lost`` (counted as never stored) and ``late`` (counted
lost, then found stored after all). The one window it cannot see: a SIGKILL between ``read(2)``
returning and the next ``read`` update, a few Python statements, loses that read uncounted.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from .reader.format import EVENT_HEADER

__all__ = ["EVENT_HEADER", "LEDGER_VARIABLE", "Ledger", "Loss", "Slot"]

LEDGER_VARIABLE: Final = "TRADEBALANCER_LEDGER_FD"  # the bridge's ledger fd, after its pipes
_FIELDS: Final = ("read", "based", "base", "accounted", "lost", "late")
_SLOT_BYTES: Final = 8 * len(_FIELDS)


@dataclass(frozen=True)
class Loss:
    """What a successor found at its start: events read before it and never stored."""

    partition: int
    events: int  # read by a predecessor, not stored: now counted lost
    first: int  # the number of the first of them


class Slot:
    """One partition's six counters, read and written in place."""

    def __init__(self, partition: int, view: memoryview) -> None:
        self.partition = partition
        self._view = view  # 'Q' items, in _FIELDS order

    @property
    def read(self) -> int:
        """Events this run's bridges took from the pipe (and a cut one, see ``account``)."""
        return int(self._view[0])

    @property
    def based(self) -> bool:
        """Whether ``base`` is set (by the run's first bridge)."""
        return bool(self._view[1])

    @property
    def base(self) -> int:
        """The number of the last event stored before this run."""
        return int(self._view[2])

    @property
    def accounted(self) -> int:
        """Events up to this position are stored or counted lost."""
        return int(self._view[3])

    @property
    def lost(self) -> int:
        """Events counted as read and never stored."""
        return int(self._view[4])

    @property
    def late(self) -> int:
        """Events counted lost and found stored after all."""
        return int(self._view[5])

    def set(self, **values: int) -> None:
        """Store the named counters."""
        for name, value in values.items():
            self._view[_FIELDS.index(name)] = value

    def begin(self, stored: int | None) -> None:
        """The first bridge of the run: number on from ``stored``, the last stored number."""
        if not self.based:
            self.set(based=1, base=stored or 0)

    def add_read(self, events: int) -> None:
        """``events`` more were taken from the pipe."""
        self._view[0] += events

    def account(self, stored: int | None) -> Loss | None:
        """At a bridge's start: count what its predecessors read and JetStream has not.

        ``stored`` is the number on the subject's last stored message (None: no message, or
        one without the header). Events after ``max(stored, accounted)`` up to ``read`` are
        lost. Returns None when nothing was."""
        self.begin(stored)
        first = max((stored or 0) - self.base, self.accounted, 0)
        lost = self.read - first
        self.set(accounted=self.read, lost=self.lost + lost)
        return Loss(self.partition, lost, self.base + first + 1) if lost > 0 else None

    def cut(self) -> int:
        """The pipe began inside a message whose head a predecessor read: that event is lost.
        It takes the next position; returns its number."""
        self.set(read=self.read + 1)
        self.set(accounted=self.read, lost=self.lost + 1)
        return self.base + self.read

    def stored_late(self, stored: int, last_known: int) -> int:
        """A predecessor's batch was stored after the successor counted it lost: the events
        numbered ``last_known + 1 .. stored`` arrived after all. Returns how many."""
        late = max(0, min(stored, self.base + self.accounted) - last_known)
        self.set(late=self.late + late)
        return late


class Ledger:
    """The mapped ledger of ``pipes`` partitions (see the module docstring)."""

    def __init__(self, fd: int, pipes: int) -> None:
        self.fd = fd
        self.pipes = pipes
        self._map = mmap.mmap(fd, pipes * _SLOT_BYTES)
        self._view = memoryview(self._map).cast("Q")

    @classmethod
    def create(cls, pipes: int) -> Ledger:
        """A new zeroed ledger in an anonymous memfd, closed on exec (the spawner moves it)."""
        fd = os.memfd_create("tradebalancer-ledger", os.MFD_CLOEXEC)
        os.ftruncate(fd, pipes * _SLOT_BYTES)
        return cls(fd, pipes)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str], pipes: int) -> Ledger:
        """The balancer's ledger (``LEDGER_VARIABLE``), or a private one of ``pipes`` partitions
        when the bridge runs without a balancer; ValueError if the fd is not a ledger."""
        value = environ.get(LEDGER_VARIABLE)
        if not value:
            return cls.create(pipes)
        fd = int(value)
        size = os.fstat(fd).st_size
        if size < pipes * _SLOT_BYTES or size % _SLOT_BYTES:
            raise ValueError(
                f"{LEDGER_VARIABLE}={value}: fd {fd} is not a ledger of {pipes} partitions"
            )
        return cls(fd, size // _SLOT_BYTES)

    def slot(self, partition: int) -> Slot:
        """Partition ``partition``'s counters."""
        start = partition * len(_FIELDS)
        return Slot(partition, self._view[start : start + len(_FIELDS)])

    def lost(self) -> dict[int, int]:
        """Pipe index -> events read by a bridge and never stored (for the balancer's account)."""
        found = {p: self.slot(p).lost - self.slot(p).late for p in range(self.pipes)}
        return {partition: count for partition, count in found.items() if count}

    def close(self) -> None:
        """Unmap and close the fd."""
        self._view.release()
        self._map.close()
        os.close(self.fd)
