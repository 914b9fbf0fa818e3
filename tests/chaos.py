"""The chaos soak: a hostile feed, workers killed and stopped, the balancer stopped and restarted.

One ``HostileFeed`` (tests/hostile.py) serves every connection with a script of its own, drawn
from the seed: the handshake's variants (confirmations grouped, reversed, in another case, or
none; a refused channel; pings before the greeting), stalls at any step of it, and once
streaming, a random mix of whole frames, fragmented ones (with pings between the fragments),
frames dribbled a byte at a time, status messages, pings and frames that are not JSON; it ends
with a close frame (1000, 1001, or 1008 after "max_connections"), a TCP FIN, a reset in the
middle of a frame, or an open stream that lasts until the balancer goes. Every event carries a
sequence number ``q``, increasing over the whole soak.

Meanwhile a loop plays with the balancer's three workers (SIGKILL, SIGSTOP, SIGCONT), and after a
random life, from its first moments to a dozen seconds, SIGTERMs the balancer, sometimes with a
worker still stopped, and starts the next one. Each worker (tests/chaosworker.py) appends every
event it reads to a file of its own for that run, before it reads the next.

What is checked, per run and over the soak (``Soak.problems``):

* exactly once: no event is recorded twice;
* in order: each worker's events come in the order the feed sent them, so each symbol's too;
* routing: a worker records only events the feed sent whole with a symbol that maps to it
  (routing.pipe_for);
* nothing lost in silence: between two events a worker recorded, every event the feed sent it
  on the later one's connection was received before it, and must be recorded too, except one
  per death of that worker in between (the message it held: each worker writes "#start" when
  it starts, so the deaths are in its file);
* the final line is true: per worker, recorded <= delivered <= recorded + deaths, and
  delivered + not delivered <= sent; the exit status is 75 if anything is not delivered,
  else 0;
* a connection the feed closed (a close frame, a FIN) and the balancer left for the next one
  was read to its end: its events a worker did not record are at most that worker's not
  delivered count plus its deaths;
* every SIGTERM is logged and honoured within ``2 * drain_timeout + 5`` seconds (README), and
  once the balancer has exited no process of the run is left (looked for at once).

An event sent after the last one a worker recorded from its connection was either never
received (it was in the socket when the connection ended) or left in the pipe at the stop,
which the final line counts; it must not count more than there are.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hostile import Action, HostileFeed, Script, status

from tradebalancer.routing import pipe_for

WORKERS = 3  # and as many pipes: worker i reads pipe i
DRAIN_TIMEOUT = 1.5
STOP_BOUND = 2 * DRAIN_TIMEOUT + 5 + 2.0  # README's bound, and slack for a loaded machine
SYMBOLS = [f"C{i:02d}" for i in range(40)]
HERE = Path(__file__).resolve().parent

ENDINGS = ["stream", "close-1000", "close-1001", "fin", "reset", "max-connections"]
CLEAN_ENDINGS = {"close-1000", "close-1001", "fin", "max-connections"}
STALLS = ["tls", "upgrade", "greeting", "auth", "subscribe"]
STREAM = ["text", "fragments", "fragments+pings", "dribble", "status", "ping", "not-json"]

_STARTED = re.compile(r"worker (\d+) (?:started|restarted) \(pid (\d+)")
_DIED = re.compile(r"worker (\d+) (?:\(pid \d+\) )?killed by (SIG\w+)")
_ALL = re.compile(r"stopped: all [\d,]+ events? delivered \((.*)\)")
_SOME = re.compile(r"stopped: [\d,]+ events? of [\d,]+ not delivered, .*\((.*)\)")
_SHARE = re.compile(r"worker (\d+) ([\d,]+)(?: delivered, ([\d,]+) not delivered)?")


@dataclass
class Run:
    """One balancer's life."""

    number: int
    connections: range = range(0)
    life: float = 0.0
    stopped_workers: int = 0  # workers left stopped when the SIGTERM went
    exit_code: int | None = None
    stop_seconds: float | None = None
    log: str = ""
    leftovers: list[str] = field(default_factory=list)  # processes of the run after its exit


