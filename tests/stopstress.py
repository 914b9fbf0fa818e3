"""SIGTERM at random moments of a balancer's life, and what must follow every time.

A trial starts a real balancer against a feed in a chosen state (tests/hostile.py: stalled at
TCP, TLS, the upgrade, the greeting, auth or the subscription; streaming; gone; or with workers
that keep dying), waits for a chosen moment plus a random delay, sends SIGTERM, and checks:

* the balancer exits 0 within ``bound`` seconds of the signal,
* its log says "SIGTERM received: stopping",
* every worker it started is gone.

A SIGTERM that lands before the process could install its handlers (its SigCgt, read just
before the kill, does not have SIGTERM) may end it by the default action instead: that is the
documented start-up window, counted apart (``early``), never a failure.

Used by tests/test_stopstress.py on the host and by tests/ktls_guest.py in the Debian guest
(kernel TLS), so it depends on nothing but the tradebalancer package, websockets and hostile.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hostile import HostileFeed, Script

from tradebalancer.replay import synth

# Where to aim, and how: (the server step or log line to wait for, the random delay after it).
SCENARIOS: dict[str, dict[str, object]] = {
    "start-up": {"after": "spawn", "delay": (0.0, 0.8)},
    "tcp-connect": {"stall_at": "connect", "after": "log:connecting", "delay": (0.0, 0.3)},
    "tls-handshake": {"stall_at": "tls", "after": "tls", "delay": (0.0, 0.3)},
    "hand-off": {"stall_at": "upgrade", "after": "tls", "delay": (0.0, 0.2)},
    "upgrade": {"stall_at": "upgrade", "after": "upgrade", "delay": (0.0, 0.3)},
    "greeting": {"stall_at": "greeting", "after": "greeting", "delay": (0.0, 0.3)},
    "auth": {"stall_at": "auth", "after": "auth", "delay": (0.0, 0.3)},
    "subscribe": {"stall_at": "subscribe", "after": "subscribe", "delay": (0.0, 0.3)},
    "streaming": {"after": "stream", "delay": (0.0, 0.5)},
    "backoff": {"gone": True, "after": "log:reconnecting in", "delay": (0.0, 0.6)},
    "respawn": {"dying_workers": True, "after": "log:restarted", "delay": (0.0, 0.4)},
    "stats-tick": {"stats_interval": 0.02, "after": "stream", "delay": (0.0, 0.3)},
}

_READING_WORKER = (
    "import os, select, sys\n"
    "fds = [int(arg) for arg in sys.argv[1:]]\n"
    "while fds:\n"
    "    for fd in select.select(fds, [], [])[0]:\n"
    "        if not os.read(fd, 1 << 16):\n"
    "            fds.remove(fd)\n"
)
_DYING_WORKER = (
    "import os, select, sys, time\n"
    "fds = [int(arg) for arg in sys.argv[1:]]\n"
    "end = time.monotonic() + 0.1\n"
    "while time.monotonic() < end:\n"
    "    for fd in select.select(fds, [], [], 0.01)[0]:\n"
    "        os.read(fd, 1 << 16)\n"
)
_RECEIVED = re.compile(r"SIGTERM received( during start-up)?: stopping")
_STARTED = re.compile(r"worker \d+ (?:started|restarted) \(pid (\d+)")


@dataclass
class Outcome:
    """What one trial saw."""

    scenario: str
    delay: float
    exit_code: int | None = None
    seconds: float | None = None  # from the SIGTERM to the exit
    logged: bool = False
    early: bool = False  # sent before the handler was in: the default action may end it
    workers: list[int] = field(default_factory=list)
    workers_left: list[int] = field(default_factory=list)
    log_tail: str = ""
    missed: str | None = None  # the chosen moment never came: no signal was sent
    kernel_tls: bool = False  # the balancer logged a connection over kernel TLS

    def problems(self, bound: float) -> list[str]:
        """What went wrong, in words; empty if the stop was honoured."""
        if self.missed is not None:
            return [f"the moment {self.missed!r} never came (exit {self.exit_code})"]
        if self.early and self.exit_code == -signal.SIGTERM:
            return []
        found = []
        # Workers that die every 0.1 s leave events in their pipes: exit 75, and the last line
        # counts them. Anywhere else 75 would be events lost by a reading worker.
        leaves_events = self.scenario == "respawn" and "not delivered" in self.log_tail
        if self.exit_code != 0 and not (self.exit_code == 75 and leaves_events):
            found.append(f"exit {self.exit_code}")
        if self.seconds is None or self.seconds > bound:
            found.append(f"stopped after {self.seconds} s (bound {bound} s)")
        if not self.logged:
            found.append('no "SIGTERM received ...: stopping" in the log')
        if self.workers_left:
            found.append(f"workers left running: {self.workers_left}")
        return found


@dataclass
class Setup:
    """How trials run here: the balancer command, the feed's TLS, the worker command."""

    balancer: Sequence[str]  # argv up to and excluding "--config"
    certfile: str | None = None  # serve wss:// with this certificate
    keyfile: str | None = None
    ca_file: str | None = None
    tls: str = "auto"
    env: dict[str, str] = field(default_factory=dict)
    spawn_timeout: float = 30.0  # for the chosen moment to come (the guest is slow)


