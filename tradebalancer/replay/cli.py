"""``tradebalancer replay`` and ``python -m tradebalancer.replay``: the replay feed's command line.

Owns the options' command-line form, their checks (a bad value is a usage error, exit 64) and
running the server until SIGINT or SIGTERM, or until the stream is over.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from ..errors import ConfigError, ExitCode, TradeBalancerError
from . import server as server_module
from .options import ReplayOptions
from .server import ReplayServer
from .stream import record

logger = logging.getLogger(__name__)


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the replay feed's options to ``parser`` (``tradebalancer replay``) and return it."""
    d = ReplayOptions()
    add = parser.add_argument
    add("--host", default=d.host, help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=9943, help="port, 0 for any free one (default: %(default)s)")
    add("--certfile", metavar="PEM", help="certificate chain: serve wss:// (TLS 1.2 and 1.3)")
    add("--keyfile", metavar="PEM", help="its private key (default: in the certificate file)")
    add("--accept-key", action="append", default=[], metavar="KEY", help=_ACCEPT_KEY_HELP)
    add("--source", metavar="FILE", help="a recording to serve (default: synthetic trades)")
    add("--rate", type=float, metavar="N", help="events per second (default: as fast as read)")
    add("--events", type=int, metavar="N", help="end the stream after N events (default: never)")
    add("--loop", action="store_true", help="start the recording again at its end")
    add("--ping-interval", type=float, default=d.ping_interval, metavar="S", help=_PING_HELP)
    add("--seed", type=int, default=d.seed, metavar="N", help="synthetic: the random seed")
    add("--symbols", type=int, default=d.symbols, metavar="N", help="synthetic: symbol count")
    add(
        "--min-batch",
        type=int,
        default=d.min_batch,
        metavar="N",
        help="synthetic: fewest events a frame",
    )
    add(
        "--max-batch",
        type=int,
        default=d.max_batch,
        metavar="N",
        help="synthetic: most events a frame",
    )
    add("--disconnect-after", type=int, metavar="N", help=_DISCONNECT_HELP)
    add("--timestamps", action="store_true", help=_TIMESTAMPS_HELP)
    add("--fragment", action="store_true", help="send each message as three frames")
    add("--binary", action="store_true", help="send data messages as binary frames")
    add("--record-to", metavar="FILE", help=_RECORD_HELP)
    return parser


_ACCEPT_KEY_HELP = "an API key to accept; repeatable (default: any non-empty key)"
_PING_HELP = "seconds between websocket pings, 0 for none (default: %(default)s)"
_DISCONNECT_HELP = "cut the first connection mid-frame after about N events (reconnect tests)"
_TIMESTAMPS_HELP = 'end each frame\'s last event with "lt": CLOCK_MONOTONIC ns (use with --rate)'
_RECORD_HELP = (
    "write the source (default: 100,000 synthetic trades) to a recording and exit; "
    "gzip if FILE ends in .gz"
)


def options_from(args: argparse.Namespace) -> ReplayOptions:
    """Return the ReplayOptions the parsed command line asks for."""
    for name in ("rate", "events", "disconnect_after"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')}", f"must be positive, got {value}")
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
        fragment=args.fragment,
        binary=args.binary,
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM, or until the stream is over; or write a recording."""
    options = options_from(args)
    if args.record_to:
        return record(options, args.record_to)
    server = ReplayServer(options)
    server.start()
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
    parser = build_parser(argparse.ArgumentParser(prog="tradebalancer replay", description=summary))
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