@dataclass
class Soak:
    """What the soak did and saw."""

    seed: int
    runs: list[Run] = field(default_factory=list)
    actions: Counter[str] = field(default_factory=Counter)  # what the feed and the loop did
    problems: list[str] = field(default_factory=list)
    events_sent: int = 0
    events_recorded: int = 0
    lost_to_deaths: int = 0
    not_delivered: int = 0

    def summary(self) -> str:
        """A few lines for the test's output."""
        stops = [run.stop_seconds for run in self.runs if run.stop_seconds is not None]
        codes = Counter(run.exit_code for run in self.runs)
        return (
            f"seed {self.seed}: {len(self.runs)} runs, "
            f"{max((r.connections.stop for r in self.runs), default=0)} connections, "
            f"{self.events_sent:,} events sent whole, {self.events_recorded:,} recorded, "
            f"{self.not_delivered:,} counted as not delivered, {self.lost_to_deaths} lost with a "
            f"dying worker; exits {dict(codes)}; slowest stop {max(stops, default=0):.2f} s\n"
            f"  {dict(sorted(self.actions.items()))}"
        )


class Feed:
    """The scripts, one per connection, and the events in them."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._numbers = itertools.count()  # next() is atomic: two threads never share one
        self.actions: Counter[str] = Counter()
        self._lock = threading.Lock()  # connection threads count actions
        self.ended: dict[int, str] = {}  # connection -> the ending it reached

    def _count(self, action: str) -> None:
        with self._lock:
            self.actions[action] += 1

    def script(self, index: int) -> Script:
        """Connection ``index``'s script (called under the server's lock, in index order)."""
        rng = random.Random(f"{self.seed}/{index}")
        script = Script(
            confirm=rng.choice(["each", "each", "grouped", "casefold", "reversed", "none"]),
            refuse=frozenset({"Q.*"}) if rng.random() < 0.15 else frozenset(),
            close_after_stream=False,
        )
        if rng.random() < 0.15:
            script.before_greeting = [("ping", b"early")] * rng.randint(1, 3)
        # Every kind of stall and ending comes round in turn, so that a soak of a minute has
        # them all; the rest is drawn.
        if index % 10 == 9:
            script.stall_at = STALLS[index // 10 % len(STALLS)]
            self._count(f"stall-{script.stall_at}")
            return script
        ending = ENDINGS[index % len(ENDINGS)]
        length = None if ending == "stream" else rng.randint(5, 400)
        script.actions = self._stream(rng, length, ending, index)
        return script

    def _stream(
        self, rng: random.Random, length: int | None, ending: str, index: int
    ) -> Iterator[Action]:
        """The actions once subscribed: ``length`` of a random mix (None: for ever), then
        ``ending``.

        A generator: each frame's numbers are drawn when it is about to be sent, so they
        increase over the soak as connections follow one another."""
        if length is None:
            self._count(ending)  # an open stream, until the balancer goes
        count = 0
        while length is None or count < length:
            count += 1
            kind = rng.choices(STREAM, weights=[70, 8, 5, 2, 3, 3, 3])[0]
            self._count(kind)
            if kind in ("text", "fragments", "fragments+pings"):
                frame = self._frame(rng, rng.randint(1, 30))
                yield ("text", frame) if kind == "text" else (kind, frame, 3)
            elif kind == "dribble":
                yield ("dribble", self._frame(rng, 1))
            elif kind == "status":
                yield ("status", status("info", "a word from the feed"))
            elif kind == "ping":
                yield ("ping", b"chaos")
            else:  # rejected by the balancer, counted, never an event
                yield ("status", b'[{"ev":"T","sym":"C01","q":')
            if rng.random() < 0.6:  # else a burst
                yield ("sleep", rng.uniform(0.0, 0.006))
        self._count(ending)  # reached: the balancer was still there
        self.ended[index] = ending
        if ending == "close-1000":
            yield ("close", 1000, "end of stream")
        elif ending == "close-1001":
            yield ("close", 1001, "going away")
        elif ending == "fin":
            yield ("fin",)
        elif ending == "reset":
            yield ("reset-mid-frame", self._frame(rng, 5))  # never sent whole
        elif ending == "max-connections":
            yield ("status", status("max_connections", "Maximum number of connections"))
            yield ("close", 1008, "max connections")

    def _frame(self, rng: random.Random, events: int) -> bytes:
        parts = []
        for _ in range(events):
            q = next(self._numbers)
            price = rng.randint(100, 99_999)
            parts.append(
                b'{"ev":"T","sym":"%s","i":"%d","x":4,"p":%d.%02d,"s":%d,"t":%d,"q":%d}'
                % (
                    rng.choice(SYMBOLS).encode(),
                    q,
                    price // 100,
                    price % 100,
                    rng.randint(1, 500),
                    1_700_000_000_000 + q,
                    q,
                )
            )
        return b"[" + b",".join(parts) + b"]"


def run_soak(
    directory: Path,
    *,
    seed: int,
    seconds: float,
    balancer: Sequence[str],
    env: dict[str, str],
    certfile: str,
    keyfile: str,
    ca_file: str,
) -> Soak:
    """Play for about ``seconds`` (the run under way is finished), then check everything."""
    soak = Soak(seed)
    rng = random.Random(seed)
    feed_scripts = Feed(seed)
    end = time.monotonic() + seconds
    with HostileFeed(scripts=feed_scripts.script, certfile=certfile, keyfile=keyfile) as feed:
        while time.monotonic() < end or not soak.runs:
            run = Run(len(soak.runs))
            first = len(feed.reached)
            _play(run, rng, feed.url, directory, balancer, env, ca_file, soak)
            run.connections = range(first, len(feed.reached))
            soak.runs.append(run)
        feed.close()
        soak.actions.update(feed_scripts.actions)
        for run in soak.runs:
            _check(run, feed, feed_scripts.ended, directory, soak)
        if feed.errors:
            soak.problems.append(f"the feed's threads broke: {feed.errors[:5]}")
    _check_order(soak, directory)
    return soak


def _play(
    run: Run,
    rng: random.Random,
    url: str,
    directory: Path,
    balancer: Sequence[str],
    env: dict[str, str],
    ca_file: str,
    soak: Soak,
) -> None:
    config = directory / f"run-{run.number}.toml"
    worker = ["{{ python }}", str(HERE / "chaosworker.py"), f"{directory}/run-{run.number}-"]
    worker[-1] += "worker-{{ worker }}.rec"
    config.write_text(
        f"""
