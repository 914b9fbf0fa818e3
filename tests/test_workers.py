"""Workers: exact descriptors, clean environment, death signal, reaping and respawning."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import pytest

from tradebalancer.errors import WorkerError
from tradebalancer.pipes import close_pipes, open_pipes
from tradebalancer.plan import clean_environment
from tradebalancer.workers import (
    Worker,
    WorkerPool,
    describe_status,
    spawn,
)

# A worker that reports what it was given, then reads its pipes to the end.
REPORTER = r"""
import json, os, sys, prctl
fds = [int(a) for a in sys.argv[1:]]
report = {
    "fds": fds,
    "open": sorted(int(f) for f in os.listdir("/proc/self/fd")),
    "cwd": os.getcwd(),
    "env": sorted(os.environ),
    "pdeathsig": prctl.get_pdeathsig(),
    "own_group": os.getpgid(0) == os.getpid(),
    "data": [],
}
for fd in fds:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    report["data"].append(b"".join(chunks).decode())
with open("report.json", "w") as f:
    json.dump(report, f)
"""


def wait_exit(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.01)
    raise AssertionError("worker did not exit")


def test_worker_gets_exactly_its_pipes_as_fds_3_and_up(tmp_path: Path) -> None:
    """The child sees its pipes' read ends at 3, 4, ... and no other descriptor of ours."""
    pipes = open_pipes(4, 65536)
    worker = Worker(
        index=0,
        argv=[sys.executable, "-c", REPORTER, "3", "4"],
        read_fds=[pipes[2].read_fd, pipes[0].read_fd],
        pipe_indexes=[2, 0],
    )
    env = clean_environment(
        {**os.environ, "NOTIFY_SOCKET": "/run/x", "MASSIVE_API_KEY": "k", "MY_KEY": "k"},
        secrets=["MY_KEY"],
    )
    spawn(worker, cwd=str(tmp_path), env=env, now=0.0)
    assert worker.pid is not None
    pipes[2].write(b"to pipe two")
    pipes[0].write(b"to pipe zero")
    close_pipes(pipes)
    assert wait_exit(worker.pid) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["data"] == ["to pipe two", "to pipe zero"]
    # 0-2 are stdio; 3 and 4 the pipes; one more is the listing's own directory handle.
    assert [fd for fd in report["open"] if fd > 2][:2] == [3, 4]
    assert len([fd for fd in report["open"] if fd > 4]) <= 1
    assert report["cwd"] == str(tmp_path)
    assert report["pdeathsig"] == signal.SIGTERM
    assert report["own_group"]
    for name in ("NOTIFY_SOCKET", "MASSIVE_API_KEY", "MY_KEY"):
        assert name not in report["env"]


@pytest.mark.parametrize(
    ("scheduling", "policy"), [("batch", os.SCHED_BATCH), ("other", os.SCHED_OTHER)]
)
def test_the_pool_starts_workers_under_the_scheduling_policy_asked_for(
    tmp_path: Path, scheduling: Literal["batch", "other"], policy: int
) -> None:
    """SCHED_BATCH by default: a worker its pipe wakes does not preempt the balancer."""
    report = tmp_path / "policy"
    code = f"import os; open({str(report)!r}, 'w').write(str(os.sched_getscheduler(0)))"
    worker = Worker(index=0, argv=[sys.executable, "-c", code], read_fds=[], pipe_indexes=[])
    pool = WorkerPool([worker], cwd=str(tmp_path), scheduling=scheduling)
    pool.spawn_all(0.0)
    wait_until_reaped(pool, 0.0)
    assert worker.exit_status == 0
    assert int(report.read_text()) == policy
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the balancer's own is untouched


# A balancer that may not leave SCHED_IDLE (no CAP_SYS_NICE, RLIMIT_NICE 0) starts one worker.
REFUSED_POLICY = r"""
import logging, os, resource, sys, time, prctl
from tradebalancer.workers import Worker, WorkerPool
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
resource.setrlimit(resource.RLIMIT_NICE, (0, 0))
prctl.cap_effective.sys_nice = False
report = sys.argv[1]
code = f"import os; open({report!r}, 'w').write(str(os.sched_getscheduler(0)))"
worker = Worker(index=0, argv=[sys.executable, "-c", code], read_fds=[], pipe_indexes=[])
pool = WorkerPool([worker], cwd=os.getcwd())
pool.spawn_all(0.0)
while not pool.reap(0.0):
    time.sleep(0.01)
"""


