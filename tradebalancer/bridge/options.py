"""The bridge's command line: what plan.py renders and the bridge parses, and its exit codes.

Owns ``BridgeOptions`` (where to publish, which partitions its fds carry, the limits),
``parse_options`` and ``BridgeError``, whose exit code is the bridge's. Does no I/O.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["EX_CONFIG", "EX_NOPERM", "EX_OK", "EX_OSERR", "EX_PROTOCOL", "BridgeError",
           "BridgeOptions", "parse_options"]  # fmt: skip

EX_OK, EX_OSERR, EX_PROTOCOL, EX_NOPERM, EX_CONFIG = 0, 71, 76, 77, 78


class BridgeError(Exception):
    """The bridge cannot go on: the message says what is wrong and what to do."""

    def __init__(self, message: str, exit_code: int = EX_CONFIG) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class BridgeOptions:
    """The bridge's command line: where to publish and which partitions its fds carry."""

    servers: tuple[str, ...]
    stream: str
    subject_prefix: str
    partitions: tuple[int, ...]  # the pipe index of each fd, in fd order
    credentials: str | None = None
    storage: str = "file"
    replicas: int = 1
    create: bool = True
    max_batch_bytes: int = 1 << 20
    publish_timeout: float = 5.0

    def subject(self, partition: int) -> str:
        """The subject partition ``partition`` is published to."""
        return f"{self.subject_prefix}.{partition}"


def parse_options(argv: Sequence[str]) -> BridgeOptions:
    """The command line (see the module's docstring) -> BridgeOptions; exits 64 when bad."""
    parser = argparse.ArgumentParser(prog="python -m tradebalancer.bridge")
    parser.add_argument("--servers", required=True, help="comma-separated nats:// URLs")
    parser.add_argument("--stream", required=True)
    parser.add_argument("--subject-prefix", required=True)
    parser.add_argument("--partitions", required=True, help="the pipe index of each fd: 3,4")
    parser.add_argument("--credentials", default=None, help="a NATS .creds file")
    parser.add_argument("--storage", choices=("file", "memory"), default="file")
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--no-create", dest="create", action="store_false")
    parser.add_argument("--max-batch-bytes", type=int, default=1 << 20)
    parser.add_argument("--publish-timeout", type=float, default=5.0)
    parser.add_argument("fds", nargs="*", help="ignored: the fds come from TRADEBALANCER_FDS")
    args = parser.parse_args(argv)
    return BridgeOptions(
        servers=tuple(args.servers.split(",")),
        stream=args.stream,
        subject_prefix=args.subject_prefix,
        partitions=tuple(int(part) for part in args.partitions.split(",")),
        credentials=args.credentials,
        storage=args.storage,
        replicas=args.replicas,
        create=args.create,
        max_batch_bytes=args.max_batch_bytes,
        publish_timeout=args.publish_timeout,
    )
