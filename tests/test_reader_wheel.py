"""The worker library alone: its own wheel, installed where nothing else is, reading real pipes.

packaging/build-reader.sh builds ``tradebalancer-reader``; the test installs it into a new
virtual environment without the system's or the project's packages (no network, no index) and
runs a worker there on a real pipe that this process writes the balancer's format to.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from tradebalancer.reader.format import FDS_VARIABLE, header

REPO = Path(__file__).resolve().parent.parent
EVENTS = [b'{"ev":"T","sym":"AAPL","p":1}', b'{"ev":"T","sym":"MSFT","p":2}' * 3]


@pytest.fixture(scope="module")
def reader_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a new venv holding the reader's wheel and nothing else."""
    base = tmp_path_factory.mktemp("reader-wheel")
    out = base / "out"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "TB_READER_BUILD_DIR": str(base / "build"),
        "TB_READER_OUT_DIR": str(out),
    }
    built = subprocess.run(
        ["sh", str(REPO / "packaging" / "build-reader.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = out.glob("tradebalancer_reader-*.whl")
    target = base / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(target)
    python = target / "bin" / "python"
    installed = subprocess.run(
        [python, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return python


def _clean_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "COVERAGE"))}


@pytest.mark.timeout(600)
def test_the_wheel_holds_the_reader_alone_and_needs_nothing_else(reader_python: Path) -> None:
    """Installed alone, the reader imports, with its C loop, and the balancer's deps are absent."""
    code = textwrap.dedent(
        """
        import importlib.util, json
        import tradebalancer.reader as reader
        from tradebalancer.reader import framing
        print(json.dumps({
            "c_loop": framing._parse_in_c is not None,
            "missing": [name for name in ("websockets", "orjson", "jinja2", "prctl", "sdnotify",
                                          "tradebalancer.service", "tradebalancer.errors")
                        if importlib.util.find_spec(name) is None],
        }))
        """
    )
    result = subprocess.run(
        [reader_python, "-I", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env=_clean_environment(),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        '{"c_loop": true, "missing": ["websockets", "orjson", "jinja2", "prctl", "sdnotify", '
        '"tradebalancer.service", "tradebalancer.errors"]}'
    )


@pytest.mark.timeout(600)
def test_a_worker_on_the_reader_alone_reads_a_real_pipe(reader_python: Path) -> None:
    """A worker with only the reader reads every event of a real pipe, fds from the environment."""
    read_fd, write_fd = os.pipe()
    code = textwrap.dedent(
        """
        from tradebalancer.reader import Reader, fds_from_environment
        with Reader(fds_from_environment()) as reader:
            for message in reader:
                print(message.decode())
        """
    )
    env = _clean_environment() | {FDS_VARIABLE: str(read_fd)}
    worker = subprocess.Popen(
        [reader_python, "-I", "-c", code], stdout=subprocess.PIPE, env=env, pass_fds=(read_fd,)
    )
    os.close(read_fd)
    os.write(write_fd, b"".join(header(len(event)) + event for event in EVENTS))
    os.close(write_fd)
    output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0
    assert output.decode().splitlines() == [event.decode() for event in EVENTS]


@pytest.mark.timeout(600)
def test_the_jetstream_source_needs_only_nats_py_beside_the_reader(
    reader_python: Path, tmp_path: Path
) -> None:
    """Without nats-py the source says which extra to install; with it, it reads a real server."""
    from natsserver import NatsServer

    code = textwrap.dedent(
        """
        import sys
        from tradebalancer.reader import ReaderError
        from tradebalancer.reader.jetstream import JetStreamSource
        source = JetStreamSource([sys.argv[1]], stream="nope", durable="d", partitions=[0])
        try:
            with source:
                pass
        except ReaderError as exc:
            print(exc)
        """
    )
    server = NatsServer(tmp_path / "nats").start()
    try:

        def run() -> str:
            result = subprocess.run(
                [reader_python, "-I", "-c", code, server.url],
                capture_output=True,
                text=True,
                timeout=60,
                env=_clean_environment(),
                check=False,
            )
            assert result.returncode == 0, result.stderr
            return result.stdout

        assert "pip install 'tradebalancer-reader[jetstream]'" in run()
        wheels = tmp_path / "wheels"
        for argv in (
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", wheels],
            [reader_python, "-m", "pip", "install", "--quiet", "--no-index", "-f", wheels],
        ):
            done = subprocess.run(
                [*argv, "nats-py"], capture_output=True, text=True, timeout=300, check=False
            )
            assert done.returncode == 0, done.stderr
        assert f"no JetStream stream 'nope' at {server.url}" in run()
    finally:
        server.stop()


@pytest.mark.timeout(600)
def test_the_jetstream_extra_brings_nkeys_for_creds_and_seed_files(reader_python: Path) -> None:
    """The wheel's jetstream extra asks for nats-py with nkeys, which .creds and seeds need."""
    from importlib.metadata import PathDistribution

    (info,) = (reader_python.parent.parent / "lib").glob(
        "python3*/site-packages/tradebalancer_reader-*.dist-info"
    )
    requires = PathDistribution(info).requires or []
    assert 'nats-py[nkeys]>=2.10; extra == "jetstream"' in requires
