"""The configuration file: TOML in, frozen dataclasses out, or a ConfigError naming the key.

Owns the meaning of every key of ``/etc/tradebalancer.toml`` (``etc/tradebalancer.toml`` in
the source tree documents each one), its default and its validation. Reads the configuration
file and nothing else but ``ca_file``, which it parses as ``run`` will; the API key file is read
by ``credentials``. Relative paths (``ca_file``, ``api_key_file``) are relative to the file.

The file holds one ``[feeds.NAME]`` table per feed instance (``tradebalancer@NAME`` under
systemd) and an optional ``[defaults]`` table whose keys every feed inherits unless it sets
them itself; sub-tables (``reconnect``, ``worker_restart``, ``route_keys``) merge key by key.
Every error names the key path where the value was written ("feeds.stocks.pipes",
"defaults.reconnect.max"), what was expected and what was found. Unknown keys are errors, with
the nearest known key suggested: a misspelt key silently falling back to its default is the
worst kind of configuration bug. An API key written in the file is refused with a message
that says where the key belongs, and never repeats it.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from types import MappingProxyType
from typing import Literal
from urllib.parse import urlsplit

from .address import Address
from .command import CommandTemplate, compile_command
from .errors import ConfigError
from .routing import DEFAULT_ROUTE_KEYS
from .values import (
    Reader,
    Values,
    as_address,
    as_string,
    as_table,
    check_ca_file,
    check_variables,
    describe,
    unknown_key,
    valid_host,
)

DEFAULT_PATH = Path("/etc/tradebalancer.toml")
DEFAULT_URL = "wss://socket.massive.com/stocks"
DEFAULT_API_KEY_FILE = "${CREDENTIALS_DIRECTORY}/api-key"
DEFAULT_API_KEY_ENV = ("MASSIVE_API_KEY", "POLYGON_API_KEY")
MAX_PIPES = 4096
# Odd: with a power of two the C original's mapping spreads short tickers badly (routing.py).
DEFAULT_PIPES = 15

DEFAULT_ROUTE_KEY = "sym"

_FEED_NAME = re.compile(r"[A-Za-z0-9_-]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_CHANNEL = re.compile(r"[^,\s]+")  # the subscribe message joins channels with commas
# apiKey=..., api_key=..., token=...: where the key would be logged with the URL
_SECRET_IN_QUERY = re.compile(r"[?&](api[-_]?key|apikey|key|token|secret|password)=", re.I)
_TOML_POSITION = re.compile(r"^(?P<reason>.*) \(at line (?P<line>\d+), column (?P<column>\d+)\)$")
_TLS_MODES: tuple[Literal["auto", "kernel", "user"], ...] = ("auto", "kernel", "user")
_PASS_FDS: tuple[Literal["append", "none"], ...] = ("append", "none")
_SCHEDULING: tuple[Literal["batch", "other"], ...] = ("batch", "other")
_ISOLATION: tuple[Literal["auto", "required", "off"], ...] = ("auto", "required", "off")
_STORAGE: tuple[Literal["file", "memory"], ...] = ("file", "memory")
_NATS_URL = re.compile(r"(nats|tls)://[^\s,/]+")
_STREAM_NAME = re.compile(r"[A-Za-z0-9_-]+")  # JetStream forbids . * > and spaces in a name
_SUBJECT = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


@dataclass(frozen=True)
class ReconnectConfig:
    """How the feed connection is retried: jittered exponential backoff, in seconds."""

    initial: float = 1.0
    max: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.5  # each delay is shortened by up to this fraction, at random
    healthy_after: float = 30.0  # the backoff starts over only after this long streaming
    max_connections_cooldown: float = 300.0  # the wait after a "max_connections" status


@dataclass(frozen=True)
class RestartConfig:
    """How a dead worker is respawned: exponential backoff, in seconds."""

    initial: float = 1.0
    max: float = 30.0


@dataclass(frozen=True)
class JetStreamConfig:
    """``[feeds.NAME.jetstream]``: the partitions published to NATS JetStream (bridge/)."""

    servers: tuple[str, ...]  # nats:// URLs of one cluster
    stream: str
    subject_prefix: str  # partition p is published to PREFIX.p
    partitions: tuple[int, ...]  # the pipe indexes served by the bridge, ascending
    credentials_file: str | None  # a NATS .creds file; ${VAR} expanded by plan.py
    storage: Literal["file", "memory"]
    replicas: int
    create: bool  # create the stream when it is missing (else: an error)
    max_batch_bytes: int
    publish_timeout: float


@dataclass(frozen=True)
class FeedConfig:
    """One ``[feeds.NAME]`` table, validated, with every default filled in."""

    name: str
    url: str
    host: str
    port: int
    path: str  # the request target: path and query
    secure: bool  # wss://
    subscribe: tuple[str, ...]
    api_key_file: str  # "" when disabled; ${VAR} still unexpanded
    api_key_env: tuple[str, ...]
    pipes: int
    pipe_size: int | Literal["max"]
    workers: int
    working_directory: str | None  # None: $STATE_DIRECTORY if set, else "."
    command: CommandTemplate
    pass_fds: Literal["append", "none"]
    worker_scheduling: Literal["batch", "other"]
    key_isolation: Literal["auto", "required", "off"]  # keyguard.py: the key file hidden
    tls: Literal["auto", "kernel", "user"]
    ca_file: str | None
    server_hostname: str | None
    connect_timeout: float
    handshake_timeout: float
    ping_interval: float
    ping_timeout: float
    max_message_size: int
    reconnect: ReconnectConfig
    worker_restart: RestartConfig
    backlog_limit: int
    batch_bytes: int
    stats_interval: float
    delay_warning: float  # seconds behind the feed's timestamps (delay.py); 0: never warn
    delay_warning_after: float  # ... for this long before the warning
    metrics: Address | None  # the Prometheus listener (listener.py); None: none
    control_socket: str  # "auto" (control.py: the runtime directory), "off", or a path
    drain_timeout: float  # on stop: how long the pipes may take to drain into the workers
    route_keys: Mapping[str, str]
    route_key_default: str
    jetstream: JetStreamConfig | None = None  # None: every partition on local pipes


# The keys a feed table may hold: every field but those derived from the name and the url.
_FEED_KEYS = frozenset(field.name for field in fields(FeedConfig)) - {
    *("name", "host", "port", "path", "secure")
}
_SUBTABLES: Mapping[str, frozenset[str] | None] = {
    "reconnect": frozenset(field.name for field in fields(ReconnectConfig)),
    "worker_restart": frozenset(field.name for field in fields(RestartConfig)),
    "route_keys": None,  # any event type
    "jetstream": frozenset(field.name for field in fields(JetStreamConfig)),
}


@dataclass(frozen=True)
class Config:
    """The whole file: its feeds' tables by name, each validated when it is asked for.

    One feed's mistakes never stop another: ``feed(NAME)`` checks that table (with
    ``[defaults]``) alone, so ``run b`` and ``check-config b`` work beside a broken
    ``[feeds.a]``, as one systemd instance must not fail for another's table. ``feeds``
    validates them all (``check-config`` with no name).
    """

    tables: Mapping[str, object]  # each [feeds.NAME] table, as written (checked when asked for)
    defaults: Mapping[str, object]
    path: str

    @property
    def names(self) -> list[str]:
        """The feed names the file defines, in its order."""
        return list(self.tables)

    @property
    def feeds(self) -> Mapping[str, FeedConfig]:
        """Every feed, validated; the first bad one raises its ConfigError."""
        return MappingProxyType({name: self.feed(name) for name in self.tables})

    def feed(self, name: str) -> FeedConfig:
        """Return feed ``name``, validated; ConfigError naming the key, or listing the feeds
        the file defines if there is no such table."""
        if name not in self.tables:
            defined = ", ".join(sorted(self.tables)) or "none"
            raise ConfigError(
                f"feeds.{name}", f"no [feeds.{name}] table in {self.path}; defined feeds: {defined}"
            )
        if not _FEED_NAME.fullmatch(name):
            raise ConfigError(
                f"feeds.{name}",
                "a feed name must be letters, digits, _ and - (it names the systemd instance "
                f"tradebalancer@NAME), got {describe(name)}",
            )
        table = as_table(self.tables[name], f"feeds.{name}")
        return _feed(name, _collect(self.defaults, table, name), Path(self.path).parent)


def load(path: str | os.PathLike[str]) -> Config:
    """Read the file at ``path`` (see ``loads``); raise ConfigError saying what is wrong where."""
    where = os.fspath(path)
    try:
        text = Path(where).read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(
            where, "no such file; choose another with --config FILE or TRADEBALANCER_CONFIG=FILE"
        ) from None
    except OSError as exc:
        raise ConfigError(where, f"cannot read the file: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(where, f"not UTF-8 (TOML must be) at byte {exc.start}") from exc
    return loads(text, where)


def loads(text: str, path: str = "<string>") -> Config:
    """Parse the TOML ``text`` and check what every feed shares (the file's structure,
    ``[defaults]``); each feed's table is checked when asked for (``Config.feed``). ``path``
    names the file in messages and anchors relative paths."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_POSITION.match(str(exc))
        if match is None:  # "(at end of document)"
            raise ConfigError(path, f"invalid TOML at the end of the file: {exc}") from exc
        raise ConfigError(
            path,
            f"line {match['line']}, column {match['column']}: invalid TOML: {match['reason']}",
        ) from exc
    for key in document:
        if key not in ("feeds", "defaults"):
            raise unknown_key(key, key, ("feeds", "defaults"))
    defaults = as_table(document.get("defaults", {}), "defaults", "a table ([defaults])")
    feeds = as_table(document.get("feeds", {}), "feeds", "a table of [feeds.NAME] tables")
    _collect(defaults, {}, "")  # unknown keys in [defaults] are errors even with no feed
    return Config(MappingProxyType(feeds), MappingProxyType(defaults), path)