[feeds.chaos]
url = "{url}"
subscribe = ["T.*", "Q.*"]
api_key_file = ""
ca_file = "{ca_file}"
pipes = {WORKERS}
workers = {WORKERS}
pipe_size = 65536
working_directory = "{directory}"
command = {json.dumps(worker)}
connect_timeout = 2.0
handshake_timeout = 1.0
ping_interval = 1.0
ping_timeout = 1.0
drain_timeout = {DRAIN_TIMEOUT}
stats_interval = 1.0
reconnect.initial = 0.05
reconnect.max = 0.5
reconnect.healthy_after = 2.0
reconnect.max_connections_cooldown = 0.5
worker_restart.initial = 0.05
worker_restart.max = 0.3
"""
    )
    log_path = directory / f"run-{run.number}.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MASSIVE", "POLY"))}
    environment.update(env, MASSIVE_API_KEY="chaos-soak-key")
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*balancer, "--verbose", "--config", str(config), "run", "chaos"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=environment,
        )
    try:
        _until_handled(process.pid)
        run.life = rng.choice([rng.uniform(0.0, 1.0), rng.uniform(0.5, 12.0)])
        stopped = _torment(process, run.life, rng, soak)
        run.stopped_workers = len(stopped)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        soak.actions["sigterm"] += 1
        try:
            run.exit_code = process.wait(STOP_BOUND + 20)
            run.stop_seconds = time.monotonic() - sent
        except subprocess.TimeoutExpired:
            soak.problems.append(f"run {run.number}: not stopped {STOP_BOUND + 20:.0f} s after")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid, command in _children_of(directory):  # seen now, then killed: never kept
            run.leftovers.append(f"{pid} {command}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    run.log = log_path.read_text(errors="replace")


def _until_handled(pid: int, timeout: float = 30.0) -> None:
    """Wait until the balancer catches SIGTERM: before that, the default action would end it
    (README: the start-up window), which is not what this soak is about."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        caught = next(line for line in status.splitlines() if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
            return
        time.sleep(0.005)


