"""The configuration: TOML to frozen dataclasses, errors naming the key."""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from pathlib import Path

import pytest
from tlsca import make_ca

from tradebalancer import config, credentials
from tradebalancer.config import FeedConfig
from tradebalancer.errors import ConfigError, ExitCode
from tradebalancer.plan import argv_for, pipes_for_worker, working_directory
from tradebalancer.routing import DEFAULT_ROUTE_KEYS
from tradebalancer.values import check_variables, expand_variables, unset_variables

SHIPPED = Path(__file__).resolve().parent.parent / "etc" / "tradebalancer.toml"
FEED = '[feeds.feed]\ncommand = ["worker"]\n'
SECRET = "Zq8-SECRET-api-key-77"


def load_feed(text: str, name: str = "feed") -> FeedConfig:
    """Load the TOML ``text`` and return its feed ``name``."""
    return config.loads(text).feed(name)


def load_error(text: str) -> ConfigError:
    """Load the TOML ``text`` and validate every feed, which must fail; return the error."""
    with pytest.raises(ConfigError) as caught:
        config.loads(text).feeds  # noqa: B018 - validating is the point
    assert str(caught.value) == f"{caught.value.key_path}: {caught.value.message}"
    assert caught.value.exit_code == ExitCode.CONFIG
    return caught.value


