"""The API key out of the workers' reach, tried for real by a worker that snoops (snoop.py).

The balancer runs as an unprivileged user, as the packaged unit runs it, with its workers under
the same uid; the snooping worker tries the key file, the credentials directory, the balancer's
/proc files, memory, fds and root, ptrace, process_vm_readv, and every other process it can
see. Nothing it finds may hold the key. A control run with key_isolation = "off" finds the key,
so the test does see a leak when there is one.

Where the kernel refuses the workers a user namespace (here: the balancer runs in a user
namespace whose user.max_user_namespaces is 0), "auto" says so once and starts the workers
without the cover, and "required" refuses to start (exit 69).
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
from collections.abc import Callable, Iterator
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


def owned(path: Path, mode: int, owner: int = USER) -> Path:
    os.chown(path, owner, owner)
    path.chmod(mode)
    return path


# Runs a command as root of a new user namespace in which no further one may be made.
NO_USER_NAMESPACES = [
    *("unshare", "--user", "--map-root-user", "sh", "-c"),
    'echo 0 >/proc/sys/user/max_user_namespaces && exec "$@"',
    "sh",
]
AS_USER = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups"]


def snoop(
    home: Path, *, key_in: str, isolation: str = "auto", prefix: list[str] = AS_USER
) -> tuple[list[dict], str]:
    owner = USER if prefix is AS_USER else 0
    """Run the balancer (under ``prefix``) with snooping workers; return their reports and
    the balancer's log."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASSIVE", "POLYGON"))}
    env["PYTHONPATH"] = str(REPO)
    env["SNOOP_REPORT"] = str(home / "report-{worker}.json")
    if key_in == "credential":
        credentials = home / "credentials"  # as systemd's LoadCredential= makes it
        credentials.mkdir()
        key_file = credentials / "api-key"
        key_file.write_text(KEY + "\n")
        owned(key_file, 0o400, owner)
        owned(credentials, 0o500, owner)
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
                    *prefix,
                    *(sys.executable, "-m", "tradebalancer", "--config", str(config)),
                    *("run", "feed"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        reports = [home / f"report-{worker}.json" for worker in range(WORKERS)]
        stop_when(balancer, log, lambda: all(report.exists() for report in reports))
    assert "subscription confirmed" in log.read_text()  # the key was used: in memory
    return [json.loads(r.read_text()) for r in reports], log.read_text()


def stop_when(balancer: subprocess.Popen[bytes], log: Path, ready: Callable[[], bool]) -> None:
    """Wait (60 s at most) until the balancer streams ("events/s" in its log) and ``ready``
    holds, then SIGTERM it: it must exit 0. Killed if it does not."""
    try:
        deadline = time.monotonic() + 60
        while not ("events/s" in log.read_text() and ready()):
            assert balancer.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        balancer.send_signal(signal.SIGTERM)
        assert balancer.wait(30) == 0, log.read_text()
    finally:
        if balancer.poll() is None:
            balancer.kill()
            balancer.wait()


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
        assert all(report["no_new_privs"] for report in reports)  # nothing undoes the cover
    else:
        assert "workers start without access" not in log  # no file to hide


@pytest.mark.timeout(120)
def test_the_snoop_does_find_a_key_left_in_reach(home: Path) -> None:
    """The control: with key_isolation = "off" the credential file is the workers' to read."""
    reports, log = snoop(home, key_in="credential", isolation="off")
    assert all(KEY in json.dumps(report) for report in reports)
    assert "workers start without access" not in log
    assert all(not report["balancer's environ"]["ok"] for report in reports)  # still sealed


@pytest.fixture
def root_home() -> Iterator[Path]:
    """A directory for a balancer that runs as root of a user namespace of its own."""
    path = Path(tempfile.mkdtemp(prefix="tb-keyguard-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# A worker that copies the key file, if it can, then reads its pipes to end of file.
PEEKER = (
    "import os, sys\n"
    "try:\n"
    "    found = open(os.environ['PEEK']).read()\n"
    "except OSError as exc:\n"
    "    found = str(exc)\n"
    "open('peek-' + os.environ['TRADEBALANCER_WORKER'], 'w').write(found)\n"
    "fds = [int(fd) for fd in os.environ['TRADEBALANCER_FDS'].split(',')]\n"
    "while fds:\n"
    "    fds = [fd for fd in fds if os.read(fd, 1 << 16)]\n"
)


def without_user_namespaces(
    home: Path, url: str, isolation: str
) -> tuple[subprocess.Popen[bytes], Path]:
    """Start the balancer as root of a user namespace that may not make another, its key in a
    credential file, with workers that peek at it."""
    credentials = home / "credentials"
    credentials.mkdir(mode=0o500)
    (credentials / "api-key").write_text(KEY + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASSIVE", "POLYGON"))}
    env.update(
        PYTHONPATH=str(REPO),
        CREDENTIALS_DIRECTORY=str(credentials),
        PEEK=str(credentials / "api-key"),
    )
    config = home / "tradebalancer.toml"
    config.write_text(
        f'[feeds.feed]\nurl = "{url}"\n'
        'api_key_file = "${CREDENTIALS_DIRECTORY}/api-key"\n'
        f'key_isolation = "{isolation}"\nworking_directory = "{home}"\n'
        f"command = {json.dumps([WORKER_PYTHON, '-c', PEEKER])}\nstats_interval = 0.5\n"
    )
    log = home / "balancer.log"
    balancer = [sys.executable, "-m", "tradebalancer", "--config", str(config), "run", "feed"]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*NO_USER_NAMESPACES, *balancer], stdout=out, stderr=subprocess.STDOUT, env=env
        )
    return process, log


@pytest.mark.timeout(120)
def test_without_user_namespaces_auto_says_so_once_and_runs(root_home: Path) -> None:
    """No namespace for the workers: one warning that says why and what to do, then the
    service runs; its workers can read the key file, as the warning says."""
    with ReplayServer(ReplayOptions(accept_keys=frozenset({KEY}), rate=2000)) as server:
        balancer, log = without_user_namespaces(root_home, server.url, "auto")
        stop_when(balancer, log, lambda: True)
    text = log.read_text()
    warning = (
        f"the workers would see {root_home / 'credentials'}: no user and mount namespace of "
        "their own here (unshare(CLONE_NEWUSER): No space left on device)"
    )
    assert text.count(warning) == 1, text
    assert 'or set key_isolation = "off" to silence this' in text
    assert (root_home / "peek-0").read_text().strip() == KEY


@pytest.mark.timeout(60)
def test_without_user_namespaces_required_refuses_to_start(root_home: Path) -> None:
    """key_isolation = "required": exit 69 before any worker, with the reason and the way out."""
    unused = "ws://127.0.0.1:9/stocks"  # never reached
    balancer, log = without_user_namespaces(root_home, unused, "required")
    assert balancer.wait(50) == 69, log.read_text()
    text = log.read_text()
    assert "no user and mount namespace of their own here" in text
    assert 'or set key_isolation = "auto"' in text
    assert "started" not in text and not (root_home / "peek-0").exists()


def test_every_command_seals_the_process_before_anything_else() -> None:
    """check-config --require-key reads the key too, and the environment may hold it from the
    start: the seal comes first, whatever the command and however it ends."""
    code = (
        "import prctl\nfrom tradebalancer.cli import main\n"
        "main(['check-config', '--require-key', '--config', '/nonexistent.toml'])\n"
        "print('dumpable', prctl.get_dumpable())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert "dumpable False" in result.stdout, result
