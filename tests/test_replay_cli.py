"""The replay feed's command line, run as a real process: a bad option is one line and exit 64.

Each case runs ``python -m tradebalancer.replay`` with one wrong option and checks the exit code
(64, EX_USAGE), that stderr ends with one line naming the option, what it must be and what to
do, with no traceback, and that nothing was served (no URL on stdout).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tlsca import make_ca

from tradebalancer.replay import synth

PROGRAM = "tradebalancer replay"
# Small and quick: a case's own options come after these and override them.
QUICK = ["--port", "0", "--events", "10", "--symbols", "50"]


def run_replay(
    *args: str, module: str = "tradebalancer.replay"
) -> subprocess.CompletedProcess[str]:
    """Run the replay feed's command line to its end (a bad option ends it at once)."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line a refused option gives; fails if there is more or a traceback."""
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"{PROGRAM}:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.splitlines()[-1] == errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Paths a case may name as {cert}, {key}, {bad_recording}, {directory}, {missing}."""
    directory = tmp_path_factory.mktemp("replay-cli")
    _, cert, key = make_ca(directory)
    bad = directory / "bad.jsonl"
    bad.write_text('[{"ev":"T"}]\n{"ev":"T"}\n')
    return {
        "cert": str(cert),
        "key": str(key),
        "bad_recording": str(bad),
        "directory": str(directory),
        "missing": str(directory / "missing.pem"),
    }


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port of 127.0.0.1 another socket listens on."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        yield other.getsockname()[1]


# (case, arguments, the error line after "tradebalancer replay: ")
REFUSED = [
    (
        "port above 65535",
        ["--port", "99999"],
        "--port: must be an integer from 0 to 65535, got 99999; choose another port, "
        "or 0 for any free one",
    ),
    (
        "negative port",
        ["--port", "-1"],
        "--port: must be an integer from 0 to 65535, got -1; choose another port, "
        "or 0 for any free one",
    ),
    (
        "host that does not resolve",
        ["--host", "999.1.1.1"],
        "--host: cannot resolve '999.1.1.1' (Name or service not known); give an address of "
        "this machine, such as 127.0.0.1, ::1 or 0.0.0.0 (all)",
    ),
    (
        "host of another machine",
        ["--host", "192.0.2.1"],  # TEST-NET-1 (RFC 5737): never an address of this machine
        "--host: 192.0.2.1 is not an address of this machine; give an address of this "
        "machine, such as 127.0.0.1, ::1 or 0.0.0.0 (all)",
    ),
    (
        "empty host",
        ["--host", ""],
        "--host: cannot resolve '' (Name or service not known); give an address of this "
        "machine, such as 127.0.0.1, ::1 or 0.0.0.0 (all)",
    ),
    (
        "key file without a certificate",
        ["--keyfile", "{key}"],
        "--keyfile: needs --certfile, the certificate the key goes with; add --certfile PEM "
        "to serve wss://, or leave both out to serve ws://",
    ),
    (
        "empty API key",
        ["--accept-key", ""],
        "--accept-key: '': a key must not be empty or begin or end with white space; give the "
        "key clients send, or leave --accept-key out to accept any non-empty key",
    ),
    (
        "API key with white space around",
        ["--accept-key", "good", "--accept-key", " key"],
        "--accept-key: ' key': a key must not be empty or begin or end with white space; give "
        "the key clients send, or leave --accept-key out to accept any non-empty key",
    ),
    (
        "missing certificate",
        ["--certfile", "{missing}"],
        "--certfile: cannot read {missing} (No such file or directory); give a PEM "
        "certificate chain",
    ),
    (
        "certificate that is a directory",
        ["--certfile", "{directory}"],
        "--certfile: cannot read {directory} (Is a directory); give a PEM certificate chain",
    ),
    (
        "missing key file",
        ["--certfile", "{cert}", "--keyfile", "{missing}"],
        "--keyfile: cannot read {missing} (No such file or directory); give the "
        "certificate's PEM private key",
    ),
    (
        "certificate and key swapped",
        ["--certfile", "{key}", "--keyfile", "{cert}"],
        "--certfile: cannot load the certificate {key} and the key {cert}: ",
    ),
    (
        "missing recording",
        ["--source", "{missing}"],
        "--source: cannot read {missing} (No such file or directory); give a recording "
        "(one JSON array of events a line)",
    ),
    (
        "recording with a line that is not an array",
        ["--source", "{bad_recording}"],
        "{bad_recording}, line 2: a JSON dict, not an array; each line must be one JSON array "
        "of events (or blank, or a # comment)",
    ),
    (
        "zero rate",
        ["--rate", "0"],
        "--rate: must be a positive number of events per second, got 0.0",
    ),
    (
        "rate that is not a number",
        ["--rate", "nan"],
        "--rate: must be a positive number of events per second, got nan",
    ),
    (
        "infinite rate",
        ["--rate", "inf"],
        "--rate: must be a positive number of events per second, got inf",
    ),
    ("zero events", ["--events", "0"], "--events: must be a positive integer, got 0"),
    (
        "negative disconnect",
        ["--disconnect-after", "-5"],
        "--disconnect-after: must be a positive integer, got -5",
    ),
    (
        "negative ping interval",
        ["--ping-interval", "-1"],
        "--ping-interval: must be a number of seconds, 0 for no pings, got -1.0",
    ),
    (
        "infinite ping interval",
        ["--ping-interval", "inf"],
        "--ping-interval: must be a number of seconds, 0 for no pings, got inf",
    ),
    ("no symbols", ["--symbols", "0"], "--symbols: must be an integer from 1 to 100000, got 0"),
    (
        "more symbols than names are drawn for",
        ["--symbols", "100001"],
        "--symbols: must be an integer from 1 to 100000, got 100001",
    ),
    (
        "empty frames",
        ["--min-batch", "0"],
        "--min-batch: must be an integer from 1 to 100000, got 0",
    ),
    (
        "fewer events a frame at most than at least",
        ["--min-batch", "10", "--max-batch", "5"],
        "--max-batch: must be an integer from --min-batch (10) to 100000, got 5",
    ),
    (
        "frames larger than a client takes",
        ["--max-batch", "100001"],
        "--max-batch: must be an integer from --min-batch (50) to 100000, got 100001",
    ),
    (
        "recording to a directory that does not exist",
        ["--record-to", "{missing}/out.jsonl"],
        "--record-to: cannot write {missing}/out.jsonl (No such file or directory); give a "
        "file in a writable directory",
    ),
]


