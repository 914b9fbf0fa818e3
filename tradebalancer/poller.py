"""The event loop's epoll: what it watches, registered once and changed only when it must.

Owns the one epoll instance of the service and its bookkeeping: the signals' wakeup fd, the
connection's fd with the events it wants now (they change as the connection opens, and when
backpressure stops reading), and the write side of every pipe that holds a backlog. Knows
nothing of what the fds carry: each registration is tagged, and ``select`` hands back the tags.

Events are said as ``selectors`` says them (EVENT_READ, EVENT_WRITE), plus one selectors
cannot ask for: the peer's hang-up, EPOLLRDHUP (epoll(7)), which the connection watches while
backpressure keeps it from reading, so that a feed closing or resetting the connection then is
noticed at once rather than when the pipes have drained.
"""

from __future__ import annotations

import contextlib
import select
import selectors
import socket

from .pipes import Pipe

__all__ = ["CONNECTION", "WAKEUP", "Poller", "Ready"]

WAKEUP, CONNECTION = "wakeup", "connection"  # the tags of the two fds that are not pipes

_HANGUP = select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR

Ready = tuple[object, int, bool]  # (tag, selectors events, hang-up)


def _epoll_mask(events: int, hangup: bool) -> int:
    mask = select.EPOLLIN if events & selectors.EVENT_READ else 0
    if events & selectors.EVENT_WRITE:
        mask |= select.EPOLLOUT
    return mask | (select.EPOLLRDHUP if hangup else 0)


class Poller:
    """One epoll: the wakeup fd, the connection's fd, the pipes with a backlog."""

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._tags: dict[int, object] = {}
        # (socket, fd, epoll mask) registered for the connection: the socket by identity, as a
        # new one often has the number of the one it replaces (closed, so gone from the epoll)
        self._connection: tuple[socket.socket, int, int] | None = None
        self._pipes: set[int] = set()  # indexes of the pipes watched for writability

    def watch_wakeup(self, fd: int) -> None:
        """Watch the signals' wakeup fd."""
        self._register(fd, select.EPOLLIN, WAKEUP)

    def watch_connection(
        self, sock: socket.socket | None, events: int, *, hangup: bool = False
    ) -> None:
        """Watch the connection's ``sock`` for ``events`` (and its hang-up); None: not at all."""
        mask = _epoll_mask(events, hangup)
        current = self._connection
        if current is not None and current[0] is sock and current[2] == mask:
            return
        if current is not None:
            self._unregister(current[1])
        self._connection = None
        if sock is not None and mask:
            fd = sock.fileno()
            self._register(fd, mask, CONNECTION)
            self._connection = (sock, fd, mask)

    def watch_pipe(self, pipe: Pipe) -> None:
        """Watch ``pipe`` for writability (it holds a backlog)."""
        if pipe.index not in self._pipes:
            self._register(pipe.write_fd, select.EPOLLOUT, pipe)
            self._pipes.add(pipe.index)

    def unwatch_pipe(self, pipe: Pipe) -> None:
        """Stop watching ``pipe`` (its backlog is written)."""
        if pipe.index in self._pipes:
            self._unregister(pipe.write_fd)
            self._pipes.discard(pipe.index)

    def watch_fd(self, fd: int, tag: object, *, write: bool = False) -> None:
        """Watch another fd (a listener, a client) for reading, or for writing; ``tag`` comes
        back from ``select``."""
        mask = select.EPOLLOUT if write else select.EPOLLIN
        if fd in self._tags:
            self._epoll.modify(fd, mask)
            self._tags[fd] = tag
        else:
            self._register(fd, mask, tag)

    def unwatch_fd(self, fd: int) -> None:
        """Stop watching an fd given to ``watch_fd`` (before it is closed)."""
        self._unregister(fd)

    def select(self, timeout: float) -> list[Ready]:
        """Wait up to ``timeout`` seconds; return (tag, events, hang-up) for every ready fd."""
        ready = []
        for fd, mask in self._epoll.poll(timeout):
            events = (selectors.EVENT_READ if mask & select.EPOLLIN else 0) | (
                selectors.EVENT_WRITE if mask & select.EPOLLOUT else 0
            )
            ready.append((self._tags[fd], events, bool(mask & _HANGUP)))
        return ready

    def close(self) -> None:
        """Close the epoll instance."""
        self._epoll.close()

    def _register(self, fd: int, mask: int, tag: object) -> None:
        self._epoll.register(fd, mask)
        self._tags[fd] = tag

    def _unregister(self, fd: int) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._epoll.unregister(fd)
        self._tags.pop(fd, None)
