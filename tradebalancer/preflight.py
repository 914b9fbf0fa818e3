"""What ``run`` would fail on at start, checked before anything starts.

Owns the checks of a feed's worker plans (plan.py) against this machine: the working directory
exists, is a directory and may be entered; each worker's program is found the way execvpe(3)
will look for it (a name with a slash from the working directory, a bare name along the
worker's own PATH) and is an executable regular file. ``check-config`` (the unit's
ExecStartPre=) and ``run`` call it alike, so a mistake is exit 78 with the key to fix, which
the unit does not restart, rather than exit 71 at the first spawn, which it restarts five
times. What the configuration alone decides (URL, CA file) is checked by config.py; the key by
credentials.py.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from .config import FeedConfig
from .errors import ConfigError
from .plan import WorkerPlan

__all__ = ["check_plans", "find_program"]


def check_plans(feed: FeedConfig, plans: Sequence[WorkerPlan]) -> None:
    """Raise ConfigError, naming the key to fix, for the first thing that would stop a worker."""
    checked: set[tuple[str, str, str]] = set()
    for worker in plans:
        _check_directory(feed, worker.cwd)
        program, path = worker.argv[0], worker.env.get("PATH", os.defpath)
        if (program, worker.cwd, path) in checked:
            continue
        checked.add((program, worker.cwd, path))
        problem = _program_problem(program, worker.cwd, path)
        if problem is not None:
            raise ConfigError(f"feeds.{feed.name}.command[0]", f"{problem} (worker {worker.index})")


def find_program(program: str, cwd: str, path: str) -> str | None:
    """Return the file execvpe(3) would run for ``program`` from ``cwd``, or None."""
    for candidate in _candidates(program, cwd, path):
        if _is_executable_file(candidate):
            return candidate
    return None


def _check_directory(feed: FeedConfig, cwd: str) -> None:
    key = f"feeds.{feed.name}.working_directory"
    try:
        mode = os.stat(cwd).st_mode
    except FileNotFoundError:
        raise ConfigError(
            key, f"{cwd} does not exist: create it (the workers run there) or choose another"
        ) from None
    except OSError as exc:
        raise ConfigError(key, f"{cwd}: {exc.strerror}") from exc
    if not stat.S_ISDIR(mode):
        raise ConfigError(key, f"{cwd} is not a directory; the workers run in a directory")
    if not os.access(cwd, os.X_OK):
        raise ConfigError(key, f"{cwd} cannot be entered by uid {os.geteuid()} (permission denied)")


def _candidates(program: str, cwd: str, path: str) -> list[str]:
    if "/" in program:
        return [os.path.join(cwd, program)]
    # execvpe: each PATH entry in turn, an empty one meaning the current directory
    return [os.path.join(cwd, entry or ".", program) for entry in path.split(":")]


def _is_executable_file(candidate: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(candidate).st_mode) and os.access(candidate, os.X_OK)
    except OSError:
        return False


def _program_problem(program: str, cwd: str, path: str) -> str | None:
    if find_program(program, cwd, path) is not None:
        return None
    if "/" not in program:
        return (
            f"{program!r} is not an executable on the workers' PATH ({path}); "
            "install it or give its full path"
        )
    where = os.path.join(cwd, program)
    shown = program if os.path.isabs(program) else f"{program} (from {cwd})"
    try:
        mode = os.stat(where).st_mode
    except FileNotFoundError:
        return f"{shown}: no such file; fix the path or install the worker"
    except OSError as exc:
        return f"{shown}: {exc.strerror}"
    if not stat.S_ISREG(mode):
        return f"{shown} is not a file"
    return f"{shown} is not executable by uid {os.geteuid()}; chmod +x it"