def _torment(
    process: subprocess.Popen[bytes], life: float, rng: random.Random, soak: Soak
) -> set[int]:
    """Kill, stop and continue workers for ``life`` seconds; return the pids left stopped."""
    stopped: set[int] = set()
    end = time.monotonic() + life
    while time.monotonic() < end and process.poll() is None:
        time.sleep(min(max(0.0, end - time.monotonic()), rng.uniform(0.1, 0.8)))
        workers = _workers_of(process.pid)
        if not workers:
            continue
        pid = rng.choice(workers)
        move = rng.choices(["kill", "stop", "cont", "none"], weights=[30, 25, 35, 10])[0]
        if move == "stop" and stopped:
            move = "cont"
        signum = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "cont": signal.SIGCONT}.get(move)
        if move == "cont":
            for stopped_pid in stopped:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stopped_pid, signal.SIGCONT)
            stopped.clear()
        elif signum is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
            if move == "stop":
                stopped.add(pid)
        soak.actions[f"worker-{move}"] += 1
    return stopped


def _workers_of(pid: int) -> list[int]:
    """The balancer's children that run a worker: one forked and not yet exec'd holds the
    balancer in spawn() until it execs, and is left alone."""
    try:
        children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN
        children = [child for child, parent in _processes() if parent == pid]
    workers = []
    for child in children:
        with contextlib.suppress(OSError):
            if b"chaosworker.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                workers.append(child)
    return workers


def _processes() -> Iterator[tuple[int, int]]:
    """(pid, parent pid) of every process."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                yield int(entry.name), int(stat[stat.rindex(")") + 2 :].split()[1])


def _children_of(directory: Path) -> list[tuple[int, str]]:
    """Every process whose command line names ``directory``: what a run may leave behind."""
    found = []
    needle = str(directory).encode()
    for pid, _ in _processes():
        with contextlib.suppress(OSError):
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
            if needle in command and pid != os.getpid():
                found.append((pid, command.replace(b"\0", b" ").decode(errors="replace")))
    return found


def _q(event: dict[str, object]) -> int:
    return int(str(event["q"]))


def _check(run: Run, feed: HostileFeed, ended: dict[int, str], directory: Path, soak: Soak) -> None:
    """The checks of one run (module docstring)."""
    where = f"run {run.number} (log {directory}/run-{run.number}.log)"
    log = run.log
    if run.exit_code is None:
        return  # already a problem
    if "SIGTERM received" not in log:
        soak.problems.append(f"{where}: no 'SIGTERM received' in the log")
    if run.stop_seconds is not None and run.stop_seconds > STOP_BOUND:
        soak.problems.append(f"{where}: the stop took {run.stop_seconds:.2f} s > {STOP_BOUND} s")
    if run.leftovers:
        soak.problems.append(f"{where}: left running after its exit: {run.leftovers}")
    deaths = Counter(int(worker) for worker, _ in _DIED.findall(log))
    recorded = {
        worker: _records(directory / f"run-{run.number}-worker-{worker}.rec")
        for worker in range(WORKERS)
    }
    soak.events_recorded += sum(len(events) for events in recorded.values())
    # What the feed sent whole to each worker, in order, with the connection it came on.
    sent: dict[int, list[tuple[int, int]]] = {worker: [] for worker in range(WORKERS)}
    for connection in run.connections:
        for frame in feed.sent_on.get(connection, []):
            for event in json.loads(frame):
                worker = pipe_for(str(event["sym"]).encode(), WORKERS)
                sent[worker].append((_q(event), connection))
    sent_to = {worker: len(events) for worker, events in sent.items()}
    soak.events_sent += sum(sent_to.values())
    for worker in range(WORKERS):
        for problem in _holes(sent[worker], recorded[worker]):
            soak.problems.append(f"{where}: worker {worker}: {problem}")
    # A connection the feed closed (a close frame, a FIN) and the balancer left for another
    # was read to its end: what it sent and a worker did not record is not delivered, or the
    # message a dying worker held.
    closed = {c for c in run.connections[:-1] if ended.get(c) in CLEAN_ENDINGS}
    unread = {
        worker: _unrecorded_tails(sent[worker], recorded[worker], closed)
        for worker in range(WORKERS)
    }
    shares = _final_line(log)
    if shares is None:
        if sum(sent_to.values()):
            soak.problems.append(f"{where}: events were sent, and no final line")
        return
    undelivered_total = 0
    for worker in range(WORKERS):
        delivered, undelivered = shares.get(worker, (0, 0))
        undelivered_total += undelivered
        have = len(recorded[worker])
        if not have <= delivered <= have + deaths[worker]:
            soak.problems.append(
                f"{where}: worker {worker}: the final line says {delivered} delivered, it "
                f"recorded {have} and died {deaths[worker]} times"
            )
        if delivered + undelivered > sent_to[worker]:
            soak.problems.append(
                f"{where}: worker {worker}: {delivered} delivered + {undelivered} not, but only "
                f"{sent_to[worker]} were sent whole to it"
            )
        soak.lost_to_deaths += delivered - have
        if unread[worker] > undelivered + deaths[worker]:
            soak.problems.append(
                f"{where}: worker {worker}: {unread[worker]} events of connections read to "
                f"their end are missing; {undelivered} not delivered, {deaths[worker]} deaths"
            )
    soak.not_delivered += undelivered_total
    expected = 75 if undelivered_total else 0
    if run.exit_code != expected:
        soak.problems.append(f"{where}: exit {run.exit_code}, expected {expected}")


def _records(path: Path) -> list[tuple[int, int]]:
    """A worker file's events as (q, life): life counts the "#start" lines so far."""
    life = 0
    events = []
    for line in path.read_bytes().splitlines() if path.exists() else []:
        if line == b"#start":
            life += 1
        else:
            events.append((_q(json.loads(line)), life))
    return events