def _collect(defaults: Mapping[str, object], table: Mapping[str, object], name: str) -> Values:
    values: Values = {}
    for prefix, source in (("defaults", defaults), (f"feeds.{name}", table)):
        for key, value in source.items():
            path = f"{prefix}.{key}"
            if key not in _FEED_KEYS:
                raise unknown_key(path, key, _FEED_KEYS)
            if key not in _SUBTABLES:
                values[key] = (value, path)
                continue
            allowed = _SUBTABLES[key]
            for subkey, subvalue in as_table(value, path, f"a table ([{prefix}.{key}])").items():
                if allowed is not None and subkey not in allowed:
                    raise unknown_key(f"{path}.{subkey}", subkey, allowed)
                values[f"{key}.{subkey}"] = (subvalue, f"{path}.{subkey}")
    return values


def _feed(name: str, values: Values, base: Path) -> FeedConfig:
    read = Reader(name, values)
    url, host, port, target, secure = _url(*read.get("url", DEFAULT_URL))
    pipes = read.integer("pipes", DEFAULT_PIPES, 1, MAX_PIPES)
    tls = read.choice("tls", "auto", _TLS_MODES)
    if tls == "kernel" and not secure:
        raise ConfigError(read.path("tls"), f'"kernel" needs a wss:// url, got {url}')
    if "command" not in values:
        raise ConfigError(
            read.path("command"),
            'missing: the worker command is required, e.g. command = ["/usr/bin/worker"]',
        )
    command = compile_command(read.strings("command", []), read.path("command"))
    working_directory = read.optional("working_directory", variables=True)
    ca_file = read.optional("ca_file")
    if ca_file is not None:
        ca_file = str(base / ca_file)  # relative to the configuration file
        check_ca_file(ca_file, read.path("ca_file"))
    api_key_file = read.string("api_key_file", DEFAULT_API_KEY_FILE, variables=True)
    if api_key_file and not api_key_file.startswith(("/", "${")):
        api_key_file = str(base / api_key_file)  # relative to the configuration file, as ca_file
    route_keys = dict(DEFAULT_ROUTE_KEYS)
    for key, (value, path) in values.items():
        if key.startswith("route_keys."):
            route_keys[key.removeprefix("route_keys.")] = as_string(value, path, empty=False)
    backoff, restart = ReconnectConfig(), RestartConfig()  # the defaults
    reconnect = ReconnectConfig(
        initial=read.number("reconnect.initial", backoff.initial),
        max=read.number("reconnect.max", backoff.max),
        multiplier=read.number("reconnect.multiplier", backoff.multiplier, 1.0, strict=False),
        jitter=read.number("reconnect.jitter", backoff.jitter, strict=False, maximum=1.0),
        healthy_after=read.number("reconnect.healthy_after", backoff.healthy_after, strict=False),
        max_connections_cooldown=read.number(
            "reconnect.max_connections_cooldown", backoff.max_connections_cooldown, strict=False
        ),
    )
    worker_restart = RestartConfig(
        initial=read.number("worker_restart.initial", restart.initial),
        max=read.number("worker_restart.max", restart.max),
    )
    for table, policy in (("reconnect", reconnect), ("worker_restart", worker_restart)):
        if policy.max < policy.initial:
            raise ConfigError(
                read.path(f"{table}.max"),
                f"must be at least {table}.initial ({policy.initial:g}), got {policy.max:g}",
            )
    feed = FeedConfig(
        name=name,
        url=url,
        host=host,
        port=port,
        path=target,
        secure=secure,
        subscribe=tuple(
            read.strings(
                "subscribe", ["T.*"], _CHANNEL, "one channel like T.AAPL (no comma, no space)"
            )
        ),
        api_key_file=api_key_file,
        api_key_env=tuple(
            read.strings(
                "api_key_env",
                DEFAULT_API_KEY_ENV,
                _ENV_NAME,
                "an environment variable name",
                empty=True,
            )
        ),
        pipes=pipes,
        pipe_size=read.pipe_size(),
        workers=read.integer("workers", min(pipes, _cpu_count()), 1, pipes, " (pipes)"),
        working_directory=working_directory,
        command=command,
        pass_fds=read.choice("pass_fds", "append", _PASS_FDS),
        worker_scheduling=read.choice("worker_scheduling", "batch", _SCHEDULING),
        key_isolation=read.choice("key_isolation", "auto", _ISOLATION),
        tls=tls,
        ca_file=ca_file,
        server_hostname=read.optional("server_hostname"),
        connect_timeout=read.number("connect_timeout", 10.0),
        handshake_timeout=read.number("handshake_timeout", 10.0),
        ping_interval=read.number("ping_interval", 20.0),
        ping_timeout=read.number("ping_timeout", 20.0),
        max_message_size=read.integer("max_message_size", 16 << 20, 65536, None, " (bytes)"),
        reconnect=reconnect,
        worker_restart=worker_restart,
        backlog_limit=read.integer("backlog_limit", 32 << 20, 65536, None, " (bytes)"),
        batch_bytes=read.integer("batch_bytes", 1 << 20, 4096, 256 << 20, " (bytes)"),
        stats_interval=read.number("stats_interval", 5.0),
        delay_warning=read.number("delay_warning", 5.0, strict=False),
        delay_warning_after=read.number("delay_warning_after", 10.0, strict=False),
        metrics=as_address(*read.get("metrics", "")),
        control_socket=_control_socket(*read.get("control_socket", "auto")),
        drain_timeout=read.number("drain_timeout", 10.0, strict=False),
        route_keys=MappingProxyType(route_keys),
        route_key_default=read.string("route_key_default", DEFAULT_ROUTE_KEY, empty=False),
        jetstream=_jetstream(read, name, pipes, base),
    )
    return feed


