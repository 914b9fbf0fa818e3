"""The API key out of the workers' reach, tried for real by a worker that snoops (snoop.py).

The balancer runs as an unprivileged user, as the packaged unit runs it, with its workers under
the same uid; the snooping worker tries the key file, the credentials directory, the balancer's
/proc files, memory, fds and root, ptrace, process_vm_readv, and every other process it can
see. Nothing it finds may hold the key. A control run with key_isolation = "off" finds the key,
so the test does see a leak when there is one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tradebalancer.replay import ReplayOptions, ReplayServer

REPO = Path(__file__).resolve().parent.parent
SNOOP = REPO / "tests" / "snoop.py"
KEY = "Kq7-snoop-me-if-you-can-8c1f2e"
USER = 4242  # a uid of its own, like the unit's dynamic user
# The workers' interpreter: the system's, which any user may run (the test's own may live under
# a home directory only its owner enters; snoop.py needs nothing but the standard library).
WORKER_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
WORKERS = 2

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="needs root and setpriv(1) to run the balancer as another user",
)


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory the unprivileged user owns (pytest's own are root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="tb-keyguard-", dir="/tmp"))
    path.chmod(0o755)
    os.chown(path, USER, USER)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def owned(path: Path, mode: int) -> Path:
    os.chown(path, USER, USER)
    path.chmod(mode)
    return path


def snoop(home: Path, *, key_in: str, isolation: str = "auto") -> tuple[list[dict], str]:
    """Run the balancer with snooping workers; return their reports and the balancer's log."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASSIVE", "POLYGON"))}
    env["PYTHONPATH"] = str(REPO)
    env["SNOOP_REPORT"] = str(home / "report-{worker}.json")
    if key_in == "credential":
        credentials = home / "credentials"  # as systemd's LoadCredential= makes it
        credentials.mkdir()
        key_file = credentials / "api-key"
        key_file.write_text(KEY + "\n")
        owned(key_file, 0o400)
        owned(credentials, 0o500)
        env["CREDENTIALS_DIRECTORY"] = str(credentials)
        env["SNOOP_PATHS"] = f"{credentials}:{key_file}"
        key_line = 'api_key_file = "${CREDENTIALS_DIRECTORY}/api-key"'
    else:  # the key only in the balancer's environment (EnvironmentFile=)
        env["MASSIVE_API_KEY"] = KEY
        key_line = 'api_key_file = ""'
    with ReplayServer(ReplayOptions(accept_keys=frozenset({KEY}), rate=2000)) as server:
        config = home / "tradebalancer.toml"
        config.write_text(
            f'[feeds.feed]\nurl = "{server.url}"\n{key_line}\npipes = 3\nworkers = {WORKERS}\n'
            f'working_directory = "{home}"\nkey_isolation = "{isolation}"\n'
            f'command = ["{WORKER_PYTHON}", "{SNOOP}"]\nstats_interval = 0.5\n'
        )
        log = home / "balancer.log"
        with open(log, "wb") as out:
            balancer = subprocess.Popen(
                [
                    *("setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups"),
                    *(sys.executable, "-m", "tradebalancer", "--config", str(config)),
                    *("run", "feed"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        try:
            reports = [home / f"report-{worker}.json" for worker in range(WORKERS)]
            deadline = time.monotonic() + 60
            while not (all(r.exists() for r in reports) and "events/s" in log.read_text()):
                assert balancer.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            assert "subscription confirmed" in log.read_text()  # the key was used: in memory
            balancer.send_signal(signal.SIGTERM)
            assert balancer.wait(30) == 0, log.read_text()
        finally:
            if balancer.poll() is None:
                balancer.kill()
                balancer.wait()
    return [json.loads(r.read_text()) for r in reports], log.read_text()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("key_in", ["credential", "environment"])
def test_a_worker_of_the_same_user_finds_the_key_nowhere(home: Path, key_in: str) -> None:
    """The key was readable in the balancer's /proc/PID/environ and its key file."""
    reports, log = snoop(home, key_in=key_in)
    for report in reports:
        assert KEY not in json.dumps(report), [k for k, v in report.items() if KEY in str(v)]
        for closed in ("environ", "memory", "fds", "cwd", "maps"):
            assert not report[f"balancer's {closed}"]["ok"], report[f"balancer's {closed}"]
        for closed in ("ptrace attach", "ptrace seize", "process_vm_readv"):
            assert not report[closed]["ok"], report[closed]
        assert report["balancer's cmdline"]["ok"]  # what ps shows: never the key anyway
    if key_in == "credential":
        assert f"workers start without access to {home / 'credentials'}" in log
        assert all(report["uid"] == 65534 for report in reports)  # no uid mapped inside
    else:
        assert "workers start without access" not in log  # no file to hide


@pytest.mark.timeout(120)
def test_the_snoop_does_find_a_key_left_in_reach(home: Path) -> None:
    """The control: with key_isolation = "off" the credential file is the workers' to read."""
    reports, log = snoop(home, key_in="credential", isolation="off")
    assert all(KEY in json.dumps(report) for report in reports)
    assert "workers start without access" not in log
    assert all(not report["balancer's environ"]["ok"] for report in reports)  # still sealed
