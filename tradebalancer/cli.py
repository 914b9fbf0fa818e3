"""The command line: arguments in, exit codes out. Holds no logic of its own.

    tradebalancer [--config FILE] check-config [--require-key] [NAME ...]
    tradebalancer [--config FILE] run NAME
    tradebalancer [--config FILE] status NAME [--watch] [--interval S] [--json]
    tradebalancer [--config FILE] reload NAME
    tradebalancer replay [...]            the local replay feed (see ``replay --help``)

Exit codes (documented in README and the man page; the systemd unit depends on them):
0 ok, 1 bug, 64 usage, 69 kernel TLS or key isolation required but unavailable (status and
reload: the instance is not running or cannot be asked), 71 pipes/workers could not be set up,
75 stopped with events no worker read, 77 the feed refused the API key, 78 configuration error
or no API key (reload: refused, the running configuration stays).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from typing import NoReturn

import orjson

from . import (
    __version__,
    config,
    control,
    credentials,
    keyguard,
    plan,
    preflight,
    signals,
    statusview,
    units,
    values,
)
from .errors import ConfigError, ExitCode, TradeBalancerError
from .replay import cli as replay_cli
from .routing import balance_warning
from .systemd import Notifier, configure_logging

logger = logging.getLogger("tradebalancer")

_EPILOG = """\
exit codes: 0 ok, 1 internal error, 64 usage,
69 kernel TLS or key isolation required but unavailable (status, reload: the
instance is not running or cannot be asked),
71 pipes or workers could not be set up, 75 stopped with events no worker read,
77 the feed refused the API key, 78 configuration error or no API key (reload: the
reload was refused and the running configuration stays).

