"""Worker processes: spawning them on their pipes, reaping them, respawning them with backoff.

Owns the child processes. A worker is forked and exec'ed with exactly its pipes' read ends as
file descriptors 3, 4, ... (in pipe order), stdin from /dev/null, stdout and stderr inherited
(the journal under systemd), in the working directory, in its own process group (a Ctrl-C on
the terminal reaches the balancer only, which then ends the workers in order), with
PR_SET_PDEATHSIG so it dies with the balancer, with the environment its plan gives it
(plan.py: cleaned of the notify socket, the watchdog and every secret), and by default under
SCHED_BATCH (``worker_scheduling``):
the balancer wakes a worker with every write to its pipe, and a woken SCHED_OTHER task may
preempt the one running on its CPU, the balancer itself halfway through writing the other pipes.

Spawning is done by hand rather than with subprocess so that the descriptor shuffle is exact:
the pipes' read ends may sit at any number, including 3, 4, ... themselves, so the child first
lifts every one above the target range and only then moves it into place.

A dead worker's pipes are left alone: the balancer holds their read ends, so nothing written
is lost, and the successor, spawned on the same pipes after a backoff, reads on from where the
dead one stopped (the reader library skips the rest of a message the dead one had begun).

Does no parsing and knows nothing of the feed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import prctl

from . import signals
from .config import FeedConfig
from .errors import WorkerError
from .keyguard import Cover
from .plan import WorkerPlan
from .reader.format import FIRST_FD
from .signals import HANDLED
from .units import format_ranges

logger = logging.getLogger(__name__)

_POLICY_NAMES = {
    os.SCHED_OTHER: "SCHED_OTHER",
    os.SCHED_BATCH: "SCHED_BATCH",
    os.SCHED_IDLE: "SCHED_IDLE",
    os.SCHED_FIFO: "SCHED_FIFO",
    os.SCHED_RR: "SCHED_RR",
}

# A worker that lived this long before dying starts the backoff over.
HEALTHY_LIFETIME = 60.0


@dataclass
class Worker:
    """One worker process and the pipes it serves."""

    index: int
    argv: list[str]
    read_fds: list[int]  # the balancer's read ends of its pipes, in pipe order (then the ledger)
    pipe_indexes: list[int]
    env: Mapping[str, str] = field(default_factory=dict)  # its whole environment (plan.py)
    trusted: bool = False  # the package's own bridge: started without the key cover
    pid: int | None = None
    started_at: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0
    respawn_at: float | None = None
    exit_status: int | None = None
    history: list[int] = field(default_factory=list)  # pids, oldest first

    @property
    def running(self) -> bool:
        """True while the process exists (not yet reaped)."""
        return self.pid is not None


def spawn(
    worker: Worker,
    *,
    cwd: str,
    env: Mapping[str, str],
    now: float,
    batch: bool = False,
    feed: str = "NAME",
    cover: Cover | None = None,
) -> None:
    """Fork and exec ``worker``; raise WorkerError if the program cannot be started.

    ``batch`` asks for SCHED_BATCH (see the module docstring); a refusal is not an error here:
    the worker runs under the policy it inherited, which the caller can read back.
    """
    parent = os.getpid()
    status_read, status_write = os.pipe2(os.O_CLOEXEC)
    env_list = dict(env)
    try:
        pid = signals.fork()  # the child resets its dispositions before it takes a signal
    except OSError as exc:
        os.close(status_read)
        os.close(status_write)
        raise WorkerError(
            f"cannot start worker {worker.index}: fork failed: {exc.strerror or exc}; "
            "raise the service's process limit (TasksMax=, LimitNPROC=) or free memory"
        ) from exc
    if pid == 0:  # pragma: no cover - the child execs or reports through status_write
        _exec_child(worker, cwd, env_list, parent, status_write, batch, cover)
    os.close(status_write)
    with os.fdopen(status_read, "rb") as status:
        failure = status.read()
    if failure:
        os.waitpid(pid, 0)
        key, _, reason = failure.decode(errors="replace").partition("\n")
        raise WorkerError(f"cannot start worker {worker.index}: {reason}; check feeds.{feed}.{key}")
    worker.pid = pid
    worker.started_at = now
    worker.exit_status = None
    worker.respawn_at = None
    worker.history.append(pid)


def _exec_child(  # pragma: no cover - runs between fork and exec
    worker: Worker,
    cwd: str,
    env: dict[str, str],
    parent: int,
    status_write: int,
    batch: bool,
    cover: Cover | None,
) -> None:
    step = "command\ncannot prepare the worker"
    try:
        if cover is not None:  # first: its new user namespace clears the parent-death signal
            step = "key_isolation\ncannot hide the API key from the worker"
            cover.apply()
            step = "command\ncannot prepare the worker"
        # Die with the balancer, and close the race where it died before this line ran.
        prctl.set_pdeathsig(signal.SIGTERM)
        if os.getppid() != parent:
            os._exit(0)
        os.setpgid(0, 0)
        if batch:
            with contextlib.suppress(OSError):  # WorkerPool reads the policy back and says so
                os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        signal.set_wakeup_fd(-1)  # the balancer's: not the worker's business
        for signum in (signal.SIGPIPE, *HANDLED):
            signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        count = len(worker.read_fds)
        floor = FIRST_FD + count
        status_write = fcntl_dupfd(status_write, floor, cloexec=True)
        lifted = [fcntl_dupfd(fd, floor, cloexec=True) for fd in worker.read_fds]
        for target, fd in enumerate(lifted, start=FIRST_FD):
            os.dup2(fd, target, inheritable=True)
        keep = {status_write}
        for fd in range(floor, _max_fd()):
            if fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        # What failed goes back as "KEY\nREASON", KEY the configuration key that fixes it.
        step = "working_directory\ncannot enter the working directory " + cwd
        os.chdir(cwd)
        step = "command\ncannot run " + worker.argv[0]
        os.execvpe(worker.argv[0], worker.argv, env)
    except BaseException as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
        try:
            os.write(status_write, f"{step}: {message}".encode())
        finally:
            os._exit(127)


def fcntl_dupfd(fd: int, floor: int, *, cloexec: bool) -> int:
    """Duplicate ``fd`` to the lowest free number at or above ``floor``."""
    import fcntl

    command = fcntl.F_DUPFD_CLOEXEC if cloexec else fcntl.F_DUPFD
    return fcntl.fcntl(fd, command, floor)


def _max_fd() -> int:
    try:
        return max(int(name) for name in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")


def describe_status(status: int) -> str:
    """Turn a waitpid status into words: 'exited with status 3', 'killed by SIGKILL'."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = f"signal {signum}"
        return f"killed by {name}"
    return f"exited with status {os.WEXITSTATUS(status)}"