def _unrecorded_tails(
    sent: list[tuple[int, int]], recorded: list[tuple[int, int]], connections: set[int]
) -> int:
    """How many events of ``connections`` came after the last one recorded from each."""
    got = {q for q, _ in recorded}
    last: dict[int, int] = {}
    for index, (q, connection) in enumerate(sent):
        if q in got:
            last[connection] = index
    return sum(
        1
        for index, (q, connection) in enumerate(sent)
        if connection in connections and index > last.get(connection, -1)
    )


def _holes(sent: list[tuple[int, int]], recorded: list[tuple[int, int]]) -> list[str]:
    """What is wrong with one worker's ``recorded`` (q, life) against what was ``sent`` to it
    (q, connection), in order.

    Between two consecutive records, an event sent on the same connection as the later one
    was received before it, so it was in the pipe before it: missing, it is lost, unless the
    worker died in between (one message per death). An event after the last record of its
    connection was never received (still in the socket when the connection ended) or is
    left in the pipe at the stop: the final line's check covers those.
    """
    position = {q: index for index, (q, _) in enumerate(sent)}
    problems = []
    last_index, last_life = -1, 1
    for q, life in recorded:
        index = position.get(q)
        if index is None:
            problems.append(f"q {q}: not sent whole to this worker's symbols in this run")
            continue
        if index <= last_index:
            problems.append(f"q {q} recorded out of order or twice")
            continue
        connection = sent[index][1]
        lost = [s_q for s_q, c in sent[last_index + 1 : index] if c == connection]
        if len(lost) > life - last_life:
            problems.append(
                f"q {lost[:5]} lost before q {q} on connection {connection}, with "
                f"{life - last_life} deaths of the worker in between"
            )
        last_index, last_life = index, life
    return problems


def _final_line(log: str) -> dict[int, tuple[int, int]] | None:
    """Per worker, (delivered, not delivered) from the last line's account; None if none."""
    match = _ALL.search(log) or _SOME.search(log)
    if match is None:
        return None
    return {
        int(worker): (int(delivered.replace(",", "")), int((undelivered or "0").replace(",", "")))
        for worker, delivered, undelivered in _SHARE.findall(match.group(1))
    }


def _check_order(soak: Soak, directory: Path) -> None:
    """Exactly once over the whole soak, and in the feed's order per worker (so per symbol)."""
    everything: Counter[int] = Counter()
    for worker in range(WORKERS):
        last = -1
        for run in soak.runs:
            for q, _ in _records(directory / f"run-{run.number}-worker-{worker}.rec"):
                everything[q] += 1
                if q <= last:
                    soak.problems.append(f"worker {worker}, run {run.number}: q {q} after {last}")
                last = q
    twice = [q for q, n in everything.items() if n > 1]
    if twice:
        soak.problems.append(f"{len(twice)} events delivered more than once: {twice[:10]}")