# (lines added to [feeds.feed], the key path, what is expected, what was found)
INVALID = [
    ("pipes = 0", "pipes", "an integer from 1 to 4096", "0"),
    ("pipes = 4097", "pipes", "an integer from 1 to 4096", "4097"),
    ("pipes = true", "pipes", "an integer from 1 to 4096", "true"),
    ('pipes = "16"', "pipes", "an integer from 1 to 4096", '"16"'),
    ("pipes = 1.5", "pipes", "an integer from 1 to 4096", "1.5"),
    (
        "pipe_size = 1000",
        "pipe_size",
        'an integer from 4096 to 2147483648 (bytes) or "max"',
        "1000",
    ),
    ('pipe_size = "huge"', "pipe_size", '(bytes) or "max"', '"huge"'),
    ("pipes = 4\nworkers = 5", "workers", "an integer from 1 to 4 (pipes)", "5"),
    ("workers = 0", "workers", "an integer from 1 to 15 (pipes)", "0"),
    ('url = "http://socket.massive.com/stocks"', "url", "a ws:// or wss:// URL", '"http://'),
    ('url = "wss:///stocks"', "url", "a ws:// or wss:// URL", '"wss:///stocks" (no host)'),
    ('url = "wss://h:99999/"', "url", "a ws:// or wss:// URL", '"wss://h:99999/" (Port out'),
    ('url = "wss://h/stocks#x"', "url", "a ws:// or wss:// URL", '"wss://h/stocks#x" (no #'),
    ('url = "ws://h:0/stocks"', "url", "a ws:// or wss:// URL", '"ws://h:0/stocks" (port 0: give'),
    ('url = "wss://a b/x"', "url", "URL like", "\"wss://a b/x\" (the host 'a b' is neither"),
    ('url = "wss://-h-/x"', "url", "URL like", "\"wss://-h-/x\" (the host '-h-' is neither"),
    ("url = 443", "url", "a non-empty string", "443"),
    ("subscribe = []", "subscribe", "a non-empty array of strings", "[]"),
    ('subscribe = "T.*"', "subscribe", "a non-empty array of strings", '"T.*"'),
    ('subscribe = ["T.A,T.B"]', "subscribe[0]", "one channel like T.AAPL", '"T.A,T.B"'),
    ('subscribe = ["T.A", ""]', "subscribe[1]", "a non-empty string", '""'),
    ("subscribe = [1]", "subscribe[0]", "a non-empty string", "1"),
    ("api_key_file = 3", "api_key_file", "a string", "3"),
    (
        'api_key_file = "${CREDENTIALS_DIRECTORY/k"',
        "api_key_file",
        "must write variables as ${NAME}",
        "'${CREDENTIALS_DIRECTORY/k' (at '${CREDENTIALS_DIRECTORY/",
    ),
    ('api_key_env = ["1KEY"]', "api_key_env[0]", "an environment variable name", '"1KEY"'),
    ('api_key_env = "KEY"', "api_key_env", "an array of strings", '"KEY"'),
    ('working_directory = ""', "working_directory", "a non-empty string", '""'),
    ("command = []", "command", "a non-empty array of strings", "[]"),
    ('command = "worker --fast"', "command", "a non-empty array of strings", '"worker --fast"'),
    ('command = ["w", 3]', "command[1]", "a non-empty string", "3"),
    ('pass_fds = "prepend"', "pass_fds", 'one of "append", "none"', '"prepend"'),
    ('worker_scheduling = "fifo"', "worker_scheduling", 'one of "batch", "other"', '"fifo"'),
    ('tls = "fast"', "tls", 'one of "auto", "kernel", "user"', '"fast"'),
    ('tls = "kernel"\nurl = "ws://127.0.0.1:9943/"', "tls", '"kernel" needs a wss:// url', "ws://"),
    ('ca_file = "/nonexistent/ca.pem"', "ca_file", "a PEM CA bundle", '"/nonexistent/ca.pem"'),
    ('server_hostname = ""', "server_hostname", "a non-empty string", '""'),
    ("connect_timeout = 0", "connect_timeout", "a number > 0", "0"),
    ("connect_timeout = -1.5", "connect_timeout", "a number > 0", "-1.5"),
    ("connect_timeout = nan", "connect_timeout", "a number > 0", "nan"),
    ("connect_timeout = inf", "connect_timeout", "a number > 0", "inf"),
    ('connect_timeout = "10"', "connect_timeout", "a number > 0", '"10"'),
    ("ping_interval = 0", "ping_interval", "a number > 0", "0"),
    ("ping_timeout = false", "ping_timeout", "a number > 0", "false"),
    ("max_message_size = 1000", "max_message_size", "an integer of at least 65536", "1000"),
    ("reconnect.initial = 0", "reconnect.initial", "a number > 0", "0"),
    ("reconnect.max = 0.5", "reconnect.max", "at least reconnect.initial (1)", "0.5"),
    ("reconnect.multiplier = 0.5", "reconnect.multiplier", "a number >= 1", "0.5"),
    ("reconnect.jitter = 1.5", "reconnect.jitter", "a number >= 0 and <= 1", "1.5"),
    ("reconnect.healthy_after = -1", "reconnect.healthy_after", "a number >= 0", "-1"),
    (
        "reconnect.max_connections_cooldown = -1",
        "reconnect.max_connections_cooldown",
        "a number >= 0",
        "-1",
    ),
    ("reconnect = 5", "reconnect", "a table ([feeds.feed.reconnect])", "5"),
    ("worker_restart.initial = 0", "worker_restart.initial", "a number > 0", "0"),
    ("worker_restart.max = 0.5", "worker_restart.max", "at least worker_restart.initial", "0.5"),
    ("backlog_limit = 10", "backlog_limit", "an integer of at least 65536 (bytes)", "10"),
    ("batch_bytes = 10", "batch_bytes", "an integer from 4096 to 268435456 (bytes)", "10"),
    ("stats_interval = 0", "stats_interval", "a number > 0", "0"),
    ('route_keys.T = ""', "route_keys.T", "a non-empty string", '""'),
    ("route_keys = 3", "route_keys", "a table ([feeds.feed.route_keys])", "3"),
    ("route_key_default = 1", "route_key_default", "a non-empty string", "1"),
    ("pipes = 1979-05-27", "pipes", "an integer from 1 to 4096", "1979-05-27 (a date)"),
]