def _caught(pid: int) -> bool:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    except OSError:
        pass
    return False


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


@contextlib.contextmanager
def _stalled_connect() -> Iterator[int]:
    """A port whose accept queue is full, so that a new connect stays in SYN_SENT."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(2):  # backlog 0 admits one; more SYNs are then dropped
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    time.sleep(0.05)
    try:
        yield port
    finally:
        for sock in fillers:
            sock.close()
        listener.close()


def _frames(count: int, seed: int) -> list[bytes]:
    return list(synth.generate_frames(seed=seed, count_events=count, min_batch=5, max_batch=20))


def run_trial(setup: Setup, scenario: str, rng: random.Random, directory: Path) -> Outcome:
    """Run one trial of ``scenario`` in ``directory``; return what it saw."""
    spec = SCENARIOS[scenario]
    low, high = spec["delay"]  # type: ignore[misc]
    outcome = Outcome(scenario, round(rng.uniform(low, high), 3))  # type: ignore[arg-type]
    stall = spec.get("stall_at")
    script = Script(
        stall_at=None if stall == "connect" else stall,  # type: ignore[arg-type]
        frames=_frames(400, rng.randrange(1 << 30)) * 50,
        frame_interval=0.002,
        close_after_stream=False,
    )
    with contextlib.ExitStack() as stack:
        feed = stack.enter_context(
            HostileFeed(script, certfile=setup.certfile, keyfile=setup.keyfile)
        )
        url = feed.url
        if stall == "connect":
            port = stack.enter_context(_stalled_connect())
            url = url.replace(f":{feed.port}/", f":{port}/")
        if spec.get("gone"):
            feed.close()
        process, log_path = _start(setup, directory, url, spec)
        stack.callback(_reap, process)
        if not _wait(process, log_path, feed, str(spec["after"]), setup.spawn_timeout):
            outcome.missed = str(spec["after"])
            outcome.log_tail = _read(log_path)[-3000:]
            outcome.exit_code = process.poll()
            return outcome
        time.sleep(outcome.delay)
        outcome.early = not _caught(process.pid)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            outcome.exit_code = process.wait(60)
            outcome.seconds = round(time.monotonic() - sent, 3)
        except subprocess.TimeoutExpired:
            pass
        log = _read(log_path)
        outcome.logged = _RECEIVED.search(log) is not None
        outcome.kernel_tls = "(TLS: kernel)" in log
        outcome.workers = [int(pid) for pid in _STARTED.findall(log)]
        outcome.workers_left = [pid for pid in outcome.workers if _alive(pid)]
        outcome.log_tail = log[-3000:]
    return outcome


def _start(
    setup: Setup, directory: Path, url: str, spec: dict[str, object]
) -> tuple[subprocess.Popen[bytes], Path]:
    # Workers that start in milliseconds (no site, no imports), so a stop measures the
    # balancer, not a worker's start-up: read to end of file, or for a tenth of a second.
    code = _DYING_WORKER if spec.get("dying_workers") else _READING_WORKER
    worker = ["{{ python }}", "-S", "-c", code]
    command = json.dumps(worker)
    ca = f'ca_file = "{setup.ca_file}"\n' if setup.ca_file and url.startswith("wss") else ""
    config = directory / "tradebalancer.toml"
    config.write_text(
        f"""