def _jetstream(read: Reader, name: str, pipes: int, base: Path) -> JetStreamConfig | None:
    if not any(key.startswith("jetstream.") for key in read.values):
        return None
    if "jetstream.servers" not in read.values:
        raise ConfigError(
            read.path("jetstream.servers"),
            'missing: the NATS servers are required, e.g. servers = ["nats://10.0.0.5:4222"]',
        )
    servers = read.strings("jetstream.servers", [], _NATS_URL, "a URL like nats://host:4222")
    value, path = read.get("jetstream.partitions", "all")
    if value == "all":
        partitions = list(range(pipes))
    elif isinstance(value, list) and value:
        partitions = []
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < pipes:
                raise ConfigError(
                    f"{path}[{index}]",
                    f"must be a pipe index from 0 to {pipes - 1} (pipes = {pipes}), "
                    f"got {describe(item)}",
                )
            partitions.append(item)
        if len(set(partitions)) != len(partitions):
            raise ConfigError(path, f"lists a partition twice: {value}")
    else:
        raise ConfigError(
            path, f'must be "all" or a non-empty array of pipe indexes, got {describe(value)}'
        )
    credentials = read.optional("jetstream.credentials_file", variables=True)
    if credentials is not None and not credentials.startswith(("/", "${")):
        credentials = str(base / credentials)  # relative to the configuration file
    stream = read.string("jetstream.stream", f"tradebalancer-{name}", empty=False)
    if not _STREAM_NAME.fullmatch(stream):
        raise ConfigError(
            read.path("jetstream.stream"),
            f"must be letters, digits, _ and - (a JetStream stream name), got {describe(stream)}",
        )
    prefix = read.string("jetstream.subject_prefix", f"tradebalancer.{name}", empty=False)
    if not _SUBJECT.fullmatch(prefix):
        raise ConfigError(
            read.path("jetstream.subject_prefix"),
            f"must be dot-separated tokens of letters, digits, _ and - (no * or >), "
            f"got {describe(prefix)}",
        )
    create, create_path = read.get("jetstream.create", True)
    if not isinstance(create, bool):
        raise ConfigError(create_path, f"must be true or false, got {describe(create)}")
    return JetStreamConfig(
        servers=tuple(servers),
        stream=stream,
        subject_prefix=prefix,
        partitions=tuple(sorted(partitions)),
        credentials_file=credentials,
        storage=read.choice("jetstream.storage", "file", _STORAGE),
        replicas=read.integer("jetstream.replicas", 1, 1, 5),
        create=create,
        max_batch_bytes=read.integer(
            "jetstream.max_batch_bytes", 1 << 20, 4096, 64 << 20, " (bytes)"
        ),
        publish_timeout=read.number("jetstream.publish_timeout", 5.0),
    )


