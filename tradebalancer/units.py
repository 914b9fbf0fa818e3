"""Quantities for humans: byte sizes in the log lines and the status line.

Owns how the project writes a size ("1 MiB", "512 KiB", "23.31 MiB") and a count of things
("1 worker", "3 workers", "1,356,073 events") and a set of pipe indexes ("0-2,5"). No I/O,
no state.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["count", "format_ranges", "format_size"]


def format_size(size: float) -> str:
    """Format a byte count for humans: 1 MiB, 512 KiB, 2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:g} {unit}" if unit == "B" else f"{size:.4g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def count(number: int, thing: str, plural: str | None = None) -> str:
    """``number`` things, in words: "1 worker", "2 workers", "1,500 events"."""
    return f"{number:,} {thing if number == 1 else plural or thing + 's'}"


def format_ranges(indexes: Iterable[int]) -> str:
    """Pipe indexes, compactly: [0, 1, 2, 5] -> '0-2,5'."""
    items = sorted(indexes)
    parts: list[str] = []
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        parts.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(parts)