[feeds.feed]
url = "{url}"
subscribe = ["T.*"]
api_key_file = ""
pipes = 3
workers = 2
pipe_size = 65536
working_directory = "{directory}"
command = {command}
pass_fds = "append"
tls = "{setup.tls if url.startswith("wss") else "auto"}"
{ca}connect_timeout = 30
stats_interval = {spec.get("stats_interval", 1.0)}
reconnect.initial = 0.2
reconnect.max = 0.5
worker_restart.initial = 0.02
worker_restart.max = 0.05
"""
    )
    log_path = directory / "balancer.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASSIVE", "POLYGON"))}
    env.update(setup.env)
    env["MASSIVE_API_KEY"] = "stress-test-key"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*setup.balancer, "--verbose", "--config", str(config), "run", "feed"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return process, log_path


def _wait(
    process: subprocess.Popen[bytes], log: Path, feed: HostileFeed, after: str, timeout: float
) -> bool:
    """Wait for the moment ``after`` names: spawn, a server step, or a log line."""
    if after == "spawn":
        return True
    deadline = time.monotonic() + timeout
    if not after.startswith("log:"):
        return feed.wait_for(after, timeout) and process.poll() is None
    needle = after.removeprefix("log:")
    while needle not in _read(log):
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _reap(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


def run_trials(
    setup: Setup,
    counts: dict[str, int],
    *,
    seed: int,
    parallel: int = 3,
    progress: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Run ``counts[scenario]`` trials of each scenario, ``parallel`` at a time, seeded."""
    rng = random.Random(seed)
    plan = [
        (name, random.Random(rng.randrange(1 << 30)))
        for name, n in counts.items()
        for _ in range(n)
    ]
    rng.shuffle(plan)
    with tempfile.TemporaryDirectory(prefix="stopstress-") as root:

        def one(index: int) -> Outcome:
            name, trial_rng = plan[index]
            directory = Path(root) / f"{index:04d}-{name}"
            directory.mkdir()
            outcome = run_trial(setup, name, trial_rng, directory)
            if progress is not None:
                progress(outcome)
            return outcome

        with ThreadPoolExecutor(max_workers=parallel) as pool:
            return list(pool.map(one, range(len(plan))))


def summary(outcomes: Sequence[Outcome], bound: float) -> dict[str, object]:
    """Per scenario: trials, early ones, failures, the slowest stop; and the failures in full."""
    table: dict[str, dict[str, object]] = {}
    for outcome in outcomes:
        row = table.setdefault(
            outcome.scenario, {"trials": 0, "early": 0, "failed": 0, "slowest": 0.0}
        )
        row["trials"] += 1  # type: ignore[operator]
        row["early"] += int(outcome.early)  # type: ignore[operator]
        row["failed"] += int(bool(outcome.problems(bound)))  # type: ignore[operator]
        row["slowest"] = max(row["slowest"], outcome.seconds or 0.0)  # type: ignore[type-var]
    failures = [
        asdict(outcome) | {"problems": outcome.problems(bound)}
        for outcome in outcomes
        if outcome.problems(bound)
    ]
    return {"scenarios": table, "failures": failures}


if __name__ == "__main__":  # pragma: no cover - a quick look by hand: wss, 2 of each
    from tlsca import make_ca

    with tempfile.TemporaryDirectory() as ca_directory:
        ca, cert, key = make_ca(Path(ca_directory))
        result = run_trials(
            Setup(
                balancer=[sys.executable, "-m", "tradebalancer"],
                certfile=str(cert),
                keyfile=str(key),
                ca_file=str(ca),
            ),
            {name: int(sys.argv[2]) if len(sys.argv) > 2 else 2 for name in SCENARIOS},
            seed=int(sys.argv[1]) if len(sys.argv) > 1 else 1,
        )
    report = summary(result, 2.0)
    print(json.dumps(report["scenarios"], indent=1))
    for failure in report["failures"]:
        print(
            failure["scenario"], failure["delay"], failure["problems"], failure["log_tail"][-800:]
        )