@pytest.mark.parametrize(("lines", "key", "expected", "found"), INVALID)
def test_an_invalid_value_names_its_key_what_was_expected_and_what_was_found(
    lines: str, key: str, expected: str, found: str
) -> None:
    """Each invalid value is a ConfigError at its key path: "must be <expected>, got <found>"."""
    base = "[feeds.feed]\n" if lines.startswith("command") else FEED
    error = load_error(base + lines)
    assert error.key_path == f"feeds.feed.{key}"
    assert expected in error.message
    assert f"got {found}" in error.message


def test_the_message_reads_as_documented() -> None:
    """The message of a bad pipe count is exactly the documented example."""
    assert str(load_error(FEED + "pipes = 0")) == (
        "feeds.feed.pipes: must be an integer from 1 to 4096, got 0"
    )


def test_a_missing_command_is_an_error() -> None:
    """command has no default: a feed without it names the key and shows an example."""
    error = load_error("[feeds.feed]\npipes = 4\n")
    assert error.key_path == "feeds.feed.command"
    assert error.message.startswith("missing: the worker command is required")


def test_every_other_key_has_its_documented_default() -> None:
    """A feed with only a command gets the documented defaults."""
    feed = load_feed(FEED)
    assert (feed.url, feed.host, feed.port, feed.path, feed.secure) == (
        "wss://socket.massive.com/stocks",
        "socket.massive.com",
        443,
        "/stocks",
        True,
    )
    assert feed.subscribe == ("T.*",)
    assert feed.api_key_file == "${CREDENTIALS_DIRECTORY}/api-key"
    assert feed.api_key_env == ("MASSIVE_API_KEY", "POLYGON_API_KEY")
    assert (feed.pipes, feed.pipe_size) == (15, "max")
    assert feed.workers == min(15, len(os.sched_getaffinity(0)))
    assert feed.working_directory is None
    assert (feed.pass_fds, feed.tls, feed.ca_file, feed.server_hostname) == (
        "append",
        "auto",
        None,
        None,
    )
    assert (feed.connect_timeout, feed.ping_interval, feed.ping_timeout) == (10.0, 20.0, 20.0)
    assert feed.max_message_size == 16 * 1024 * 1024
    assert dataclasses.astuple(feed.reconnect) == (1.0, 60.0, 2.0, 0.5, 30.0, 300.0)
    assert dataclasses.astuple(feed.worker_restart) == (1.0, 30.0)
    assert (feed.backlog_limit, feed.batch_bytes) == (32 << 20, 1 << 20)
    assert feed.stats_interval == 5.0
    assert dict(feed.route_keys) == dict(DEFAULT_ROUTE_KEYS)
    assert feed.route_key_default == "sym"


def test_the_default_route_keys_match_the_feed_event_types() -> None:
    """Stocks key on sym, LULD/NOI/V on T, crypto and forex on pair, forex quotes on p."""
    by_field: dict[str, set[str]] = {}
    for event, field in DEFAULT_ROUTE_KEYS.items():
        by_field.setdefault(field, set()).add(event)
    assert by_field == {
        "sym": {"T", "Q", "A", "AM", "FMV"},
        "T": {"LULD", "NOI", "V"},
        "pair": {"CA", "CAS", "XA", "XAS", "XT", "XQ", "XL2"},
        "p": {"C"},
    }


@pytest.mark.parametrize(
    ("url", "host", "port", "path", "secure"),
    [
        ("wss://socket.polygon.io/stocks", "socket.polygon.io", 443, "/stocks", True),
        ("wss://delayed.massive.com/stocks", "delayed.massive.com", 443, "/stocks", True),
        ("wss://delayed.polygon.io:8443/options", "delayed.polygon.io", 8443, "/options", True),
        ("ws://127.0.0.1:9943/stocks", "127.0.0.1", 9943, "/stocks", False),
        ("ws://localhost", "localhost", 80, "/", False),
        ("wss://h.example/feed?x=1", "h.example", 443, "/feed?x=1", True),
        ("ws://[::1]:9000/s", "::1", 9000, "/s", False),
    ],
)
def test_a_url_gives_host_port_path_and_security(
    url: str, host: str, port: int, path: str, secure: bool
) -> None:
    """Any ws:// or wss:// host works; the port defaults to 80 or 443 and the path is kept."""
    feed = load_feed(FEED + f'url = "{url}"')
    assert (feed.url, feed.host, feed.port, feed.path, feed.secure) == (
        url,
        host,
        port,
        path,
        secure,
    )