@pytest.mark.parametrize(
    ("arguments", "expected"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED]
)
def test_a_bad_option_is_one_line_and_exit_64(
    files: dict[str, str], arguments: list[str], expected: str
) -> None:
    """A wrong option exits 64 with one line naming it, what it must be and what to do."""
    result = run_replay(*QUICK, *(argument.format(**files) for argument in arguments))
    assert (result.returncode, result.stdout) == (64, "")
    assert error_line(result).startswith(f"{PROGRAM}: {expected.format(**files)}")


def test_a_port_in_use_is_one_line_and_exit_64(busy_port: int) -> None:
    """A port another socket listens on exits 64, saying so, instead of a traceback and 1."""
    result = run_replay(*QUICK, "--port", str(busy_port))
    assert (result.returncode, result.stdout) == (64, "")
    assert error_line(result) == (
        f"{PROGRAM}: --port: 127.0.0.1:{busy_port} is already in use; choose another port, "
        "or 0 for any free one"
    )


def test_a_bad_option_of_tradebalancer_replay_exits_64_too() -> None:
    """``tradebalancer replay`` refuses the same option with the same line and exit code."""
    result = run_replay("replay", *QUICK, "--port", "99999", module="tradebalancer")
    assert (result.returncode, result.stdout) == (64, "")
    assert result.stderr.splitlines()[-1] == (
        "tradebalancer: --port: must be an integer from 0 to 65535, got 99999; "
        "choose another port, or 0 for any free one"
    )


def test_a_malformed_command_line_exits_64_with_the_usage() -> None:
    """What argparse refuses (not a number, an unknown option) exits 64, not argparse's 2."""
    for arguments in (["--port", "abc"], ["--no-such-option"]):
        result = run_replay(*arguments)
        assert result.returncode == 64
        assert result.stderr.startswith("usage: tradebalancer replay")
        assert result.stderr.splitlines()[-1].startswith(f"{PROGRAM}: error: ")


def test_options_at_the_ends_of_their_ranges_are_accepted(tmp_path: Path) -> None:
    """The smallest accepted values work: one symbol, frames of one event, no pings."""
    path = tmp_path / "small.jsonl"
    result = run_replay(
        "--record-to", str(path), "--events", "3", "--symbols", "1", "--min-batch", "1",
        "--max-batch", "1", "--ping-interval", "0", "--port", "65535", "--accept-key", "k",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert list(synth.read_recording(path)) == list(synth.generate_frames(1, 1, 3, 1, 1))
