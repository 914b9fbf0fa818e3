"""A feed's configuration -> what each of its workers is started with.

Owns the plan of a feed's workers: the division of the pipes among them, each one's argv
(the command template rendered with the variables below), the directory they run in, and
their environment. Does no spawning (workers.py) and opens no pipe (pipes.py); reads nothing
but the environment it is given.

* Pipes go to workers in contiguous blocks as even as possible: worker ``w`` of ``W`` gets pipes
  ``[w*N//W, (w+1)*N//W)``. Every pipe has exactly one worker and block sizes differ by at most
  one, so the load stays even when ``W`` does not divide ``N``.
* A worker sees its pipes' read ends as descriptors ``FIRST_FD``, ... in pipe order (the
  spawner moves them there; reader/format.py owns the contract); ``fds`` lists those numbers,
  ``TRADEBALANCER_FDS`` names them in its environment, and ``pass_fds = "append"`` adds them
  after the rendered arguments, which is the contract of the C original's workers.
* The environment is the service's without the service manager's channels (NOTIFY_SOCKET, the
  watchdog, socket activation), the credentials directory and every variable that may hold the
  API key, plus ``TRADEBALANCER_FEED``, ``TRADEBALANCER_WORKER`` and ``TRADEBALANCER_FDS``.

* The partitions ``[feeds.NAME.jetstream]`` names are not local: the workers share the other
  pipes (blocks as above over the local pipes, in order), and one more worker, the bridge
  (``python -m tradebalancer.bridge``, bridge/), reads the remote ones and publishes them. It
  is the package's own code, not the user's: it is ``trusted``, started without the cover that
  hides the credentials (keyguard.py), since it reads the NATS credentials file. It also gets
  one fd more after its pipes, the balancer's ledger (ledger.py), named by ``LEDGER_VARIABLE``.

Check-config renders every worker's plan, so a bad template fails there (exit 78), not at the
spawn of worker 5 an hour later.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .config import FeedConfig
from .ledger import LEDGER_VARIABLE
from .reader.format import FDS_VARIABLE, FIRST_FD
from .values import expand_variables

__all__ = [
    "SCRUBBED_ENVIRONMENT",
    "WorkerPlan",
    "argv_for",
    "bridge_argv",
    "clean_environment",
    "local_pipes",
    "pipe_block",
    "pipes_for_worker",
    "plan_workers",
    "worker_variables",
    "working_directory",
]

# Never handed to a worker: the service manager's channels and the credentials.
SCRUBBED_ENVIRONMENT = frozenset(
    {
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "CREDENTIALS_DIRECTORY",
        "MASSIVE_API_KEY",
        "POLYGON_API_KEY",
    }
)


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker is started with."""

    index: int
    pipes: tuple[int, ...]  # the pipe indexes it reads, in order (its fds FIRST_FD, ...)
    argv: tuple[str, ...]
    cwd: str
    env: Mapping[str, str]
    trusted: bool = False  # the package's own bridge: no key cover (keyguard.py)
    ledger: bool = False  # the bridge: gets the balancer's ledger fd after its pipes (ledger.py)


def plan_workers(feed: FeedConfig, environ: Mapping[str, str]) -> list[WorkerPlan]:
    """Return the plan of every worker of ``feed``; ConfigError if a template or path is bad."""
    cwd = working_directory(feed, environ)
    base = clean_environment(environ, feed.api_key_env)
    base["TRADEBALANCER_FEED"] = feed.name
    plans = []
    for index in range(local_workers(feed)):
        pipes = tuple(pipes_for_worker(feed, index))
        plans.append(
            WorkerPlan(
                index, pipes, tuple(argv_for(feed, index, cwd)), cwd, _env(base, index, pipes)
            )
        )
    if feed.jetstream is not None:
        index, pipes = len(plans), feed.jetstream.partitions
        argv = tuple(bridge_argv(feed, environ))
        env = _env(base, index, pipes)
        env[LEDGER_VARIABLE] = str(FIRST_FD + len(pipes))  # the fd after its pipes
        plans.append(WorkerPlan(index, pipes, argv, cwd, env, trusted=True, ledger=True))
    return plans


def _env(base: Mapping[str, str], index: int, pipes: Sequence[int]) -> dict[str, str]:
    env = dict(base)
    env["TRADEBALANCER_WORKER"] = str(index)
    env[FDS_VARIABLE] = ",".join(str(FIRST_FD + offset) for offset in range(len(pipes)))
    return env