class WorkerPool:
    """Every worker of one feed: spawns them, reaps them, respawns them with backoff."""

    def __init__(
        self,
        workers: Sequence[Worker],
        *,
        cwd: str,
        respawn_initial: float = 1.0,
        respawn_max: float = 30.0,
        scheduling: Literal["batch", "other"] = "batch",
        feed: str = "NAME",
        cover: Cover | None = None,
    ) -> None:
        self.workers = list(workers)
        self.feed = feed  # names the keys in error messages
        self.cover = cover  # what each worker must not see (keyguard.py)
        self.scheduling = scheduling  # "batch": SCHED_BATCH, see the module docstring
        self._policy_warned = False
        self.cwd = cwd
        self.respawn_initial = respawn_initial
        self.respawn_max = respawn_max
        self.restarts = 0
        self.stopping = False  # no respawn: exits are logged as the end of the worker

    @classmethod
    def from_plans(
        cls,
        plans: Sequence[WorkerPlan],
        read_fds: Sequence[int],
        feed: FeedConfig,
        cover: Cover | None = None,
        ledger_fd: int | None = None,
    ) -> WorkerPool:
        """The pool of ``feed``'s planned workers; ``read_fds[i]`` is pipe i's read end, and
        ``ledger_fd`` goes after the pipes of the plan that asks for it (the bridge)."""
        workers = [
            Worker(
                index=plan.index,
                argv=list(plan.argv),
                read_fds=[read_fds[pipe] for pipe in plan.pipes]
                + ([ledger_fd] if plan.ledger and ledger_fd is not None else []),
                pipe_indexes=list(plan.pipes),
                env=plan.env,
                trusted=plan.trusted,
            )
            for plan in plans
        ]
        return cls(
            workers,
            cwd=plans[0].cwd,
            respawn_initial=feed.worker_restart.initial,
            respawn_max=feed.worker_restart.max,
            scheduling=feed.worker_scheduling,
            feed=feed.name,
            cover=cover,
        )

    def spawn_all(self, now: float) -> None:
        """Start every worker; raise WorkerError if one cannot be started at all."""
        for worker in self.workers:
            self._spawn(worker, now)
            logger.info(
                "worker %d started (pid %d) on pipes %s: %s",
                worker.index,
                worker.pid,
                format_ranges(worker.pipe_indexes),
                " ".join(worker.argv),
            )

    def reap(self, now: float) -> list[Worker]:
        """Collect exited workers, schedule their respawn, and return them."""
        exited: list[Worker] = []
        for worker in self.workers:
            if worker.pid is None:
                continue
            try:
                pid, status = os.waitpid(worker.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = worker.pid, 0
            if pid == 0:
                continue
            worker.pid = None
            worker.exit_status = status
            lifetime = now - worker.started_at
            worker.quick_deaths = 0 if lifetime >= HEALTHY_LIFETIME else worker.quick_deaths + 1
            delay = min(
                self.respawn_max,
                self.respawn_initial * 2 ** max(0, worker.quick_deaths - 1),
            )
            exited.append(worker)
            if self.stopping:
                logger.info("worker %d %s", worker.index, describe_status(status))
                continue
            worker.respawn_at = now + delay
            logger.warning(
                "worker %d (pid %d) %s; restarting it in %.1f s on the same pipes",
                worker.index,
                pid,
                describe_status(status),
                delay,
            )
        return exited

    def read_pipes(self) -> set[int]:
        """The pipes a live worker reads (the dead are reaped first: they take nothing more)."""
        self.reap(time.monotonic())
        return {index for worker in self.running() for index in worker.pipe_indexes}

    def respawn_due(self, now: float) -> int:
        """Restart the workers whose backoff has passed; return how many were."""
        before = self.restarts
        for worker in self.workers:
            if worker.pid is None and worker.respawn_at is not None and now >= worker.respawn_at:
                try:
                    self._spawn(worker, now)
                except WorkerError as exc:
                    logger.error("%s; retrying", exc)
                    worker.quick_deaths += 1
                    worker.respawn_at = now + self.respawn_max
                    continue
                worker.restarts += 1
                self.restarts += 1
                logger.info(
                    "worker %d restarted (pid %d, restart %d) on pipes %s",
                    worker.index,
                    worker.pid,
                    worker.restarts,
                    format_ranges(worker.pipe_indexes),
                )
        return self.restarts - before

    def next_deadline(self) -> float | None:
        """Return the earliest pending respawn time, or None."""
        times = [w.respawn_at for w in self.workers if w.pid is None and w.respawn_at is not None]
        return min(times) if times else None

    def running(self) -> list[Worker]:
        """Return the workers whose process exists."""
        return [worker for worker in self.workers if worker.pid is not None]

    def signal_all(self, signum: int) -> None:
        """Send ``signum`` to every running worker."""
        for worker in self.running():
            assert worker.pid is not None
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    def stop(self, exit_timeout: float, term_timeout: float, clock: Callable[[], float]) -> None:
        """Wait for every worker to exit (their pipes are closed), then SIGTERM, then SIGKILL."""
        self.cancel_respawns()
        self._wait(exit_timeout, clock)
        if self.running():
            logger.warning("workers still running after %.0f s: sending SIGTERM", exit_timeout)
            self.signal_all(signal.SIGTERM)
            self.signal_all(signal.SIGCONT)  # a stopped worker acts on it only once continued
            self._wait(term_timeout, clock)
        if self.running():
            logger.error("workers ignored SIGTERM: sending SIGKILL")
            self.signal_all(signal.SIGKILL)
            self._wait(None, clock)

    def _wait(self, timeout: float | None, clock: Callable[[], float]) -> None:
        deadline = None if timeout is None else clock() + timeout
        while True:
            self.reap(clock())
            if not self.running() or (deadline is not None and clock() >= deadline):
                return
            time.sleep(0.02)

    def cancel_respawns(self) -> None:
        """Forget pending respawns and make none from now on (shutting down)."""
        self.stopping = True
        for worker in self.workers:
            worker.respawn_at = None

    def _spawn(self, worker: Worker, now: float) -> None:
        spawn(
            worker,
            cwd=self.cwd,
            env=worker.env,
            now=now,
            batch=self.scheduling == "batch",
            feed=self.feed,
            cover=None if worker.trusted else self.cover,
        )
        if self.scheduling == "batch" and not self._policy_warned:
            self._check_policy(worker)

    def _check_policy(self, worker: Worker) -> None:
        """Warn once if the kernel refused SCHED_BATCH: a slower worker, not a broken one."""
        assert worker.pid is not None
        try:
            policy = os.sched_getscheduler(worker.pid)
        except OSError:  # already gone: its exit is reported when it is reaped
            return
        if policy != os.SCHED_BATCH:
            self._policy_warned = True
            logger.warning(
                "worker %d runs under %s, not SCHED_BATCH: the kernel refused "
                "the change (a seccomp filter, or SCHED_IDLE without CAP_SYS_NICE); the workers "
                'keep the policy they inherit. worker_scheduling = "other" stops asking',
                worker.index,
                _POLICY_NAMES.get(policy, f"scheduling policy {policy}"),
            )


if sys.platform != "linux":  # pragma: no cover
    raise ImportError("tradebalancer runs on Linux only (pipes, prctl, kernel TLS)")
