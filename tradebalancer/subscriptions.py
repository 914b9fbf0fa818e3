"""The channels one connection subscribed to: confirmed, refused, or not answered yet.

Owns matching the feed's answers to the channels asked for, by meaning rather than exact text:
a confirmation ``subscribed to: T.*`` may differ in case, list several channels, or come in
another order than the subscribe message; a refusal (an ``error`` status while subscribing) is
matched to the channel its message names, or, if it names none, to the one channel still
waiting when only one is. A reload changes the channels on the live connection (``change``):
the new ones wait for their confirmation like the first, the ones dropped are forgotten at once
and their ``unsubscribed to: ...`` answers are matched as they come (``unsubscribed``).
Sans-I/O: no clock, no logging; the feed decides what each answer means for the connection.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["Subscriptions"]

_CONFIRMED = "subscribed to:"
_UNSUBSCRIBED = "unsubscribed to:"


class Subscriptions:
    """The channels of one connection: pending, confirmed or refused (with the feed's message)."""

    def __init__(self, channels: Sequence[str]) -> None:
        self.channels = tuple(channels)
        self._by_key = {channel.casefold(): channel for channel in self.channels}
        self.pending: list[str] = list(self.channels)  # in the order they were asked for
        self.confirmed: list[str] = []
        self.refused: dict[str, str] = {}  # channel -> the feed's message
        self.leaving: list[str] = []  # unsubscribed, the feed's answer not seen yet

    @property
    def params(self) -> str:
        """The subscribe message's ``params``: the channels joined by commas."""
        return ",".join(self.channels)

    @property
    def settled(self) -> bool:
        """Every channel was confirmed or refused."""
        return not self.pending

    @property
    def all_refused(self) -> bool:
        """Every channel was refused: nothing will stream on this connection."""
        return len(self.refused) == len(self.channels)

    def change(self, channels: Sequence[str]) -> tuple[list[str], list[str]]:
        """Take the channels a reload asks for; return (added, removed): the added are pending,
        the removed forgotten and, unless the feed had refused them, leaving (to unsubscribe).

        Compared by case-folded name, as the feed's answers are: a change of case alone is no
        change on this connection (sending it would unsubscribe what it subscribes).
        """
        wanted = {channel.casefold(): channel for channel in channels}
        added = [channel for key, channel in wanted.items() if key not in self._by_key]
        gone = [channel for key, channel in self._by_key.items() if key not in wanted]
        removed = [channel for channel in gone if channel not in self.refused]
        for channel in gone:
            for held in (self.pending, self.confirmed):
                if channel in held:
                    held.remove(channel)
            self.refused.pop(channel, None)
        self.leaving += removed
        removed_keys = {channel.casefold() for channel in gone}
        self.pending += added
        kept = tuple(c for c in self.channels if c.casefold() not in removed_keys)
        self.channels = kept + tuple(added)
        self._by_key = {channel.casefold(): channel for channel in self.channels}
        return added, removed

    def unsubscribed(self, message: str) -> list[str]:
        """Take an ``unsubscribed to: ...`` message; return the leaving channels it answers."""
        head, _, rest = message.strip().partition(":")
        if (head + ":").casefold() != _UNSUBSCRIBED:
            return []
        names = {part.strip().casefold() for part in rest.split(",")}
        answered = [channel for channel in self.leaving if channel.casefold() in names]
        for channel in answered:
            self.leaving.remove(channel)
        return answered

    def confirm(self, message: str) -> list[str]:
        """Take a ``success`` status's message; return the channels it confirms, newly.

        ``subscribed to: T.*`` or ``subscribed to: t.*, Q.AAPL``; a message that names no
        channel of ours confirms nothing.
        """
        text = message.strip()
        head, _, rest = text.partition(":")
        if (head + ":").casefold() != _CONFIRMED:
            return []
        confirmed = []
        for part in rest.split(","):
            channel = self._by_key.get(part.strip().casefold())
            if channel is not None and channel in self.pending:
                self.pending.remove(channel)
                self.confirmed.append(channel)
                confirmed.append(channel)
        return confirmed

    def refuse(self, message: str) -> str | None:
        """Take an ``error`` status's message; return the channel it refuses, or None.

        The channel is the one the message names (whatever its case); if it names none and one
        channel alone is still pending, that one.
        """
        folded = message.casefold()
        named = [c for c in self.channels if c.casefold() in folded and c not in self.refused]
        if named:
            channel = max(named, key=len)  # "T.AAPL" rather than "T.A" when both are ours
        elif len(self.pending) == 1:
            channel = self.pending[0]
        else:
            return None
        if channel in self.pending:
            self.pending.remove(channel)
        if channel in self.confirmed:
            self.confirmed.remove(channel)
        self.refused[channel] = message
        return channel