def test_a_refused_sched_batch_is_a_warning_and_the_worker_runs(tmp_path: Path) -> None:
    """Where the kernel refuses SCHED_BATCH the worker still starts, and the log says why once."""
    report = tmp_path / "policy"
    result = subprocess.run(
        [sys.executable, "-c", REFUSED_POLICY, str(report)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert int(report.read_text()) == os.SCHED_IDLE
    assert result.stderr.count("not SCHED_BATCH") == 1
    assert "worker 0 runs under SCHED_IDLE, not SCHED_BATCH: the kernel refused" in result.stderr
    assert 'worker_scheduling = "other"' in result.stderr


def test_fds_already_sitting_at_3_and_up_are_moved_without_clobbering(tmp_path: Path) -> None:
    """Swapping descriptors that already hold the target numbers still maps each pipe right."""
    saved = [os.dup(3), os.dup(4)] if _is_open(3) and _is_open(4) else []
    pipes = open_pipes(2, 65536)
    try:
        worker = Worker(
            index=0,
            argv=[sys.executable, "-c", REPORTER, "3", "4"],
            read_fds=[pipes[1].read_fd, pipes[0].read_fd],
            pipe_indexes=[1, 0],
        )
        spawn(worker, cwd=str(tmp_path), env=dict(os.environ), now=0.0)
        pipes[0].write(b"zero")
        pipes[1].write(b"one")
        close_pipes(pipes)
        assert worker.pid is not None and wait_exit(worker.pid) == 0
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["data"] == ["one", "zero"]
    finally:
        for fd in saved:
            os.close(fd)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_missing_program_is_a_worker_error(tmp_path: Path) -> None:
    """exec failing in the child comes back to the parent as a WorkerError naming the program."""
    worker = Worker(index=3, argv=["/nonexistent/worker"], read_fds=[], pipe_indexes=[])
    with pytest.raises(WorkerError) as caught:
        spawn(worker, cwd=str(tmp_path), env={}, now=0.0, feed="stocks")
    assert str(caught.value) == (
        "cannot start worker 3: cannot run /nonexistent/worker: No such file or directory; "
        "check feeds.stocks.command"
    )
    assert worker.pid is None


def test_a_missing_working_directory_is_a_worker_error(tmp_path: Path) -> None:
    """A working directory that does not exist is named as such (it named the interpreter)."""
    worker = Worker(index=0, argv=[sys.executable, "-c", "pass"], read_fds=[], pipe_indexes=[])
    with pytest.raises(WorkerError) as caught:
        spawn(worker, cwd=str(tmp_path / "nope"), env={}, now=0.0, feed="stocks")
    assert str(caught.value) == (
        f"cannot start worker 0: cannot enter the working directory {tmp_path / 'nope'}: "
        "No such file or directory; check feeds.stocks.working_directory"
    )
    assert sys.executable not in str(caught.value)


def test_dead_workers_are_reaped_and_respawned_with_growing_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker that keeps dying quickly is restarted after 1, 2, 4 s... capped at the maximum."""
    caplog.set_level(logging.INFO, logger="tradebalancer.workers")
    worker = Worker(
        index=0, argv=[sys.executable, "-c", "raise SystemExit(3)"], read_fds=[], pipe_indexes=[]
    )
    pool = WorkerPool(
        [worker],
        cwd=str(tmp_path),
        respawn_initial=1.0,
        respawn_max=3.0,
    )
    now = 100.0
    pool.spawn_all(now)
    delays = []
    for _ in range(4):
        assert worker.pid is not None
        wait_until_reaped(pool, now)
        assert worker.respawn_at is not None
        delays.append(worker.respawn_at - now)
        pool.respawn_due(worker.respawn_at - 0.01)
        assert worker.pid is None  # not before its time
        now = worker.respawn_at
        pool.respawn_due(now)
    wait_until_reaped(pool, now)
    assert delays == [1.0, 2.0, 3.0, 3.0]
    exits = [r.getMessage() for r in caplog.records if "exited with status 3" in r.getMessage()]
    assert len(exits) == 5 and "restarting it in 1.0 s on the same pipes" in exits[0]
    assert pool.restarts == 4 and worker.restarts == 4
    assert len(worker.history) == 5


def wait_until_reaped(pool: WorkerPool, now: float) -> None:
    deadline = time.monotonic() + 10
    while not pool.reap(now):
        assert time.monotonic() < deadline, "worker did not exit"
        time.sleep(0.01)


def test_a_worker_that_lived_long_restarts_the_backoff(tmp_path: Path) -> None:
    """A death after a healthy run is retried after the initial delay again."""
    worker = Worker(index=0, argv=[sys.executable, "-c", "pass"], read_fds=[], pipe_indexes=[])
    worker.quick_deaths = 5
    pool = WorkerPool([worker], cwd=str(tmp_path), respawn_initial=1.5)
    pool.spawn_all(0.0)
    wait_until_reaped(pool, 1000.0)
    assert worker.respawn_at == 1001.5


def test_signal_all_reaches_running_workers(tmp_path: Path) -> None:
    """signal_all delivers a signal to each running worker."""
    worker = Worker(
        index=0,
        argv=[sys.executable, "-c", "import time; time.sleep(60)"],
        read_fds=[],
        pipe_indexes=[],
    )
    pool = WorkerPool([worker], cwd=str(tmp_path))
    pool.spawn_all(0.0)
    pool.signal_all(signal.SIGKILL)
    wait_until_reaped(pool, 0.0)
    assert worker.exit_status is not None
    assert describe_status(worker.exit_status) == "killed by SIGKILL"
    assert pool.running() == []


@pytest.mark.parametrize(
    ("status", "text"), [(3 << 8, "exited with status 3"), (9, "killed by SIGKILL")]
)
def test_describe_status(status: int, text: str) -> None:
    """Wait statuses read as words."""
    assert describe_status(status) == text


def test_stop_escalates_from_waiting_to_sigterm_to_sigkill(tmp_path: Path) -> None:
    """Workers that exit are reaped; one ignoring SIGTERM is killed, and stop() returns."""
    quits = Worker(index=0, argv=[sys.executable, "-c", "pass"], read_fds=[], pipe_indexes=[])
    stubborn = Worker(
        index=1,
        argv=[
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "open('ready', 'w').close(); time.sleep(60)",
        ],
        read_fds=[],
        pipe_indexes=[],
    )
    pool = WorkerPool([quits, stubborn], cwd=str(tmp_path))
    pool.spawn_all(0.0)
    deadline = time.monotonic() + 10
    while not (tmp_path / "ready").exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = time.monotonic()
    pool.stop(0.2, 0.2, time.monotonic)
    assert pool.running() == []
    assert time.monotonic() - started < 5
    assert quits.exit_status == 0
    assert stubborn.exit_status is not None
    assert describe_status(stubborn.exit_status) == "killed by SIGKILL"


def test_a_worker_gets_exactly_the_environment_of_its_plan(tmp_path: Path) -> None:
    """The pool starts each worker with its own environment (plan.py builds it), nothing else."""
    pipes = open_pipes(3, 65536)
    code = (
        "import json, os, sys; json.dump({k: v for k, v in os.environ.items() "
        "if k.startswith(('TRADEBALANCER', 'PATH', 'MASSIVE'))}, open(sys.argv[1], 'w'))"
    )
    env = {"TRADEBALANCER_WORKER": "1", "TRADEBALANCER_FDS": "3,4"}
    workers = [
        Worker(
            index=1,
            argv=[sys.executable, "-c", code, str(tmp_path / "env.json")],
            read_fds=[pipes[1].read_fd, pipes[2].read_fd],
            pipe_indexes=[1, 2],
            env=env,
        )
    ]
    pool = WorkerPool(workers, cwd=str(tmp_path))
    pool.spawn_all(0.0)
    assert workers[0].pid is not None
    assert wait_exit(workers[0].pid) == 0
    close_pipes(pipes)
    assert json.loads((tmp_path / "env.json").read_text()) == env
