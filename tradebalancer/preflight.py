"""What ``run`` would fail on at start, checked before anything starts.

Owns the checks of a feed's worker plans (plan.py) against this machine: the working directory
exists, is a directory and may be entered; each worker's program is found the way execvpe(3)
will look for it (a name with a slash from the working directory, a bare name along the
worker's own PATH) and is an executable regular file. ``check-config`` (the unit's
ExecStartPre=) and ``run`` call it alike, so a mistake is exit 78 with the key to fix, which
the unit does not restart, rather than exit 71 at the first spawn, which it restarts five
times. What the configuration alone decides (URL, CA file) is checked by config.py; the key by
credentials.py.

For a feed with a ``[feeds.NAME.jetstream]`` table it also checks what can be checked without
a NATS server (``check_jetstream``): the credentials file is there, readable, of a kind the
client takes (a ``.creds`` file or an NKey seed also needs the ``nkeys`` package) and
private; and it says where the remote partitions go (``describe_jetstream``). The server,
the stream and the credentials' acceptance are the bridge's to check, at its start
(bridge/server.py).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence

from .config import FeedConfig, JetStreamConfig
from .errors import ConfigError
from .plan import WorkerPlan, local_workers
from .reader import ReaderError
from .reader.jetstream import connect_options
from .units import format_ranges
from .values import expand_variables, unset_variables

__all__ = [
    "check_jetstream",
    "check_plans",
    "describe_jetstream",
    "find_program",
    "jetstream_clash",
]

DEFAULT_MAX_PAYLOAD = 1 << 20  # nats-server's max_payload unless its configuration raises it


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


def describe_jetstream(feed: FeedConfig) -> list[str]:
    """What check-config says of the remote partitions: where they go and how."""
    jetstream = feed.jetstream
    if jetstream is None:
        return []
    first, last = jetstream.partitions[0], jetstream.partitions[-1]
    prefix = jetstream.subject_prefix
    subjects = f"{prefix}.{first}" if first == last else f"{prefix}.{first} ... {prefix}.{last}"
    return [
        f"jetstream: partitions {format_ranges(jetstream.partitions)} of {feed.pipes} go to stream "
        f"{jetstream.stream} (subjects {subjects}; the stream takes {prefix}.>) on "
        f"{', '.join(jetstream.servers)}; {jetstream.storage} storage, replicas "
        f"{jetstream.replicas}, "
        + ("created if missing" if jetstream.create else "must exist (create = false)")
        + f"; published by the bridge (worker {local_workers(feed)})"
    ]


def check_jetstream(
    feed: FeedConfig, environ: Mapping[str, str], *, require_credentials: bool
) -> list[str]:
    """Check the jetstream table offline; return what to say (lines, warnings prefixed
    "warning: "), or raise ConfigError naming the key to fix.

    ``require_credentials``: a credentials path whose ``${VAR}`` is unset here is an error
    (``run``, and check-config --require-key) rather than "not checked here"."""
    jetstream = feed.jetstream
    if jetstream is None:
        return []
    lines = _check_credentials(feed, jetstream, environ, require_credentials)
    if jetstream.replicas > len(jetstream.servers):
        lines.append(
            f"warning: replicas = {jetstream.replicas} but {len(jetstream.servers)} server(s) "
            f"listed: the stream needs a cluster of at least {jetstream.replicas} servers; list "
            "them all, so that the bridge can reach the cluster when one is down"
        )
    if jetstream.max_batch_bytes > DEFAULT_MAX_PAYLOAD:
        lines.append(
            f"warning: max_batch_bytes = {jetstream.max_batch_bytes} is above nats-server's "
            "default max_payload (1 MiB): the bridge uses the server's max_payload instead "
            "unless the servers raise it"
        )
    return lines


def jetstream_clash(feed: FeedConfig, other: FeedConfig) -> str | None:
    """A warning when two feeds of one file would publish into one stream, else None."""
    mine, theirs = feed.jetstream, other.jetstream
    if mine is None or theirs is None or mine.stream != theirs.stream:
        return None
    if not set(mine.servers) & set(theirs.servers):
        return None
    return (
        f"warning: feeds.{feed.name} and feeds.{other.name} publish to the same JetStream "
        f"stream {mine.stream} on the same servers: the second bridge stops (its subjects are "
        "not the stream's, or another publisher writes them); give each feed its own stream"
    )


def _check_credentials(
    feed: FeedConfig, jetstream: JetStreamConfig, environ: Mapping[str, str], required: bool
) -> list[str]:
    key = f"feeds.{feed.name}.jetstream.credentials_file"
    if jetstream.credentials_file is None:
        return ["jetstream credentials: none (the servers must accept a connection without)"]
    unset = unset_variables(jetstream.credentials_file, environ)
    if unset and not required:
        return [
            f"jetstream credentials: {jetstream.credentials_file}: not checked here "
            f"(${{{unset[0]}}} is not set; the unit sets it, LoadCredential=)"
        ]
    path = expand_variables(jetstream.credentials_file, environ, key)
    try:
        options = connect_options(path)
    except ReaderError as exc:
        raise ConfigError(key, str(exc)) from exc
    lines = []
    if "user_credentials" in options:
        with open(path, encoding="utf-8") as file:
            has_seed = "BEGIN USER NKEY SEED" in file.read()
        if not has_seed:
            raise ConfigError(
                key, f"{path} has a user JWT but no NKey seed: write the whole .creds file nsc made"
            )
        kind = "a .creds file (user JWT and NKey seed)"
    elif "nkeys_seed" in options:
        kind = "a user NKey seed"
    else:
        kind = "USER:PASSWORD" if "user" in options else "a token"
    lines.append(f"jetstream credentials: {path}: {kind}, readable")
    mode = os.stat(path).st_mode
    if mode & 0o077:
        lines.append(
            f"warning: {path} may be read by other users (mode {stat.S_IMODE(mode):04o}): "
            "chmod 600 it, or load it with LoadCredential="
        )
    return lines
