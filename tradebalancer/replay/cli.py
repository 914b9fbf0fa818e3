"""``tradebalancer replay`` and ``python -m tradebalancer.replay``: the replay feed's command line.

Owns the options' command-line form, their checks and running the server until SIGINT or
SIGTERM, or until the stream is over.

A bad option is a usage error: one line on stderr naming the option, what it must be and what
to do, and exit 64 (EX_USAGE), as with ``tradebalancer``'s own command line. That includes what
only the server finds out (a certificate that does not load, a recording that does not parse,
an address it cannot listen on, a port already in use): its ConfigError names the
``ReplayOptions`` field (or the recording's file and line), and ``run`` raises it again as a
UsageError naming the option. The address is the user's choice, so a port in use is a usage
error too: the remedy is another ``--port``, not a restart.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import signal
import sys
import threading
from collections.abc import Sequence
from typing import NoReturn

from ..errors import ConfigError, ExitCode, TradeBalancerError, UsageError
from . import server as server_module
from .options import ReplayOptions
from .server import ReplayServer
from .stream import record

logger = logging.getLogger(__name__)

# Synthetic symbols are unique names of 1 to 5 letters, drawn at random: 100,000 take 0.4 s,
# a million 15 s, and the name space runs out near 12 million (the draw would never end). US
# exchanges list about 12,000.
MAX_SYMBOLS = 100_000
# About 110 bytes a trade: 100,000 make an 11 MB message, under the 16 MiB a client of the
# service accepts by default (max_message_size).
MAX_BATCH = 100_000


class _Parser(argparse.ArgumentParser):
    """argparse, exiting with EX_USAGE (64) on a bad command line, as ``tradebalancer`` does."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.USAGE), f"{self.prog}: error: {message}\n")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the replay feed's options to ``parser`` (``tradebalancer replay``) and return it."""
    d = ReplayOptions()
    add = parser.add_argument
    add("--host", default=d.host, help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=9943, help=_PORT_HELP)
    add("--certfile", metavar="PEM", help="certificate chain: serve wss:// (TLS 1.2 and 1.3)")
    add("--keyfile", metavar="PEM", help="its private key (default: in the certificate file)")
    add("--accept-key", action="append", default=[], metavar="KEY", help=_ACCEPT_KEY_HELP)
    add("--source", metavar="FILE", help="a recording to serve (default: synthetic trades)")
    add("--rate", type=float, metavar="N", help="events per second (default: as fast as read)")
    add("--events", type=int, metavar="N", help="end the stream after N events (default: never)")
    add("--loop", action="store_true", help="start the recording again at its end")
    add("--ping-interval", type=float, default=d.ping_interval, metavar="S", help=_PING_HELP)
    add("--seed", type=int, default=d.seed, metavar="N", help="synthetic: the random seed")
    add("--symbols", type=int, default=d.symbols, metavar="N", help=_SYMBOLS_HELP)
    add("--min-batch", type=int, default=d.min_batch, metavar="N", help=_MIN_BATCH_HELP)
    add("--max-batch", type=int, default=d.max_batch, metavar="N", help=_MAX_BATCH_HELP)
    add("--disconnect-after", type=int, metavar="N", help=_DISCONNECT_HELP)
    add("--timestamps", action="store_true", help=_TIMESTAMPS_HELP)
    add("--delay", type=float, metavar="S", help=_DELAY_HELP)
    add("--fragment", action="store_true", help="send each message as three frames")
    add("--binary", action="store_true", help="send data messages as binary frames")
    add("--record-to", metavar="FILE", help=_RECORD_HELP)
    return parser


_PORT_HELP = "port, 0 to 65535, 0 for any free one (default: %(default)s)"
_ACCEPT_KEY_HELP = "an API key to accept; repeatable (default: any non-empty key)"
_SYMBOLS_HELP = f"synthetic: symbol count, 1 to {MAX_SYMBOLS} (default: %(default)s)"
_MIN_BATCH_HELP = "synthetic: fewest events a frame, from 1 (default: %(default)s)"
_MAX_BATCH_HELP = f"synthetic: most events a frame, up to {MAX_BATCH} (default: %(default)s)"
_PING_HELP = "seconds between websocket pings, 0 for none (default: %(default)s)"
_DISCONNECT_HELP = "cut the first connection mid-frame after about N events (reconnect tests)"
_TIMESTAMPS_HELP = 'end each frame\'s last event with "lt": CLOCK_MONOTONIC ns (use with --rate)'
_DELAY_HELP = (
    'set each frame\'s last "t" to the wall clock minus S seconds, as a feed S seconds behind '
    "the market (default: the recorded timestamps)"
)
_RECORD_HELP = (
    "write the source (default: 100,000 synthetic trades) to a recording and exit; "
    "gzip if FILE ends in .gz"
)