def test_a_url_with_a_password_is_refused_without_echoing_it() -> None:
    """Credentials in the URL are an error, and the message does not repeat them."""
    error = load_error(FEED + f'url = "wss://user:{SECRET}@socket.massive.com/stocks"')
    assert error.key_path == "feeds.feed.url"
    assert SECRET not in str(error)


def test_set_values_are_taken_and_converted() -> None:
    """Explicit values override the defaults; integers given for seconds become floats."""
    feed = load_feed(
        FEED
        + "\n".join(
            [
                "pipes = 64",
                "workers = 5",
                "pipe_size = 1048576",
                'subscribe = ["T.AAPL", "Q.MSFT"]',
                'tls = "user"',
                "connect_timeout = 3",
                "reconnect.max = 120",
                "route_keys.XT = 'sym'",
                "route_keys.NEW = 'id'",
            ]
        )
    )
    assert (feed.pipes, feed.workers, feed.pipe_size, feed.tls) == (64, 5, 1048576, "user")
    assert feed.subscribe == ("T.AAPL", "Q.MSFT")
    assert isinstance(feed.connect_timeout, float)
    assert feed.connect_timeout == 3.0
    assert feed.reconnect.max == 120.0
    assert feed.reconnect.initial == 1.0
    assert (feed.route_keys["XT"], feed.route_keys["NEW"], feed.route_keys["T"]) == (
        "sym",
        "id",
        "sym",
    )


def test_the_defaults_table_applies_to_every_feed_unless_overridden() -> None:
    """[defaults] keys reach every feed; a feed's own key wins; sub-tables merge key by key."""
    loaded = config.loads(
        """
        [defaults]
        pipes = 8
        tls = "user"
        command = ["shared-worker", "{{ feed }}"]
        reconnect.max = 10
        reconnect.initial = 2
        route_keys.XT = "sym"

        [feeds.a]
        pipes = 32

        [feeds.b]
        command = ["own-worker"]
        reconnect.initial = 3
        route_keys.Q = "ticker"
        """
    )
    first, second = loaded.feed("a"), loaded.feed("b")
    assert (first.pipes, second.pipes) == (32, 8)
    assert first.tls == second.tls == "user"
    assert argv_for(first, 0, ".")[:2] == ["shared-worker", "a"]
    assert argv_for(second, 0, ".")[0] == "own-worker"
    assert (first.reconnect.initial, first.reconnect.max) == (2.0, 10.0)
    assert (second.reconnect.initial, second.reconnect.max) == (3.0, 10.0)
    assert (second.route_keys["XT"], second.route_keys["Q"], second.route_keys["T"]) == (
        "sym",
        "ticker",
        "sym",
    )
    assert first.route_keys["Q"] == "sym"


def test_an_error_in_defaults_names_the_defaults_key() -> None:
    """A bad inherited value is reported where it was written: defaults.KEY."""
    error = load_error('[defaults]\npipes = 0\n[feeds.a]\ncommand = ["w"]\n')
    assert error.key_path == "defaults.pipes"
    error = load_error('[defaults]\nworkers = 8\n[feeds.a]\ncommand = ["w"]\npipes = 4\n')
    assert (error.key_path, error.message) == (
        "defaults.workers",
        "must be an integer from 1 to 4 (pipes), got 8",
    )
    error = load_error("[defaults]\nreconnect.jitter = 2\n[feeds.a]\ncommand = ['w']\n")
    assert error.key_path == "defaults.reconnect.jitter"


