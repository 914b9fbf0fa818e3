"""The feed's handshake as data: the phases, what a status means, and the transition table.

Owns the rules of the conversation's handshake, and nothing that runs it (feed.py does):

* ``Phase``: where a conversation stands;
* ``meaning``: what a status event means, by meaning rather than exact text (the greeting may
  say ``connected`` or ``success``, the auth reply ``auth_success``, ``authenticated`` or
  ``success``);
* ``HANDSHAKE``: (phase, meaning) -> (action, next phase), looked up for the phase, then for
  ``ANY``; ``transition`` does the lookup, and a meaning found under neither is only noted.

The feed's tests are driven by the same table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["ANY", "AWAITED", "HANDSHAKE", "Action", "Meaning", "Phase", "meaning", "transition"]


class Phase(enum.Enum):
    """Where the conversation with the feed stands."""

    UPGRADING = "upgrading"  # HTTP upgrade sent, waiting for 101
    CONNECTING = "connecting"  # websocket open, waiting for the "connected" status
    AUTHENTICATING = "authenticating"  # auth sent, waiting for auth_success
    SUBSCRIBING = "subscribing"  # subscribe sent, waiting for one success per param
    STREAMING = "streaming"  # every subscription confirmed
    CLOSED = "closed"  # over: see Feed.outcome()


class Meaning(enum.Enum):
    """What a status event means, whatever words the feed chose."""

    GREETING = "the greeting"  # "connected"; "success" before auth
    AUTH_OK = "the key accepted"  # "auth_success", "authenticated", "success": "authenticated"
    AUTH_FAILED = "the key refused"  # "auth_failed"
    CONFIRMED = "a subscription confirmed"  # "success": "subscribed to: ..."
    UNSUBSCRIBED = "an unsubscription confirmed"  # "success": "unsubscribed to: ..."
    ERROR = "an error"  # "error"
    MAX_CONNECTIONS = "another client took the stream"  # "max_connections"
    AUTH_TIMEOUT = "auth came too late"  # "auth_timeout"
    OTHER = "anything else"


def meaning(phase: Phase, status: object, message: str) -> Meaning:
    """What ``status`` (with ``message``) means in ``phase``."""
    if status == "success":
        if phase is Phase.CONNECTING:
            return Meaning.GREETING
        if phase is Phase.AUTHENTICATING or message.strip().casefold() == "authenticated":
            return Meaning.AUTH_OK
        if message.strip().casefold().startswith("subscribed to"):
            return Meaning.CONFIRMED
        if message.strip().casefold().startswith("unsubscribed to"):
            return Meaning.UNSUBSCRIBED
        return Meaning.OTHER
    return _MEANINGS.get(status if isinstance(status, str) else "", Meaning.OTHER)


_MEANINGS = {
    "connected": Meaning.GREETING,
    "auth_success": Meaning.AUTH_OK,
    "authenticated": Meaning.AUTH_OK,
    "auth_failed": Meaning.AUTH_FAILED,
    "error": Meaning.ERROR,
    "max_connections": Meaning.MAX_CONNECTIONS,
    "auth_timeout": Meaning.AUTH_TIMEOUT,
}


class Action(enum.Enum):
    """What a status makes the feed do."""

    AUTHENTICATE = "send the auth message"
    SUBSCRIBE = "send the subscribe message"
    CONFIRM = "note the channels confirmed; stream once all are answered"
    UNSUBSCRIBED = "note the channels left (a reload removed them)"
    REFUSE_CHANNEL = "note the channel refused, log it; the others go on"
    REFUSE_KEY = "close: the API key was refused (no retry)"
    COOL_DOWN = "close: another client took the stream over (wait long)"
    FAIL = "close with the feed's message"
    NOTE = "log it once at INFO, change nothing"


ANY = None  # a HANDSHAKE row for every phase

# The feed's handshake. Looked up with the phase first, then with ANY; a meaning found under
# neither is noted (Action.NOTE) and changes nothing.
HANDSHAKE: Mapping[tuple[Phase | None, Meaning], tuple[Action, Phase]] = MappingProxyType(
    {
        (Phase.CONNECTING, Meaning.GREETING): (Action.AUTHENTICATE, Phase.AUTHENTICATING),
        (Phase.AUTHENTICATING, Meaning.AUTH_OK): (Action.SUBSCRIBE, Phase.SUBSCRIBING),
        (Phase.SUBSCRIBING, Meaning.CONFIRMED): (Action.CONFIRM, Phase.SUBSCRIBING),
        (Phase.STREAMING, Meaning.CONFIRMED): (Action.CONFIRM, Phase.STREAMING),
        (Phase.SUBSCRIBING, Meaning.UNSUBSCRIBED): (Action.UNSUBSCRIBED, Phase.SUBSCRIBING),
        (Phase.STREAMING, Meaning.UNSUBSCRIBED): (Action.UNSUBSCRIBED, Phase.STREAMING),
        (Phase.SUBSCRIBING, Meaning.ERROR): (Action.REFUSE_CHANNEL, Phase.SUBSCRIBING),
        (Phase.STREAMING, Meaning.ERROR): (Action.REFUSE_CHANNEL, Phase.STREAMING),
        (ANY, Meaning.ERROR): (Action.FAIL, Phase.CLOSED),
        (ANY, Meaning.AUTH_FAILED): (Action.REFUSE_KEY, Phase.CLOSED),
        (ANY, Meaning.MAX_CONNECTIONS): (Action.COOL_DOWN, Phase.CLOSED),
        (ANY, Meaning.AUTH_TIMEOUT): (Action.FAIL, Phase.CLOSED),
    }
)


def transition(phase: Phase, meant: Meaning) -> tuple[Action, Phase]:
    """Look ``meant`` up in HANDSHAKE for ``phase``: the action and the next phase."""
    found = HANDSHAKE.get((phase, meant)) or HANDSHAKE.get((ANY, meant))
    return found if found is not None else (Action.NOTE, phase)


# What each step of the handshake waits for, for the log when it does not come.
AWAITED = {
    Phase.UPGRADING: "the answer to the websocket upgrade (HTTP 101)",
    Phase.CONNECTING: 'the feed\'s greeting ("connected")',
    Phase.AUTHENTICATING: "the answer to auth",
    Phase.SUBSCRIBING: "a subscription's confirmation, or data,",
}