def _cpu_count() -> int:
    # The CPUs this process may run on (CPUAffinity=, cgroups' cpusets), not those of the host.
    return len(os.sched_getaffinity(0)) or os.cpu_count() or 1


def _url(value: object, path: str) -> tuple[str, str, int, str, bool]:
    url = as_string(value, path, empty=False)
    expected = f"must be a ws:// or wss:// URL like {DEFAULT_URL}, got {describe(url)}"
    if _SECRET_IN_QUERY.search(url):
        # Not echoed: the URL is logged, and this is where a key must never be.
        raise ConfigError(
            path,
            "must not carry the API key (apiKey=... in the query): the URL is logged and shown "
            "by check-config; put the key in the file api_key_file names, and the balancer "
            "sends it in the auth message",
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(path, f"{expected} ({exc})") from exc
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(path, expected + ("" if parts.hostname else " (no host)"))
    if parts.username is not None or parts.password is not None:
        # Not echoed: what sits there may be a secret. The API key goes in the auth message.
        raise ConfigError(path, "must not hold a user name or password (the URL is logged)")
    if parts.fragment:  # RFC 6455 section 3: fragments are meaningless in websocket URIs
        raise ConfigError(path, f"{expected} (no #fragment)")
    if port == 0:
        raise ConfigError(path, f"{expected} (port 0: give a port from 1 to 65535, or none)")
    if not valid_host(parts.hostname):
        raise ConfigError(
            path, f"{expected} (the host {parts.hostname!r} is neither a DNS name nor an address)"
        )
    secure = parts.scheme == "wss"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return url, parts.hostname, port or (443 if secure else 80), target, secure


def _control_socket(value: object, path: str) -> str:
    text = as_string(value, path, empty=False)
    check_variables(text, path)
    if text not in ("auto", "off") and not text.startswith(("/", "${")):
        raise ConfigError(path, f'must be "auto", "off" or an absolute path, got {text!r}')
    return text
