"""Quantities for humans: byte sizes in the log lines and the status line.

Owns how the project writes a size ("1 MiB", "512 KiB", "23.31 MiB"). No I/O, no state.
"""

from __future__ import annotations

__all__ = ["format_size"]


def format_size(size: float) -> str:
    """Format a byte count for humans: 1 MiB, 512 KiB, 2 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:g} {unit}" if unit == "B" else f"{size:.4g} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
