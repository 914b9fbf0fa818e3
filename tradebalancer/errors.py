"""The exception tree of tradebalancer, and the process exit codes it maps to.

Every error the package raises on purpose derives from one root, so the service loop and the
command line can tell "our" failures (a message for the user) from bugs (a traceback)::

    TradeBalancerError
     +-- ConfigError        the TOML file, the worker template                    -> exit 78
     |    +-- UsageError    a command-line option (replay's --port, --rate, ...)  -> exit 64
     +-- FeedError          the feed broke its protocol or refused us
     |    +-- AuthError     the API key was refused                               -> exit 77
     |    +-- FrameError    a data frame that is not a JSON array of objects      -> dropped
     +-- TransportError     TCP, TLS and kernel TLS                               -> reconnect
     |    +-- KernelTLSUnavailable  tls = "kernel" but the kernel can't take it   -> exit 69
     +-- KeyIsolationUnavailable  key_isolation = "required", no namespaces here -> exit 69
     +-- WorkerError        pipes and worker processes                            -> exit 71
     +-- ControlError       status, reload: the instance cannot be asked          -> exit 69

The worker library (tradebalancer.reader) has a tree of its own, ReaderError and its
ProtocolError: it imports nothing from the daemon, this module included.

Errors are translated at the boundary (``raise TransportError(...) from exc``), carry their
fields, and build the message in ``__str__``: what is wrong, then what to do.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Process exit codes, from sysexits.h where one fits; the systemd unit relies on them."""

    OK = 0
    FAILURE = 1  # a bug: logged with its traceback
    USAGE = 64  # EX_USAGE: bad command line
    UNAVAILABLE = 69  # EX_UNAVAILABLE: kernel TLS or the workers' namespaces required, missing
    OSERR = 71  # EX_OSERR: pipes or workers could not be set up
    UNDELIVERED = 75  # EX_TEMPFAIL: stopped, with events the workers did not take (logged)
    NOPERM = 77  # EX_NOPERM: the feed refused the API key (auth_failed)
    CONFIG = 78  # EX_CONFIG: the configuration is invalid or the API key is missing


class TradeBalancerError(Exception):
    """The root of every error tradebalancer raises on purpose."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(TradeBalancerError):
    """A configuration value is wrong: names the key path, what was expected and what was found."""

    exit_code = ExitCode.CONFIG

    def __init__(self, key_path: str, message: str) -> None:
        super().__init__(key_path, message)
        self.key_path = key_path
        self.message = message

    def __str__(self) -> str:
        if not self.key_path:
            return self.message
        return f"{self.key_path}: {self.message}"


class UsageError(ConfigError):
    """A command-line option is wrong: names the option, what was expected and what was found."""

    exit_code = ExitCode.USAGE


class FeedError(TradeBalancerError):
    """The feed sent something the protocol does not allow, or closed on us."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


EXCERPT_BYTES = 200  # how much of a peer's bad input an error carries for the log, never more


class FrameError(FeedError):
    """A data frame that is not a JSON array of objects: none of it was routed (split.py)."""

    def __init__(self, reason: str, frame: bytes, kind: str = "invalid_json") -> None:
        excerpt = bytes(frame[:EXCERPT_BYTES])
        super().__init__(reason)
        self.reason = reason
        self.kind = kind  # a label for the metrics: invalid_json, not_an_array, not_an_object
        self.excerpt = excerpt
        self.size = len(frame)

    def __str__(self) -> str:
        return f"dropped a {self.size}-byte frame, {self.reason}; it began {self.excerpt!r}"


class AuthError(FeedError):
    """The feed answered auth_failed: retrying with the same key cannot help."""

    exit_code = ExitCode.NOPERM


class TransportError(TradeBalancerError):
    """Connecting, the TLS handshake, or the connection itself failed."""

    def __init__(self, address: str, message: str) -> None:
        super().__init__(address, message)
        self.address = address
        self.message = message

    def __str__(self) -> str:
        return f"{self.address}: {self.message}"


class KernelTLSUnavailable(TransportError):
    """tls = "kernel" was asked for and this kernel or session cannot do it."""

    exit_code = ExitCode.UNAVAILABLE


class KeyIsolationUnavailable(TradeBalancerError):
    """key_isolation = "required" and this kernel gives the workers no namespace of their own."""

    exit_code = ExitCode.UNAVAILABLE


class ControlError(TradeBalancerError):
    """``status`` or ``reload`` could not ask the instance: not running, not ours to ask, or an
    answer this version cannot read."""

    exit_code = ExitCode.UNAVAILABLE


class WorkerError(TradeBalancerError):
    """A pipe could not be created or sized, or a worker could not be spawned."""

    exit_code = ExitCode.OSERR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
