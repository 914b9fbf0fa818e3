"""The command line: check-config, run's early failures, help and exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tradebalancer.cli import main
from tradebalancer.errors import ExitCode

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "etc" / "tradebalancer.toml"


def test_the_shipped_config_checks_with_a_key_in_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """check-config --require-key accepts the shipped file and shows every worker's command."""
    monkeypatch.setenv("MASSIVE_API_KEY", "k-123456")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert main(["--config", str(SHIPPED), "check-config", "--require-key", "feed"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(
        "feeds.feed: ok: wss://socket.massive.com/stocks, subscribe T.*, 15 pipes"
    )
    assert (
        "API key from the environment variable MASSIVE_API_KEY" in out or "MASSIVE_API_KEY" in out
    )
    assert "k-123456" not in out
    assert "  worker 0: " in out and "tradebalancer.sample" in out


def test_a_missing_key_fails_only_when_required(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a key, check-config still passes, and fails with 78 under --require-key."""
    for name in ("MASSIVE_API_KEY", "POLYGON_API_KEY", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--config", str(SHIPPED), "check-config", "feed"]) == 0
    assert "not found here" in capsys.readouterr().out
    assert main(["--config", str(SHIPPED), "check-config", "--require-key"]) == ExitCode.CONFIG
    assert "no API key" in capsys.readouterr().err


def test_a_bad_value_exits_78_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid value is reported with its key path, and check-config exits 78 (EX_CONFIG)."""
    config = tmp_path / "bad.toml"
    config.write_text('[feeds.feed]\npipes = 0\ncommand = ["worker"]\n')
    assert main(["--config", str(config), "check-config"]) == 78
    assert "feeds.feed.pipes: must be an integer from 1 to 4096, got 0" in capsys.readouterr().err


def test_an_unknown_feed_exits_78_listing_the_defined_ones(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Naming a feed the file does not define fails with the names it does define."""
    assert main(["--config", str(SHIPPED), "check-config", "nope"]) == 78
    err = capsys.readouterr().err
    assert "nope" in err and "feed" in err


def test_run_without_a_key_exits_78_before_starting_anything(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """run refuses to start without an API key, with exit code 78."""
    for name in ("MASSIVE_API_KEY", "POLYGON_API_KEY", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--config", str(SHIPPED), "run", "feed"]) == 78
    assert "no API key" in capsys.readouterr().err


def test_a_power_of_two_pipe_count_is_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config warns when the pipe count would spread symbols badly."""
    config = tmp_path / "p.toml"
    config.write_text('[feeds.feed]\npipes = 16\ncommand = ["true"]\n')
    assert main(["--config", str(config), "check-config"]) == 0
    assert "warning: pipes = 16 is a power of two" in capsys.readouterr().out


@pytest.mark.parametrize("command", [[], ["check-config"], ["run"], ["replay"]])
def test_help_reads_well_for_every_command(command: list[str]) -> None:
    """--help works for the program and each command and names what it does."""
    result = subprocess.run(
        [sys.executable, "-m", "tradebalancer", *command, "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: tradebalancer")
    if not command:
        assert "exit codes:" in result.stdout and "78" in result.stdout


def test_usage_errors_exit_64_and_version_prints() -> None:
    """A bad command line exits 64 (EX_USAGE); --version prints the version."""
    bad = subprocess.run(
        [sys.executable, "-m", "tradebalancer"], capture_output=True, text=True, check=False
    )
    assert bad.returncode == 64 and "required: COMMAND" in bad.stderr
    version = subprocess.run(
        [sys.executable, "-m", "tradebalancer", "--version"], capture_output=True, text=True
    )
    assert version.stdout.startswith("tradebalancer 0.")


def test_two_feeds_with_one_key_on_one_cluster_are_flagged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config warns when two feeds would take the stream from each other."""
    key = tmp_path / "key"
    key.write_text("the-one-key\n")
    config = tmp_path / "two.toml"
    config.write_text(
        f'[defaults]\ncommand = ["true"]\napi_key_file = "{key}"\n'
        '[feeds.a]\nurl = "wss://socket.example/stocks"\n'
        '[feeds.b]\nurl = "wss://socket.example/stocks"\n'
        '[feeds.c]\nurl = "wss://socket.example/options"\n'
    )
    assert main(["--config", str(config), "check-config"]) == 0
    out = capsys.readouterr().out
    assert (
        "warning: feeds.a and feeds.b connect to wss://socket.example/stocks with the same" in out
    )
    assert "feeds.c and" not in out and "and feeds.c" not in out


# -- what run would fail on, found by check-config (and by run, before anything starts) ------


def write_feed(tmp_path: Path, lines: str, name: str = "feed") -> Path:
    path = tmp_path / "tb.toml"
    path.write_text(f"[feeds.{name}]\nworkers = 1\npipes = 3\n{lines}\n")
    return path


def not_executable(tmp_path: Path) -> str:
    program = tmp_path / "strategy.py"
    program.write_text("print('hi')\n")
    program.chmod(0o644)
    return str(program)


def a_file(tmp_path: Path) -> str:
    (tmp_path / "plain").write_text("")
    return str(tmp_path / "plain")


# (the feed's lines, given tmp_path; the key path; the start of the message)
PREFLIGHT = [
    (
        lambda t: 'command = ["/nonexistent/strategy"]',
        "command[0]",
        "/nonexistent/strategy: no such file; fix the path or install the worker (worker 0)",
    ),
    (
        lambda t: f'command = ["{not_executable(t)}"]',
        "command[0]",
        f"{{tmp}}/strategy.py is not executable by uid {os.geteuid()}; chmod +x it",
    ),
    (
        lambda t: 'command = ["no-such-strategy-here"]',
        "command[0]",
        "'no-such-strategy-here' is not an executable on the workers' PATH (",
    ),
    (
        lambda t: f'command = ["bin/strategy"]\nworking_directory = "{t}"',
        "command[0]",
        "bin/strategy (from {tmp}): no such file",
    ),
    (
        lambda t: f'command = ["true"]\nworking_directory = "{t}/missing"',
        "working_directory",
        "{tmp}/missing does not exist: create it (the workers run there) or choose another",
    ),
    (
        lambda t: f'command = ["true"]\nworking_directory = "{a_file(t)}"',
        "working_directory",
        "{tmp}/plain is not a directory",
    ),
]


@pytest.mark.parametrize(("lines", "key", "message"), PREFLIGHT)
def test_check_config_and_run_refuse_what_would_stop_a_worker(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    lines: Callable[[Path], str],
    key: str,
    message: str,
) -> None:
    """Each passed check-config; run then exited 71 at the spawn (the unit restarted it five
    times), the missing directory named as the interpreter. Now both exit 78 naming the key."""
    monkeypatch.setenv("MASSIVE_API_KEY", "k-123456")
    path = write_feed(tmp_path, lines(tmp_path))
    expected = f"tradebalancer: feeds.feed.{key}: {message.format(tmp=tmp_path)}"
    for command in (["check-config", "feed"], ["run", "feed"]):
        assert main(["--config", str(path), *command]) == ExitCode.CONFIG
        err = capsys.readouterr().err
        assert err.startswith(expected), err


def test_check_config_reports_each_feed_and_fails_if_one_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """All feeds: the bad one is named beside the good ones, which are still shown."""
    path = tmp_path / "tb.toml"
    path.write_text(
        '[defaults]\ncommand = ["true"]\npipes = 3\n[feeds.a]\npipes = 0\n[feeds.b]\nworkers = 1\n'
    )
    assert main(["--config", str(path), "check-config"]) == ExitCode.CONFIG
    captured = capsys.readouterr()
    assert "feeds.a: FAILED: feeds.a.pipes: must be an integer from 1 to 4096" in captured.out
    assert "feeds.b: ok: " in captured.out
    assert "1 of 2 feeds failed the check" in captured.err
    assert main(["--config", str(path), "check-config", "b"]) == 0  # b alone: 78 before


def test_check_config_says_1_worker_and_quotes_each_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """ "1 workers" and an argv whose spaces vanished are gone."""
    path = write_feed(tmp_path, 'command = ["true", "--label", "two words", "{{ worker }}"]')
    assert main(["--config", str(path), "check-config"]) == 0
    out = capsys.readouterr().out
    assert ", 3 pipes, 1 worker, " in out
    assert "  worker 0: true --label 'two words' 0 3 4 5\n" in out


def test_config_and_verbose_may_follow_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`run f --config x.toml` was refused, and run --help did not mention --config."""
    path = write_feed(tmp_path, 'command = ["true"]')
    assert main(["check-config", "feed", "--config", str(path), "-v"]) == 0
    assert "feeds.feed: ok:" in capsys.readouterr().out
    for command in ("run", "check-config"):
        shown = subprocess.run(
            [sys.executable, "-m", "tradebalancer", command, "--help"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "--config FILE" in shown


# -- check-config and a [feeds.NAME.jetstream] table -----------------------------------------

CREDS = (
    "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.sig\n------END NATS USER JWT------\n\n"
    "-----BEGIN USER NKEY SEED-----\nSUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4\n"
    "------END USER NKEY SEED------\n"
)


def jetstream_config(tmp_path: Path, table: str, *, pipes: int = 5) -> Path:
    config = tmp_path / "js.toml"
    config.write_text(
        f'[feeds.feed]\npipes = {pipes}\ncommand = ["true"]\nworking_directory = "{tmp_path}"\n'
        f'[feeds.feed.jetstream]\nservers = ["nats://10.0.0.5:4222"]\n{table}'
    )
    return config


def test_check_config_says_where_the_remote_partitions_go(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The partitions, stream, subjects, servers and credentials kind are shown, and a
    world-readable file or too few servers for the replicas are warnings."""
    creds = tmp_path / "nats.creds"
    creds.write_text("tb:Secret-9\n")
    creds.chmod(0o644)
    config = jetstream_config(
        tmp_path, f'partitions = [2, 3, 4]\ncredentials_file = "{creds}"\nreplicas = 3\n'
    )
    assert main(["--config", str(config), "check-config"]) == 0
    out = capsys.readouterr().out
    assert (
        "  jetstream: partitions 2-4 of 5 go to stream tradebalancer-feed (subjects "
        "tradebalancer.feed.2 ... tradebalancer.feed.4; the stream takes tradebalancer.feed.>) "
        "on nats://10.0.0.5:4222; file storage, replicas 3, created if missing; published by "
        "the bridge (worker 2)\n"
    ) in out
    assert f"  jetstream credentials: {creds}: USER:PASSWORD, readable\n" in out
    assert f"  warning: {creds} may be read by other users (mode 0644)" in out
    assert "  warning: replicas = 3 but 1 server(s) listed" in out
    assert "Secret-9" not in out


def test_check_config_refuses_credentials_the_bridge_could_not_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A missing file, a .creds file without its seed, and a .creds file without the nkeys
    package are each exit 78 naming the key, before anything starts."""
    key = "feeds.feed.jetstream.credentials_file"
    creds = tmp_path / "nats.creds"
    config = jetstream_config(tmp_path, f'credentials_file = "{creds}"\n')
    assert main(["--config", str(config), "check-config"]) == ExitCode.CONFIG
    assert f"{key}: cannot read the NATS credentials file {creds}" in capsys.readouterr().err
    creds.write_text(CREDS.split("\n\n")[0] + "\n")
    assert main(["--config", str(config), "check-config"]) == ExitCode.CONFIG
    assert "has a user JWT but no NKey seed" in capsys.readouterr().err
    creds.write_text(CREDS)
    creds.chmod(0o600)
    monkeypatch.setitem(sys.modules, "nkeys", None)  # as if not installed
    assert main(["--config", str(config), "check-config"]) == ExitCode.CONFIG
    err = capsys.readouterr().err
    assert (
        f"{key}: the NATS credentials file {creds} is a .creds file, which needs the nkeys" in err
    )
    assert "SUAIB" not in err
    monkeypatch.setenv("MASSIVE_API_KEY", "k-1")
    assert main(["--config", str(config), "run", "feed"]) == ExitCode.CONFIG  # run checks it too
    assert "needs the nkeys package" in capsys.readouterr().err


def test_check_config_leaves_a_credential_of_the_unit_unchecked_unless_required(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """${CREDENTIALS_DIRECTORY} unset by hand is "not checked here"; --require-key makes it 78."""
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setenv("MASSIVE_API_KEY", "k-1")
    config = jetstream_config(
        tmp_path, 'credentials_file = "${CREDENTIALS_DIRECTORY}/nats.creds"\n'
    )
    assert main(["--config", str(config), "check-config"]) == 0
    out = capsys.readouterr().out
    assert "jetstream credentials: ${CREDENTIALS_DIRECTORY}/nats.creds: not checked here" in out
    assert "--credentials '${CREDENTIALS_DIRECTORY}/nats.creds'" in out  # the bridge's argv
    assert main(["--config", str(config), "check-config", "--require-key"]) == ExitCode.CONFIG
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    (tmp_path / "nats.creds").write_text("token-1\n")
    (tmp_path / "nats.creds").chmod(0o600)
    assert main(["--config", str(config), "check-config", "--require-key"]) == 0
    assert f"jetstream credentials: {tmp_path}/nats.creds: a token, readable" in (
        capsys.readouterr().out
    )


def test_check_config_warns_of_two_feeds_publishing_into_one_stream(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two feeds with the same stream on a shared server: the second bridge would stop."""
    config = tmp_path / "two.toml"
    table = '[feeds.{0}.jetstream]\nservers = ["nats://n:4222"]\nstream = "tb"\n'
    config.write_text(
        "".join(
            f'[feeds.{name}]\npipes = 3\ncommand = ["true"]\nworking_directory = "{tmp_path}"\n'
            f'api_key_env = ["KEY_{name}"]\n' + table.format(name)
            for name in ("a", "b")
        )
    )
    assert main(["--config", str(config), "check-config"]) == 0
    assert (
        "warning: feeds.a and feeds.b publish to the same JetStream stream tb on the same servers"
        in capsys.readouterr().out
    )
