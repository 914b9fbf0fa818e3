"""Quantities for humans: byte sizes in the log lines and the status line.

Owns how the project writes a size ("1 MiB", "512 KiB", "23.31 MiB") and a count of things
("1 worker", "3 workers", "1,356,073 events"). No I/O, no state.
"""

from __future__ import annotations

__all__ = ["count", "format_size"]


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
