"""A listening address as the configuration writes it: ``HOST:PORT`` or ``unix:/path``.

Owns the syntax of the ``metrics`` key (and of any address the balancer listens on), parsed
once into an ``Address`` that config.py validates with and listener.py binds. No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Address", "parse_address"]


@dataclass(frozen=True)
class Address:
    """Where a listener listens: ``host:port`` over TCP, or a unix socket's path."""

    kind: Literal["tcp", "unix"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(text: str) -> Address:
    """``127.0.0.1:9464``, ``[::1]:9464``, ``0.0.0.0:9464`` or ``unix:/run/x.sock``; ValueError
    saying what is expected otherwise."""
    expected = (
        'expected "HOST:PORT" (like "127.0.0.1:9464" or "[::1]:9464") or "unix:/absolute/path"'
    )
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path.startswith("/"):
            raise ValueError(f"{expected}, got {text!r} (the socket path must be absolute)")
        return Address("unix", path=path)
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not host:
        raise ValueError(f"{expected}, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if int(port) > 65535:
        raise ValueError(f"{expected}, got {text!r} (the port must be 0 to 65535)")
    return Address("tcp", host=host, port=int(port))