def local_pipes(feed: FeedConfig) -> list[int]:
    """The pipe indexes the feed's own workers read: all but the JetStream partitions."""
    remote = set(feed.jetstream.partitions) if feed.jetstream is not None else set()
    return [pipe for pipe in range(feed.pipes) if pipe not in remote]


def local_workers(feed: FeedConfig) -> int:
    """How many workers run the feed's command: ``workers``, at most one per local pipe."""
    return min(feed.workers, len(local_pipes(feed)))


def bridge_argv(feed: FeedConfig, environ: Mapping[str, str]) -> list[str]:
    """The bridge's command line for ``feed``'s JetStream partitions (bridge/options.py)."""
    jetstream = feed.jetstream
    assert jetstream is not None
    argv = [
        *(sys.executable, "-m", "tradebalancer.bridge"),
        *("--servers", ",".join(jetstream.servers)),
        *("--stream", jetstream.stream, "--subject-prefix", jetstream.subject_prefix),
        *("--partitions", ",".join(str(partition) for partition in jetstream.partitions)),
        *("--storage", jetstream.storage, "--replicas", str(jetstream.replicas)),
        *("--max-batch-bytes", str(jetstream.max_batch_bytes)),
        *("--publish-timeout", f"{jetstream.publish_timeout:g}"),
    ]
    if not jetstream.create:
        argv.append("--no-create")
    if jetstream.credentials_file is not None:
        path = f"feeds.{feed.name}.jetstream.credentials_file"
        argv += ["--credentials", expand_variables(jetstream.credentials_file, environ, path)]
    return argv


def pipe_block(pipe_count: int, workers: int, worker: int) -> range:
    """Return the pipe indexes of ``worker``: the contiguous block ``[w*N//W, (w+1)*N//W)``."""
    if not 0 <= worker < workers <= pipe_count:
        raise ValueError(f"worker {worker} of {workers} over {pipe_count} pipes")
    return range(worker * pipe_count // workers, (worker + 1) * pipe_count // workers)


def pipes_for_worker(feed: FeedConfig, worker: int) -> list[int]:
    """Return the indexes of the pipes ``worker`` of ``feed`` reads, in order."""
    local = local_pipes(feed)
    return [local[index] for index in pipe_block(len(local), local_workers(feed), worker)]


def worker_variables(feed: FeedConfig, worker: int, workdir: str) -> dict[str, object]:
    """Return the variables the command template of ``feed`` is rendered with for ``worker``."""
    pipes = pipes_for_worker(feed, worker)
    return {
        "feed": feed.name,
        "worker": worker,
        "workers": local_workers(feed),
        "fds": list(range(FIRST_FD, FIRST_FD + len(pipes))),
        "pipes": pipes,
        "pipe_count": feed.pipes,
        "workdir": workdir,
        "python": sys.executable,
    }


def argv_for(feed: FeedConfig, worker: int, workdir: str) -> list[str]:
    """Return the argv of ``worker``: the rendered command, then its fds if ``pass_fds`` says so."""
    argv = feed.command.render(worker_variables(feed, worker, workdir))
    if feed.pass_fds == "append":
        count = len(pipes_for_worker(feed, worker))
        argv.extend(str(fd) for fd in range(FIRST_FD, FIRST_FD + count))
    return argv


def working_directory(feed: FeedConfig, environ: Mapping[str, str]) -> str:
    """Return the directory the workers of ``feed`` run in, with ``${VAR}`` expanded."""
    if feed.working_directory is None:
        # systemd.exec(5): StateDirectory= sets $STATE_DIRECTORY, colon-separated when the unit
        # lists several directories; the first one is the instance's own.
        state = environ.get("STATE_DIRECTORY", "")
        return state.split(":")[0] if state else "."
    return expand_variables(feed.working_directory, environ, f"feeds.{feed.name}.working_directory")


def clean_environment(environ: Mapping[str, str], secrets: Sequence[str] = ()) -> dict[str, str]:
    """Return ``environ`` without the service manager's variables and the named secrets."""
    dropped = SCRUBBED_ENVIRONMENT.union(secrets)
    return {key: value for key, value in environ.items() if key not in dropped}
