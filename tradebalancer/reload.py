"""What a reload may change: the running feed's configuration against the file's, key by key.

Owns the rule of ``systemctl reload`` (or SIGHUP): which keys apply to the running instance and
which need a restart. A reload applies all of its changes or none: if any key that needs a
restart changed, the whole reload is refused, naming each such key with its old and new value,
and the running configuration stays. Must not touch: reading the file (config.py), acting on
the change (the service re-subscribes on the live connection).

Live keys are those the loop reads afresh: the subscriptions (sent to the feed on the open
connection, no reconnect), the stats interval and the delay warning. Everything else shapes
what was set up at the start (the connection, the pipes, the workers, the listeners) and
changing it under the running instance would mean closing what workers or clients hold.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields, replace

from .command import CommandTemplate
from .config import FeedConfig

__all__ = ["LIVE_KEYS", "Change", "compare"]

# The keys a reload applies to the running instance.
LIVE_KEYS = frozenset({"subscribe", "stats_interval", "delay_warning", "delay_warning_after"})

# Sub-tables, compared key by key.
_TABLES = frozenset({"reconnect", "worker_restart"})

# Fields derived from another key: a change shows as a change of that key.
_DERIVED = {"host": "url", "port": "url", "path": "url", "secure": "url"}


@dataclass(frozen=True)
class Change:
    """The differences between the running feed and the file's, by key path."""

    feed: str
    live: Mapping[str, tuple[object, object]]  # key path -> (running, file)
    restart: Mapping[str, tuple[object, object]]  # key path -> (running, file)

    @property
    def empty(self) -> bool:
        """Nothing differs."""
        return not self.live and not self.restart

    @property
    def subscribes(self) -> bool:
        """The subscriptions changed."""
        return f"feeds.{self.feed}.subscribe" in self.live

    def refusal(self) -> str:
        """One line naming each key that needs a restart, for the log and ``reload``."""
        keys = "; ".join(
            f"{key} ({_show(a)} -> {_show(b)})" for key, (a, b) in self.restart.items()
        )
        return (
            f"reload refused, nothing changed: {keys} cannot change while the feed runs; "
            f"restart it to apply (systemctl restart tradebalancer@{self.feed})"
        )

    def summary(self) -> str:
        """What the reload changed, for the log."""
        if not self.live:
            return "reloaded: nothing changed"
        return "reloaded: " + "; ".join(
            f"{key} {_show(a)} -> {_show(b)}" for key, (a, b) in self.live.items()
        )

    def apply(self, running: FeedConfig, loaded: FeedConfig) -> FeedConfig:
        """The running configuration with the live keys taken from ``loaded``."""
        names = {key.rsplit(".", 1)[-1] for key in self.live}
        return replace(running, **{name: getattr(loaded, name) for name in names})


def compare(running: FeedConfig, loaded: FeedConfig) -> Change:
    """Compare the running feed's configuration with the one just read from the file."""
    live: dict[str, tuple[object, object]] = {}
    restart: dict[str, tuple[object, object]] = {}
    prefix = f"feeds.{running.name}"
    for name, old, new in _differences(running, loaded):
        top = name.split(".", 1)[0]
        key = f"{prefix}.{_DERIVED.get(top, name)}"
        if top in _DERIVED:
            old, new = running.url, loaded.url
        (live if top in LIVE_KEYS else restart)[key] = (old, new)
    return Change(running.name, live, restart)


def _differences(a: object, b: object, prefix: str = "") -> Iterator[tuple[str, object, object]]:
    for field in fields(a):  # type: ignore[arg-type]
        old, new = getattr(a, field.name), getattr(b, field.name)
        if isinstance(old, CommandTemplate) and isinstance(new, CommandTemplate):
            old, new = old.sources, new.sources  # where it was written does not matter
        if old == new:
            continue
        if field.name in _TABLES:
            yield from _differences(old, new, f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", old, new


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(str(item) for item in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {v}" for k, v in value.items()) + "}"
    return str(value)
