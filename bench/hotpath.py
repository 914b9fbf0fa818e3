"""Where the balancer's time goes: py-spy samples of the running service, grouped by stage.

Owns the optional profile of one throughput run (``python -m bench --profile DIR``): py-spy
(``pip install py-spy``; not a dependency) samples the balancer's Python stacks from outside,
200 times a second, while it streams; the samples are grouped by the innermost Python frame's
module into the stages of the hot path. Time spent inside a C function (``bytes.split``,
``os.write``, ``recv_into``) counts on the line of the Python frame that called it, which is
what makes the grouping meaningful: the ``b"".join`` of a pipe's events is a line of
``service.py``, the ``write`` system call a line of ``pipes.py``.

py-spy stops the process for each sample (a few tens of microseconds): the profiled run is
extra and none of its figures go into the results.
"""

from __future__ import annotations

import collections
import shutil
import signal
import subprocess
import sys
from pathlib import Path

# (stage, test on the innermost frame "function (path:line)"), first match wins.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("websocket frame parsing (websockets)", ("/websockets/",)),
    ("split and route (split.py, routing.py)", ("split.py", "routing.py", "spans.py")),
    ("b''.join and write() per pipe (pipes.py)", ("pipes.py",)),
    ("receive_into, TLS decryption (transport/)", ("/transport/",)),
    ("feed protocol (feed.py, connection.py)", ("feed.py", "connection.py")),
    ("epoll wait (selectors)", ("selectors.py",)),
]
OTHER = "other (event loop, timers, stats)"
SAMPLE_RATE = 200


def find_py_spy() -> str | None:
    """Return the py-spy executable next to this interpreter or on PATH, or None."""
    beside = Path(sys.executable).with_name("py-spy")
    if beside.exists():
        return str(beside)
    return shutil.which("py-spy")


def open_profiler(pid: int, output: Path) -> subprocess.Popen[bytes] | None:
    """Start sampling ``pid`` into ``output`` (py-spy's raw format); None without py-spy."""
    executable = find_py_spy()
    if executable is None:
        return None
    argv = [executable, "record", "--pid", str(pid), "--rate", str(SAMPLE_RATE)]
    argv += ["--format", "raw", "--output", str(output)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def close_profiler(profiler: subprocess.Popen[bytes]) -> None:
    """Stop sampling; py-spy writes its file on SIGINT."""
    if profiler.poll() is None:
        profiler.send_signal(signal.SIGINT)
    try:
        profiler.wait(30)
    except subprocess.TimeoutExpired:
        profiler.kill()
        profiler.wait()


def stage_of(frame: str) -> str:
    """Return the stage an innermost frame belongs to."""
    for stage, needles in STAGES:
        if any(needle in frame for needle in needles):
            return stage
    return OTHER


def summarize(path: Path, top: int = 12) -> dict[str, object]:
    """Return the share of samples per stage and the busiest lines, from a raw py-spy file."""
    stages: collections.Counter[str] = collections.Counter()
    lines: collections.Counter[str] = collections.Counter()
    total = 0
    for record in path.read_text().splitlines():
        stack, _, count = record.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        samples = int(count)
        total += samples
        stages[stage_of(leaf)] += samples
        lines[leaf] += samples
    if not total:
        return {"samples": 0, "stages": {}, "lines": []}
    return {
        "samples": total,
        "stages": {stage: count / total for stage, count in stages.most_common()},
        "lines": [(line, count / total) for line, count in lines.most_common(top)],
    }
