"""README's examples, taken from README.md itself and run together as a user would.

The "Configure" table and the reader snippet of "The pipe protocol" are read out of README.md
verbatim; only what must differ on a test machine is replaced (the feed's URL, the worker's
path, the snippet's ``...``). They crashed together once: the table's ``--shard N`` with a
snippet that took its trailing arguments for fds read shard numbers as pipes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from tradebalancer.replay import ReplayOptions, ReplayServer, synth
from tradebalancer.routing import pipe_for

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
KEY = "readme-key-1234"


def code_block(heading: str, language: str) -> str:
    """The first ``language`` code block after the line ``heading`` in README.md."""
    section = README.split(f"\n{heading}\n", 1)[1]
    match = re.search(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)
    assert match is not None, f"no {language} block after {heading!r}"
    return match.group(1)


# The snippet's "..." becomes a record of (worker, shard argument, fd, message).
RECORD = """\
import json, os, sys
_name = "worker-" + os.environ["TRADEBALANCER_WORKER"]
_out = open(os.path.join(os.environ["RECORDS"], _name), "a")
def record(fd, trade, message):
    _out.write(json.dumps([sys.argv[1:], fd, message.decode()]) + "\\n")
    _out.flush()
"""


@pytest.mark.timeout(120)
def test_the_configure_table_and_the_reader_snippet_run_together(tmp_path: Path) -> None:
    """Every event reaches exactly one worker, on its pipe, and each worker sees its shard."""
    table = code_block("### Configure", "toml")
    snippet = code_block("In Python, use `tradebalancer.reader`:", "python")
    assert "        ...\n" in snippet and "fds_from_environment" in snippet
    worker = tmp_path / "worker"
    worker.write_text(
        f"#!{sys.executable}\n"
        + RECORD
        + snippet.replace("        ...\n", "        record(fd, trade, message)\n")
    )
    worker.chmod(0o755)
    records = tmp_path / "records"
    records.mkdir()
    events, seed = 3000, 5
    options = ReplayOptions(accept_keys=frozenset({KEY}), events=events, seed=seed)
    with ReplayServer(options) as server:
        config = tmp_path / "tradebalancer.toml"
        config.write_text(
            re.sub(r'url = "[^"]*"', f'url = "{server.url}"', table).replace(
                "/opt/strategy/bin/worker", str(worker)
            )
            + f'api_key_file = ""\nworking_directory = "{tmp_path}"\n'
        )
        env = {**os.environ, "MASSIVE_API_KEY": KEY, "RECORDS": str(records)}
        env["PYTHONPATH"] = str(REPO)
        log = tmp_path / "balancer.log"
        with open(log, "wb") as out:
            balancer = subprocess.Popen(
                [sys.executable, "-m", "tradebalancer", "--config", str(config), "run", "feed"],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            deadline = time.monotonic() + 60
            while received(records) < events:
                assert balancer.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.1)
            balancer.send_signal(signal.SIGTERM)
            assert balancer.wait(30) == 0, log.read_text()[-3000:]
        finally:
            if balancer.poll() is None:
                balancer.kill()
    pipes = int(re.search(r"^pipes = (\d+)", table, flags=re.MULTILINE).group(1))  # type: ignore[union-attr]
    workers = int(re.search(r"^workers = (\d+)", table, flags=re.MULTILINE).group(1))  # type: ignore[union-attr]
    expected: dict[int, list[str]] = {p: [] for p in range(pipes)}
    for frame in synth.generate_frames(seed=seed, count_events=events):
        for event in synth.split_events(frame):
            expected[pipe_for(orjson.loads(event)["sym"].encode(), pipes)].append(event.decode())
    got: dict[int, list[str]] = {p: [] for p in range(pipes)}
    for index in range(workers):
        first = index * pipes // workers  # the worker's block of pipes, fds 3, 4, ... in order
        for line in (records / f"worker-{index}").read_text().splitlines():
            argv, fd, message = orjson.loads(line)
            assert argv[:2] == ["--shard", str(index)], argv
            got[first + fd - 3].append(message)
    assert got == expected


def received(records: Path) -> int:
    return sum(len(path.read_text().splitlines()) for path in records.iterdir())
