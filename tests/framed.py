"""Framed events for the worker-side tests, shared by test_framing.py and test_reader.py.

``frame`` frames an event the way the balancer does; ``trade`` and ``sized`` make events.
"""

from __future__ import annotations


def frame(body: bytes) -> bytes:
    """Frame one event the way the balancer does."""
    return len(body).to_bytes(4, "little") + body


def trade(i: int) -> bytes:
    """A trade event like the feed's, distinct per ``i``."""
    return b'{"ev":"T","sym":"S%d","p":%d.5,"s":%d,"t":%d}' % (i % 7, i, i % 100 + 1, i)


def sized(length: int) -> bytes:
    """An event of exactly ``length`` bytes that ends with nested objects closing: ``}}}``."""
    prefix, suffix = b'{"a":{"b":{"c":"', b'"}}}'
    return prefix + b"y" * (length - len(prefix) - len(suffix)) + suffix
