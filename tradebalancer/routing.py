"""Route key -> pipe number: FNV-1a 64-bit of the key, upper 32 bits, modulo the pipe count.

Owns the one function that decides which worker sees a symbol, bit for bit the mapping of the C
original "lb": ``(fnv1a64(key) >> 32) % pipes``, so the same symbol reaches the same worker
index under either balancer. ``PipeMap`` puts a bounded cache in front of it because FNV-1a in
pure Python costs about 280 ns per key while a dict hit costs about 25 ns, and a feed carries a
few thousand distinct symbols.

Choose an odd pipe count. Modulo a power of two only hash bits 32 to 39 count, and below bit
40 the FNV prime multiplies by 0x1b3 alone, which moves a byte's influence up about nine bits
per byte, so keys under five bytes barely reach them: with 16 pipes all one- and two-letter
tickers land on two pipes, with 4 pipes all 17,576 three-letter tickers on two (the C original
does the same; tests/test_routing.py shows it). An odd count uses all 32 upper bits and
spreads tickers as evenly as chance.

Does no I/O, and knows nothing of JSON: keys are the route key's bytes (a symbol's UTF-8);
which member of an event holds its key is ``DEFAULT_ROUTE_KEYS`` (the configuration may add).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

__all__ = [
    "CACHE_LIMIT",
    "DEFAULT_ROUTE_KEYS",
    "FNV_OFFSET_BASIS",
    "FNV_PRIME",
    "PipeMap",
    "fnv1a64",
    "pipe_for",
]

# Massive (Polygon.io) websocket event types -> the member holding the symbol.
DEFAULT_ROUTE_KEYS: Final[Mapping[str, str]] = MappingProxyType(
    # stocks, options and indices: trades, quotes, second and minute aggregates, fair value
    dict.fromkeys(["T", "Q", "A", "AM", "FMV"], "sym")
    # limit up/limit down, net order imbalance, index values
    | dict.fromkeys(["LULD", "NOI", "V"], "T")
    # forex aggregates; crypto aggregates, trades, quotes and level 2 books
    | dict.fromkeys(["CA", "CAS", "XA", "XAS", "XT", "XQ", "XL2"], "pair")
    | {"C": "p"}  # forex quotes
)


# FNV-1a 64-bit parameters, as published by Fowler, Noll and Vo
# (http://www.isthe.com/chongo/tech/comp/fnv/).
FNV_OFFSET_BASIS = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
_MASK64 = 0xFFFFFFFFFFFFFFFF

# A real feed has some 12,000 listed symbols (with options or crypto pairs, tens of thousands);
# a hostile or broken feed could send a new key in every event. Past this many entries the
# cache is dropped and refills from the live symbols: memory stays bounded (about 100 MB at
# worst) and the mapping stays the same, since it is a pure function of the key.
CACHE_LIMIT = 1_000_000


def fnv1a64(data: bytes) -> int:
    """Return the FNV-1a 64-bit hash of ``data``: for each byte, xor it in, then multiply."""
    digest = FNV_OFFSET_BASIS
    for byte in data:
        digest = ((digest ^ byte) * FNV_PRIME) & _MASK64
    return digest


def pipe_for(key: bytes, pipes: int) -> int:
    """Return the pipe (0 to ``pipes - 1``) for ``key``, exactly as the C original computes it."""
    return (fnv1a64(key) >> 32) % pipes


class PipeMap:
    """``pipe_for`` with a bounded key -> pipe cache in front, for one fixed pipe count."""

    __slots__ = ("_pipes", "limit", "pipes")

    def __init__(self, pipes: int, limit: int = CACHE_LIMIT) -> None:
        """Map keys over ``pipes`` pipes, caching at most ``limit`` keys at a time."""
        if pipes < 1:
            raise ValueError(f"pipes must be at least 1, got {pipes}")
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.pipes = pipes
        self.limit = limit
        self._pipes: dict[bytes, int] = {}

    def pipe(self, key: bytes) -> int:
        """Return ``pipe_for(key, self.pipes)``, from the cache when it holds ``key``."""
        pipe = self._pipes.get(key)
        if pipe is None:
            if len(self._pipes) >= self.limit:
                self._pipes.clear()
            pipe = self._pipes[key] = (fnv1a64(key) >> 32) % self.pipes
        return pipe

    def __len__(self) -> int:
        """Return how many keys the cache holds now."""
        return len(self._pipes)


def balance_warning(pipes: int, maximum: int) -> str | None:
    """Return a warning if ``pipes`` is a count the C mapping spreads badly, else None.

    With a power of two, ``(h >> 32) % pipes`` keeps only hash bits 32 and up to log2(pipes),
    and FNV-1a's last multiply barely moves them for keys of a few bytes: on 4,000 realistic
    tickers, 16 pipes get 56 to 1,277 symbols each, 15 pipes 231 to 300.
    """
    if pipes < 2 or pipes & (pipes - 1):
        return None
    odd = f"{pipes - 1} or {pipes + 1}" if pipes < maximum else f"{pipes - 1}"
    return (
        f"pipes = {pipes} is a power of two: the lb-compatible symbol mapping then spreads "
        f"short tickers very unevenly over the pipes; use an odd count such as {odd} "
        "unless you must match an existing lb deployment"
    )