def options_from(args: argparse.Namespace) -> ReplayOptions:
    """Return the ReplayOptions the parsed command line asks for; UsageError if one is wrong."""
    check(args)
    return ReplayOptions(
        host=args.host,
        port=args.port,
        certfile=args.certfile,
        keyfile=args.keyfile,
        accept_keys=frozenset(args.accept_key),
        source=args.source,
        rate=args.rate,
        events=args.events,
        loop=args.loop,
        ping_interval=args.ping_interval or None,
        seed=args.seed,
        symbols=args.symbols,
        min_batch=args.min_batch,
        max_batch=args.max_batch,
        disconnect_after=args.disconnect_after,
        timestamps=args.timestamps,
        delay=args.delay,
        fragment=args.fragment,
        binary=args.binary,
    )


def check(args: argparse.Namespace) -> None:
    """Raise UsageError for the first option out of its range or missing what it needs.

    The server checks the rest when it starts: the host, the port, the files' contents.
    """
    if args.rate is not None and not (math.isfinite(args.rate) and args.rate > 0):
        _refuse("--rate", "must be a positive number of events per second", args.rate)
    if args.delay is not None and not (math.isfinite(args.delay) and args.delay >= 0):
        _refuse("--delay", "must be a number of seconds, 0 or more", args.delay)
    for name in ("events", "disconnect_after"):
        if (value := getattr(args, name)) is not None and value < 1:
            _refuse(f"--{name.replace('_', '-')}", "must be a positive integer", value)
    if not (math.isfinite(args.ping_interval) and args.ping_interval >= 0):
        _refuse(
            "--ping-interval", "must be a number of seconds, 0 for no pings", args.ping_interval
        )
    if not 1 <= args.symbols <= MAX_SYMBOLS:
        _refuse("--symbols", f"must be an integer from 1 to {MAX_SYMBOLS}", args.symbols)
    if not 1 <= args.min_batch <= MAX_BATCH:
        _refuse("--min-batch", f"must be an integer from 1 to {MAX_BATCH}", args.min_batch)
    if not args.min_batch <= args.max_batch <= MAX_BATCH:
        what = f"must be an integer from --min-batch ({args.min_batch}) to {MAX_BATCH}"
        _refuse("--max-batch", what, args.max_batch)
    for key in args.accept_key:
        if not key.strip() or key != key.strip():
            raise UsageError(
                "--accept-key",
                f"{key!r}: a key must not be empty or begin or end with white space; give the "
                "key clients send, or leave --accept-key out to accept any non-empty key",
            )
    if args.keyfile is not None and args.certfile is None:
        raise UsageError(
            "--keyfile",
            "needs --certfile, the certificate the key goes with; add --certfile PEM to serve "
            "wss://, or leave both out to serve ws://",
        )
    _check_readable("--certfile", args.certfile, "a PEM certificate chain")
    _check_readable("--keyfile", args.keyfile, "the certificate's PEM private key")
    _check_readable("--source", args.source, "a recording (one JSON array of events a line)")


def _refuse(option: str, what: str, value: object) -> NoReturn:
    """Raise the UsageError of an option whose value is out of its range."""
    raise UsageError(option, f"{what}, got {value}")


def _check_readable(option: str, path: str | None, what: str) -> None:
    """Raise UsageError unless ``path`` is None or a file this process can read."""
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UsageError(option, f"cannot read {path} ({exc.strerror}); give {what}") from exc


# The option of each ReplayOptions field, for the ConfigErrors the server raises.
_OPTIONS = {
    field.name: f"--{field.name.replace('_', '-')}" for field in dataclasses.fields(ReplayOptions)
}


def _usage_error(exc: ConfigError) -> UsageError:
    """The server's or the recording's ConfigError as a usage error naming the option."""
    return UsageError(_OPTIONS.get(exc.key_path, exc.key_path), exc.message)


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, or until the stream is over; or write a recording."""
    options = options_from(args)
    try:
        if args.record_to:
            return record(options, args.record_to)
        server = ReplayServer(options)
        server.start()
    except ConfigError as exc:
        raise _usage_error(exc) from exc
    # The URL on stdout, alone on its line, for scripts that asked for port 0.
    sys.stdout.write(server.url + "\n")
    sys.stdout.flush()
    stopping = threading.Event()
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: stopping.set()) if in_main else None
    try:
        while not stopping.is_set() and not server.finished.is_set():
            stopping.wait(0.25)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    logger.info(
        "replay feed stopped: %d connections, %d events in %d frames",
        server.stats.connections,
        server.stats.events_sent,
        server.stats.frames_sent,
    )
    return int(ExitCode.FAILURE if server.error else ExitCode.OK)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m tradebalancer.replay``: the same as ``tradebalancer replay``."""
    summary = (server_module.__doc__ or "").split("\n\n")[0]
    parser = build_parser(_Parser(prog="tradebalancer replay", description=summary))
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return run(args)
    except TradeBalancerError as exc:
        sys.stderr.write(f"tradebalancer replay: {exc}\n")
        return int(exc.exit_code)


if __name__ == "__main__":
    sys.exit(main())
