"""The event loop's selector: what it watches, registered once and changed only when it must.

Owns the one epoll selector of the service and its bookkeeping: the signals' wakeup fd, the
connection's fd with the events it wants now (they change as the connection opens, and when
backpressure stops reading), and the write side of every pipe that holds a backlog. Knows
nothing of what the fds carry: each registration is tagged, and ``select`` hands back the tags.
"""

from __future__ import annotations

import contextlib
import selectors

from .pipes import Pipe

__all__ = ["CONNECTION", "WAKEUP", "Poller"]

WAKEUP, CONNECTION = "wakeup", "connection"  # the tags of the two fds that are not pipes


class Poller:
    """One selector: the wakeup fd, the connection's fd, the pipes with a backlog."""

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._connection: tuple[int, int] | None = None  # (fd, events) registered
        self._pipes: set[int] = set()  # indexes of the pipes watched for writability

    def watch_wakeup(self, fd: int) -> None:
        """Watch the signals' wakeup fd."""
        self._selector.register(fd, selectors.EVENT_READ, WAKEUP)

    def watch_connection(self, fd: int, events: int) -> None:
        """Watch the connection's ``fd`` for ``events`` (fd -1 or no events: do not watch)."""
        wanted = (fd, events) if fd >= 0 and events else None
        if wanted == self._connection:
            return
        if self._connection is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(self._connection[0])
        self._connection = None
        if wanted is not None:
            self._selector.register(fd, events, CONNECTION)
            self._connection = wanted

    def watch_pipe(self, pipe: Pipe) -> None:
        """Watch ``pipe`` for writability (it holds a backlog)."""
        if pipe.index not in self._pipes:
            self._selector.register(pipe.write_fd, selectors.EVENT_WRITE, pipe)
            self._pipes.add(pipe.index)

    def unwatch_pipe(self, pipe: Pipe) -> None:
        """Stop watching ``pipe`` (its backlog is written)."""
        if pipe.index in self._pipes:
            self._selector.unregister(pipe.write_fd)
            self._pipes.discard(pipe.index)

    def select(self, timeout: float) -> list[tuple[object, int]]:
        """Wait up to ``timeout`` seconds; return (tag, events) for every ready fd."""
        return [(key.data, mask) for key, mask in self._selector.select(timeout)]

    def close(self) -> None:
        """Close the selector."""
        self._selector.close()