@pytest.mark.parametrize(
    ("text", "key_path", "hint"),
    [
        (FEED + "pipe = 4", "feeds.feed.pipe", "did you mean 'pipes'?"),
        (FEED + "worker = 4", "feeds.feed.worker", "did you mean 'workers'?"),
        (FEED + "reconnect.intial = 4", "feeds.feed.reconnect.intial", "did you mean 'initial'?"),
        (FEED + "worker_restart.maximum = 4", "feeds.feed.worker_restart.maximum", "'max'?"),
        ("[defaults]\nsubscribe_to = []\n", "defaults.subscribe_to", "did you mean 'subscribe'?"),
        ("[feed.x]\ncommand = []\n", "feed", "did you mean 'feeds'?"),
        (FEED + "zzz = 1", "feeds.feed.zzz", "known keys: api_key_env, api_key_file,"),
    ],
)
def test_an_unknown_key_is_an_error_suggesting_the_nearest(
    text: str, key_path: str, hint: str
) -> None:
    """A misspelt key is refused, not ignored, with the nearest known key or the list of keys."""
    error = load_error(text)
    assert error.key_path == key_path
    assert error.message.startswith("unknown key; ")
    assert hint in error.message


def test_an_api_key_in_the_file_is_refused_without_echoing_it() -> None:
    """api_key = "..." says where the key belongs and never repeats the value."""
    error = load_error(FEED + f'api_key = "{SECRET}"')
    assert error.key_path == "feeds.feed.api_key"
    assert "api_key_file" in error.message
    assert "LoadCredential" in error.message
    assert SECRET not in str(error)


@pytest.mark.parametrize(
    ("text", "key_path", "message"),
    [
        ("feeds = 3", "feeds", "must be a table of [feeds.NAME] tables, got 3"),
        ("defaults = []", "defaults", "must be a table ([defaults]), got []"),
        ("[feeds]\nfeed = 3", "feeds.feed", "must be a table, got 3"),
        ('[feeds."a b"]\ncommand = ["w"]', "feeds.a b", "letters, digits, _ and -"),
        ('[feeds."a.b"]\ncommand = ["w"]', "feeds.a.b", 'tradebalancer@NAME), got "a.b"'),
    ],
)
def test_the_file_structure_is_checked(text: str, key_path: str, message: str) -> None:
    """feeds and defaults must be tables, and feed names must be usable as systemd instances."""
    error = load_error(text)
    assert error.key_path == key_path
    assert message in error.message


def test_a_toml_syntax_error_gives_the_file_line_and_column(tmp_path: Path) -> None:
    """tomllib's position is kept: the message names the file, the line and the column."""
    path = tmp_path / "broken.toml"
    lines = ["[feeds.feed]", 'command = ["w"]', "pipes = = 4"]
    path.write_text("\n".join(lines) + "\n")
    column = lines[2].index("= 4") + 1
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.key_path == str(path)
    assert caught.value.message.startswith(f"line 3, column {column}: invalid TOML: ")
    assert str(caught.value).startswith(f"{path}: line 3, column {column}: ")


def test_a_syntax_error_at_the_end_of_the_file_says_so() -> None:
    """An unterminated value reported at the end of the document is named that way."""
    error = load_error('[feeds.feed]\ncommand = ["w"')
    assert error.key_path == "<string>"
    assert error.message.startswith("invalid TOML at the end of the file")


def test_a_missing_file_says_which_and_how_to_choose_another(tmp_path: Path) -> None:
    """A missing file names its path, --config and TRADEBALANCER_CONFIG."""
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.key_path == str(path)
    assert "no such file" in caught.value.message
    assert "--config FILE" in caught.value.message
    assert "TRADEBALANCER_CONFIG" in caught.value.message