The configuration file is %(default)s unless --config or TRADEBALANCER_CONFIG says otherwise.
"""


class _Parser(argparse.ArgumentParser):
    """argparse, exiting with EX_USAGE (64) on a bad command line as the man page says."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(int(ExitCode.USAGE), f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every command."""
    default_config = os.environ.get("TRADEBALANCER_CONFIG", str(config.DEFAULT_PATH))
    parser = _Parser(
        prog="tradebalancer",
        description=(
            "Load-balance the Massive (Polygon.io) real-time websocket feed by symbol over "
            "pipes to worker processes."
        ),
        epilog=_EPILOG % {"default": default_config},
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=default_config,
        help=f"the configuration file (default: {default_config})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # --config and -v also after the command (`run feed --config x.toml`), as users type them
    common = _Parser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help=f"the configuration file (default: {default_config})",
    )
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log at DEBUG level"
    )

    check = commands.add_parser(
        "check-config",
        parents=[common],
        help="validate the configuration file (exit 0, or 78 with the reason)",
        description=(
            "Validate the configuration: every key, and every worker command template rendered "
            "for every worker. With --require-key, also check that the API key can be found "
            "(the systemd unit runs this before starting the service)."
        ),
    )
    check.add_argument("names", nargs="*", metavar="NAME", help="feeds to check (default: all)")
    check.add_argument(
        "--require-key", action="store_true", help="fail (78) if the API key cannot be found"
    )

    run = commands.add_parser(
        "run",
        parents=[common],
        help="run one feed instance (what tradebalancer@NAME.service runs)",
        description=(
            "Connect to the feed of [feeds.NAME], start its workers, and forward every event "
            "to its pipe until SIGTERM or SIGINT."
        ),
    )
    run.add_argument("name", metavar="NAME", help="the feed instance: a [feeds.NAME] table")

    status = commands.add_parser(
        "status",
        parents=[common],
        help="show a running instance: state, rates, delay, pipes and workers",
        description=(
            "Ask a running instance over its control socket (no metrics listener needed) and "
            "show its state, URL, TLS path, rates, the delay behind the market, and each pipe "
            "and worker. Rates are over --interval seconds."
        ),
    )
    status.add_argument("name", metavar="NAME", help="the feed instance")
    status.add_argument("-w", "--watch", action="store_true", help="refresh until Ctrl-C")
    status.add_argument(
        "-n", "--interval", type=_seconds, default=1.0, help="seconds between views (default 1)"
    )
    status.add_argument("--json", action="store_true", help="print the raw snapshot once")
    status.add_argument("--socket", metavar="PATH", help="the control socket (default: found)")

    reload_parser = commands.add_parser(
        "reload",
        parents=[common],
        help="make a running instance read its configuration again (systemctl reload)",
        description=(
            "Ask a running instance to read the configuration file again and apply it: "
            "subscriptions change on the live connection; a change that needs a restart, or "
            "an invalid file, is refused (exit 78) and the instance runs on unchanged."
        ),
    )
    reload_parser.add_argument("name", metavar="NAME", help="the feed instance")
    reload_parser.add_argument("--socket", metavar="PATH", help="the control socket")

    replay_parser = commands.add_parser(
        "replay",
        help="serve a local replay feed (recorded or synthetic) for demos and tests",
        description="Serve a local stand-in for the feed, recorded or synthetic: demos, tests.",
    )
    replay_cli.build_parser(replay_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tradebalancer`` command; returns the exit code."""
    handled = signals.install()  # already done by ``python -m tradebalancer``; idempotent
    # First: run and check-config --require-key read the key, and the environment may hold it.
    keyguard.seal()
    try:
        args = build_parser().parse_args(argv)
        configure_logging(verbose=args.verbose)
        if args.command != "run":
            handled.release()  # re-raises a signal that came meanwhile, as if never handled
        if args.command == "check-config":
            return check_config(args.config, args.names, require_key=args.require_key)
        if args.command == "run":
            return run(args.config, args.name)
        if args.command in ("status", "reload"):
            return ask(args)
        return int(replay_cli.run(args))
    except TradeBalancerError as exc:
        sys.stderr.write(f"tradebalancer: {exc}\n")
        return int(exc.exit_code)
    except KeyboardInterrupt:
        return int(ExitCode.OK)
    finally:
        signals.uninstall()


def check_config(path: str, names: Sequence[str], *, require_key: bool) -> int:
    """Check the named feeds (all if none) as ``run`` would, without starting anything; print
    each one's summary or error. Exit 78 if any failed: each table is checked on its own, so
    one bad table is reported beside the good ones and never hides them."""
    loaded = config.load(path)
    names = list(names) or loaded.names
    if not names:
        raise ConfigError("feeds", f"{path} defines no [feeds.NAME] table; add one")
    failed: list[ConfigError] = []
    for name in names:
        try:
            _check_feed(loaded, loaded.feed(name), require_key=require_key)
        except ConfigError as exc:
            if len(names) == 1:
                raise
            sys.stdout.write(f"feeds.{name}: FAILED: {exc}\n")
            failed.append(exc)
    if failed:
        raise ConfigError(path, f"{len(failed)} of {len(names)} feeds failed the check (above)")
    return int(ExitCode.OK)


def _check_feed(loaded: config.Config, feed: config.FeedConfig, *, require_key: bool) -> None:
    try:
        credentials.resolve_api_key(feed, os.environ)
        key_source = credentials.describe_api_key_source(feed, os.environ)
    except ConfigError:
        if require_key:
            raise
        key_source = "not found here (the unit loads it as a credential)"
    environ = dict(os.environ)
    if feed.jetstream is not None and feed.jetstream.credentials_file and not require_key:
        # Not set outside the unit (LoadCredential=): the plan shows the path unexpanded.
        unset = values.unset_variables(feed.jetstream.credentials_file, environ)
        environ.update({name: f"${{{name}}}" for name in unset})
    plans = plan.plan_workers(feed, environ)
    preflight.check_plans(feed, plans)
    remote = preflight.check_jetstream(feed, os.environ, require_credentials=require_key)
    sys.stdout.write(
        f"feeds.{feed.name}: ok: {feed.url}, subscribe {','.join(feed.subscribe)}, "
        f"{units.count(feed.pipes, 'pipe')}, {units.count(feed.workers, 'worker')}, "
        f"TLS {feed.tls}, API key {key_source}\n"
    )
    if (warning := balance_warning(feed.pipes, config.MAX_PIPES)) is not None:
        sys.stdout.write(f"  warning: {warning}\n")
    for worker in plans:
        sys.stdout.write(f"  worker {worker.index}: {shlex.join(worker.argv)}\n")
    for line in [*preflight.describe_jetstream(feed), *remote]:
        sys.stdout.write(f"  {line}\n")
    for name in loaded.names:
        if name == feed.name:
            continue
        try:
            other = loaded.feed(name)
        except ConfigError:
            continue  # reported on its own
        if (clash := preflight.jetstream_clash(feed, other)) is not None:
            sys.stdout.write(f"  {clash}\n")
        if credentials.share_a_key(feed, other, os.environ):
            sys.stdout.write(
                f"  warning: feeds.{feed.name} and feeds.{other.name} connect to "
                f"{feed.url} with the same API key: the feed allows one connection per key "
                "and cluster, so they would take the stream from each other in turn "
                "(max_connections); give one of them a key of its own\n"
            )


def ask(args: argparse.Namespace) -> int:
    """``status`` and ``reload``: ask the running instance over its control socket."""
    path = args.socket or _control_socket(args.config, args.name)
    if args.command == "reload":
        status, body = statusview.ask(path, "POST", "/reload", args.name)
        (sys.stdout if status == 200 else sys.stderr).write(body.decode(errors="replace"))
        # 409: refused, the running configuration stays; anything else: not answered as asked
        codes = {200: ExitCode.OK, 409: ExitCode.CONFIG}
        return int(codes.get(status, ExitCode.UNAVAILABLE))
    if args.json:
        sys.stdout.write(orjson.dumps(statusview.fetch(path, args.name)).decode() + "\n")
        return int(ExitCode.OK)
    return statusview.watch(path, args.name, interval=args.interval, repeat=args.watch)


def _control_socket(path: str, name: str) -> str:
    """Where instance ``name`` listens: where the file says, or else where the service's own
    socket is, /run/tradebalancer/NAME/control (the file may be newer than the instance, or
    invalid; and a user who is not root is told to use sudo rather than "not running")."""
    setting = "auto"
    with contextlib.suppress(ConfigError):
        setting = config.load(path).feed(name).control_socket
    found = control.control_path(name, setting, os.environ)
    service = control.control_path(
        name, "auto", {"RUNTIME_DIRECTORY": f"/run/tradebalancer/{name}"}
    )
    if found is None or (not os.path.exists(found) and service and os.path.lexists(service)):
        found = service
    if found is None:
        raise ConfigError(f"feeds.{name}.control_socket", '"off": this instance has none')
    return found


def _seconds(text: str) -> float:
    value = float(text)
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"must be from 0.05 to 3600 seconds, got {text}")
    return value


def run(path: str, name: str) -> int:
    """Run feed ``name`` of the file at ``path`` until it stops; return the exit code."""
    from .service import Service

    feed = config.load(path).feed(name)
    api_key = credentials.resolve_api_key(feed, os.environ)
    preflight.check_plans(feed, plan.plan_workers(feed, os.environ))
    preflight.check_jetstream(feed, os.environ, require_credentials=True)
    logger.info(
        "tradebalancer %s starting feed %s: %s, API key from %s",
        __version__,
        name,
        feed.url,
        credentials.describe_api_key_source(feed, os.environ),
    )
    service = Service(
        feed,
        api_key,
        notifier=Notifier(),
        signals=signals.install(),
        key_file=credentials.api_key_file(feed, os.environ),
        config_path=os.path.abspath(path),
    )
    return service.run()
