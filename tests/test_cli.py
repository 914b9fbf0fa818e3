"""The command line: check-config, run's early failures, help and exit codes."""

from __future__ import annotations

import subprocess
import sys
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
    config.write_text('[feeds.feed]\npipes = 16\ncommand = ["worker"]\n')
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
        f'[defaults]\ncommand = ["worker"]\napi_key_file = "{key}"\n'
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