@pytest.mark.parametrize(
    ("content", "message"), [(None, "cannot read the file: "), (b"a = '\xff'", "not UTF-8")]
)
def test_an_unreadable_file_is_a_config_error(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    """A directory, or bytes that are not UTF-8, are reported against the path."""
    path = tmp_path / "config.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert caught.value.key_path == str(path)
    assert caught.value.message.startswith(message)


def test_asking_for_an_undefined_feed_lists_the_defined_ones(tmp_path: Path) -> None:
    """Config.feed names the file and the feeds it defines."""
    path = tmp_path / "two.toml"
    path.write_text('[feeds.b]\ncommand = ["w"]\n[feeds.a]\ncommand = ["w"]\n')
    loaded = config.load(path)
    assert loaded.path == str(path)
    assert sorted(loaded.feeds) == ["a", "b"]
    with pytest.raises(ConfigError) as caught:
        loaded.feed("c")
    assert caught.value.key_path == "feeds.c"
    assert caught.value.message == f"no [feeds.c] table in {path}; defined feeds: a, b"
    with pytest.raises(ConfigError, match="defined feeds: none"):
        config.loads("").feed("c")


def test_a_relative_ca_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """ca_file = "ca.pem" means the ca.pem beside the configuration file, and must exist."""
    ca, _, _ = make_ca(tmp_path)
    (tmp_path / "ca.pem").write_bytes(ca.read_bytes())
    path = tmp_path / "tb.toml"
    path.write_text(FEED + 'ca_file = "ca.pem"\nserver_hostname = "feed.test"\n')
    feed = config.load(path).feed("feed")
    assert feed.ca_file == str(tmp_path / "ca.pem")
    assert feed.server_hostname == "feed.test"


def test_the_loaded_configuration_is_frozen() -> None:
    """Neither the dataclasses nor their mappings can be changed after loading."""
    loaded = config.loads(FEED)
    feed = loaded.feed("feed")
    with pytest.raises(dataclasses.FrozenInstanceError):
        feed.pipes = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        feed.route_keys["T"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        loaded.feeds["other"] = feed  # type: ignore[index]


# -- the shipped file ----------------------------------------------------------------------


def test_the_shipped_file_loads_and_its_feed_runs_the_sample_worker() -> None:
    """etc/tradebalancer.toml defines [feeds.feed] on the real-time feed with the sample worker."""
    loaded = config.load(SHIPPED)
    assert list(loaded.feeds) == ["feed"]
    feed = loaded.feed("feed")
    assert feed.url == "wss://socket.massive.com/stocks"
    assert feed.subscribe == ("T.*",)
    assert feed.pass_fds == "append"
    assert feed.worker_scheduling == "batch"
    for worker in range(feed.workers):
        fds = [str(3 + offset) for offset in range(len(pipes_for_worker(feed, worker)))]
        assert argv_for(feed, worker, "/var/lib/tradebalancer/feed") == [
            sys.executable,
            "-m",
            "tradebalancer.sample",
            "--name",
            f"feed-{worker}",
            *fds,
        ]


def test_the_shipped_file_passes_the_check_with_a_key_in_the_environment() -> None:
    """What check-config --require-key checks holds for the shipped file given MASSIVE_API_KEY."""
    environ = {"MASSIVE_API_KEY": SECRET, "STATE_DIRECTORY": "/var/lib/tradebalancer/feed"}
    for feed in config.load(SHIPPED).feeds.values():
        assert credentials.resolve_api_key(feed, environ) == SECRET
        assert (
            credentials.describe_api_key_source(feed, environ)
            == "environment variable MASSIVE_API_KEY"
        )
        workdir = working_directory(feed, environ)
        assert workdir == "/var/lib/tradebalancer/feed"
        argvs = [argv_for(feed, worker, workdir) for worker in range(feed.workers)]
        assert len({argv[4] for argv in argvs}) == feed.workers  # --name differs per worker


def test_every_commented_out_key_of_the_shipped_file_shows_its_default() -> None:
    """Uncommenting the commented-out keys of [feeds.feed] changes nothing but the examples."""
    text = SHIPPED.read_text()
    head, body = text.split("[feeds.feed]\n")
    examples = {"ca_file", "server_hostname", "working_directory", "workers", "jetstream"}
    keys = [
        match[1]
        for match in re.finditer(r"^# (([A-Za-z_.]+) = .*)$", body, re.MULTILINE)
        if match[2].split(".")[0] not in examples
    ]
    uncommented = config.loads(f"{head}[feeds.feed]\n" + "\n".join(keys) + "\n" + body)
    assert uncommented.feed("feed") == config.loads(text).feed("feed")
    documented = {key.split(" = ")[0].split(".")[0] for key in keys} | examples
    documented |= {match[1] for match in re.finditer(r"^([a-z_]+) = ", body, re.MULTILINE)}
    assert documented == {field.name for field in dataclasses.fields(FeedConfig)} - {
        "name",
        "host",
        "port",
        "path",
        "secure",
    }


@pytest.mark.parametrize("text", ["${", "a${1X}", "${A-B}", "/x/${HOME"])
def test_a_malformed_reference_is_refused(text: str) -> None:
    """Only ${NAME} with NAME of letters, digits and _ (not leading) is a reference."""
    with pytest.raises(ConfigError, match="must write variables as") as caught:
        check_variables(text, "feeds.feed.working_directory")
    assert caught.value.key_path == "feeds.feed.working_directory"


def test_expansion_replaces_every_reference_and_leaves_other_dollars() -> None:
    """Each ${NAME} is replaced; a $ not followed by { stays as written; unset names are listed."""
    environ = {"A": "1", "B": "two", "EMPTY": ""}
    check_variables("$A/${A}/${B}$", "key")
    assert expand_variables("$A/${A}/${B}$", environ, "key") == "$A/1/two$"
    assert unset_variables("${A}${EMPTY}${C}", environ) == ["EMPTY", "C"]


# -- one feed's table never blocks another -------------------------------------------------


def test_one_bad_feed_table_never_blocks_another() -> None:
    """[feeds.a] pipes = 0 beside a valid [feeds.b]: b loads, a fails alone (both failed)."""
    loaded = config.loads(
        '[defaults]\ncommand = ["w"]\n[feeds.a]\npipes = 0\n[feeds."bad name"]\n[feeds.b]\n'
    )
    assert loaded.names == ["a", "bad name", "b"]
    assert loaded.feed("b").pipes == config.DEFAULT_PIPES
    with pytest.raises(ConfigError, match=r"feeds\.a\.pipes"):
        loaded.feed("a")
    with pytest.raises(ConfigError, match="a feed name must be"):
        loaded.feed("bad name")
    with pytest.raises(ConfigError, match=r"feeds\.a\.pipes"):
        loaded.feeds  # noqa: B018 - all of them: the first bad one fails


def test_an_error_in_defaults_still_fails_every_feed() -> None:
    """What every feed inherits is checked for all: a bad [defaults] key fails at load."""
    with pytest.raises(ConfigError, match=r"defaults\.pipez"):
        config.loads('[defaults]\npipez = 3\n[feeds.b]\ncommand = ["w"]\n')


@pytest.mark.parametrize(
    "query", [f"apiKey={SECRET}", f"x=1&apikey={SECRET}", f"api_key={SECRET}", f"token={SECRET}"]
)
def test_a_key_in_the_url_is_refused_without_echoing_it(query: str) -> None:
    """?apiKey=... was accepted and logged in full with the URL."""
    error = load_error(FEED + f'url = "wss://socket.massive.com/stocks?{query}"')
    assert error.key_path == "feeds.feed.url"
    assert "must not carry the API key" in error.message and "api_key_file" in error.message
    assert SECRET not in str(error)


@pytest.mark.parametrize("content", [None, b"root:x:0:0:root:/root:/bin/bash\n", b""])
def test_a_ca_file_openssl_cannot_load_is_refused(tmp_path: Path, content: bytes | None) -> None:
    """ca_file = "/etc/passwd" passed, and then every connection attempt failed, forever."""
    ca = tmp_path / "ca.pem"
    if content is None:
        ca.mkdir()
    else:
        ca.write_bytes(content)
    error = load_error(FEED + f'ca_file = "{ca}"')
    assert error.key_path == "feeds.feed.ca_file"
    assert error.message.startswith(f'must name a PEM CA bundle, got "{ca}", which ')


def test_a_relative_api_key_file_is_relative_to_the_config_file(tmp_path: Path) -> None:
    """As ca_file: it resolved against the current directory instead."""
    path = tmp_path / "tb.toml"
    path.write_text(FEED + 'api_key_file = "keys/feed.key"\n')
    assert config.load(path).feed("feed").api_key_file == str(tmp_path / "keys" / "feed.key")
    path.write_text(FEED + 'api_key_file = "${CREDENTIALS_DIRECTORY}/api-key"\n')
    assert config.load(path).feed("feed").api_key_file == "${CREDENTIALS_DIRECTORY}/api-key"


JETSTREAM = FEED + '[feeds.feed.jetstream]\nservers = ["nats://10.0.0.5:4222"]\n'


@pytest.mark.parametrize(
    ("lines", "key_path", "message"),
    [
        ("partitions = [15]", "feeds.feed.jetstream.partitions[0]", "from 0 to 14 (pipes = 15)"),
        ("partitions = [1, 1]", "feeds.feed.jetstream.partitions", "lists a partition twice"),
        ("partitions = []", "feeds.feed.jetstream.partitions", '"all" or a non-empty array'),
        ('storage = "disk"', "feeds.feed.jetstream.storage", '"file", "memory", got "disk"'),
        ("replicas = 0", "feeds.feed.jetstream.replicas", "from 1 to 5"),
        ('stream = "a.b"', "feeds.feed.jetstream.stream", "a JetStream stream name"),
        ('subject_prefix = "a.>"', "feeds.feed.jetstream.subject_prefix", "(no * or >)"),
        ('create = "yes"', "feeds.feed.jetstream.create", "must be true or false"),
        ("colour = 1", "feeds.feed.jetstream.colour", "unknown key"),
    ],
)
def test_a_bad_jetstream_key_is_named_with_what_to_do(
    lines: str, key_path: str, message: str
) -> None:
    """Each [feeds.NAME.jetstream] mistake names its key path and what is allowed."""
    error = load_error(JETSTREAM + lines + "\n")
    assert error.key_path == key_path
    assert message in error.message


def test_a_jetstream_table_without_servers_says_they_are_required() -> None:
    """jetstream keys without servers fail with an example of the servers key."""
    error = load_error(FEED + '[feeds.feed.jetstream]\npartitions = "all"\n')
    assert error.key_path == "feeds.feed.jetstream.servers"
    assert "nats://" in error.message


def test_the_shipped_jetstream_example_loads_as_written() -> None:
    """Uncommenting the shipped file's jetstream example gives those partitions and servers."""
    lines = re.findall(r"^# (jetstream\.[a-z_]+ = .*)$", SHIPPED.read_text(), re.MULTILINE)
    jetstream = load_feed(FEED + "\n".join(lines) + "\n").jetstream
    assert jetstream is not None
    assert jetstream.partitions == tuple(range(8, 15))
    assert jetstream.replicas == 3
    assert len(jetstream.servers) == 3
    assert jetstream.credentials_file == "${CREDENTIALS_DIRECTORY}/nats.creds"
    assert load_feed(FEED).jetstream is None
