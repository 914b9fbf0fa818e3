"""What a worker is started with: its argv, rendered from jinja2 templates, and its directory.

Owns the run-time expansion of the configuration: the worker command (a list of jinja2
templates, one per argv element, so no shell ever splits or quotes anything), the division of
the pipes among the workers, and the ``${VAR}`` references in paths (``working_directory``,
``api_key_file``), which take their values from the environment systemd gives the service.
Does no spawning and reads no files.

Design notes:

* Templates are compiled with ``StrictUndefined``: a misspelt variable is an error, never an
  empty string. The configuration loader renders every template for every worker, so a bad
  template fails ``check-config`` (exit 78), not the spawn of worker 5 an hour later.
* Pipes go to workers in contiguous blocks as even as possible: worker ``w`` of ``W`` gets
  pipes ``[w*N//W, (w+1)*N//W)``. Every pipe has exactly one worker and block sizes differ by
  at most one, so the load stays even when ``W`` does not divide ``N``.
* A worker sees its pipes' read ends as descriptors 3, 4, ... in pipe order (the spawner moves
  them there); ``fds`` lists those numbers, and ``pass_fds = "append"`` adds them after the
  rendered arguments, which is the contract of the C original's workers.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import jinja2
import jinja2.meta

from .errors import ConfigError
from .reader.format import FIRST_FD

if TYPE_CHECKING:
    from .config import FeedConfig

# The variables a worker command template may use, in the order the error messages list them.
KNOWN_VARIABLES = ("feed", "worker", "workers", "fds", "pipes", "pipe_count", "workdir", "python")

_ENVIRONMENT = jinja2.Environment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False
)
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class CommandTemplate:
    """A compiled worker command: one jinja2 template per argv element."""

    sources: tuple[str, ...]
    key_path: str
    templates: tuple[jinja2.Template, ...] = field(repr=False, compare=False)

    def render(self, variables: Mapping[str, object]) -> list[str]:
        """Return the argv for ``variables``; raise ConfigError naming the element that failed."""
        argv = []
        for index, (source, template) in enumerate(zip(self.sources, self.templates, strict=True)):
            key_path = f"{self.key_path}[{index}]"
            where = f"worker {variables.get('worker', '?')}"
            try:
                text = template.render(variables)
            except jinja2.UndefinedError as exc:
                raise ConfigError(
                    key_path, f"{exc.message} in template {source!r} ({where})"
                ) from exc
            except Exception as exc:  # the template's own code failed: report, don't crash
                raise ConfigError(
                    key_path, f"template {source!r} failed ({where}): {type(exc).__name__}: {exc}"
                ) from exc
            if not text:
                raise ConfigError(
                    key_path,
                    f"template {source!r} renders to an empty string ({where}); "
                    "every element must be one non-empty argument",
                )
            if "\0" in text:
                raise ConfigError(
                    key_path,
                    f"template {source!r} renders to a string with a NUL character ({where}), "
                    "which no argument can hold",
                )
            argv.append(text)
        return argv


def compile_command(templates: Sequence[str], key_path: str) -> CommandTemplate:
    """Compile the argv templates of ``key_path``; ConfigError on bad syntax or an unknown name."""
    if not templates:
        raise ConfigError(key_path, "must be a non-empty array of strings, got []")
    compiled = []
    for index, source in enumerate(templates):
        element_path = f"{key_path}[{index}]"
        try:
            # Parsing finds the variables the template reads, in every branch, not just the
            # branch the would-be variables happen to take.
            tree = _ENVIRONMENT.parse(source)
            unknown = jinja2.meta.find_undeclared_variables(tree)
            compiled.append(_ENVIRONMENT.from_string(tree))
        except jinja2.TemplateSyntaxError as exc:
            raise ConfigError(
                element_path,
                f"syntax error in template {source!r} at line {exc.lineno}: {exc.message}",
            ) from exc
        for name in sorted(unknown):
            if name not in KNOWN_VARIABLES:
                raise ConfigError(
                    element_path,
                    f"unknown variable {name!r} in template {source!r}; "
                    f"known: {', '.join(KNOWN_VARIABLES)}",
                )
    return CommandTemplate(tuple(templates), key_path, tuple(compiled))


def pipe_block(pipe_count: int, workers: int, worker: int) -> range:
    """Return the pipe indexes of ``worker``: the contiguous block ``[w*N//W, (w+1)*N//W)``."""
    if not 0 <= worker < workers <= pipe_count:
        raise ValueError(f"worker {worker} of {workers} over {pipe_count} pipes")
    return range(worker * pipe_count // workers, (worker + 1) * pipe_count // workers)


def pipes_for_worker(feed: FeedConfig, worker: int) -> list[int]:
    """Return the indexes of the pipes ``worker`` of ``feed`` reads, in order."""
    return list(pipe_block(feed.pipes, feed.workers, worker))


def worker_variables(feed: FeedConfig, worker: int, workdir: str) -> dict[str, object]:
    """Return the variables the command template of ``feed`` is rendered with for ``worker``."""
    pipes = pipes_for_worker(feed, worker)
    return {
        "feed": feed.name,
        "worker": worker,
        "workers": feed.workers,
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
        count = len(pipe_block(feed.pipes, feed.workers, worker))
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


def check_variables(text: str, key_path: str) -> None:
    """Raise ConfigError if ``text`` has a ``$`` that does not start a well-formed ``${NAME}``."""
    remainder = _VARIABLE.sub("", text)
    if "${" in remainder:
        bad = remainder[remainder.index("${") :]
        raise ConfigError(
            key_path,
            "must write variables as ${NAME}, NAME being letters, digits and _, "
            f"got {text!r} (at {bad[:24]!r})",
        )


def unset_variables(text: str, environ: Mapping[str, str]) -> list[str]:
    """Return the names ``text`` refers to as ``${NAME}`` that ``environ`` leaves unset or empty."""
    return [name for name in _VARIABLE.findall(text) if not environ.get(name)]


def expand_variables(text: str, environ: Mapping[str, str], key_path: str) -> str:
    """Return ``text`` with each ``${NAME}`` replaced from ``environ``; ConfigError if unset."""
    unset = unset_variables(text, environ)
    if unset:
        raise ConfigError(
            key_path,
            f"{text!r} refers to ${{{unset[0]}}}, which is not set in the environment; "
            "set it or write the path out",
        )
    return _VARIABLE.sub(lambda match: environ[match.group(1)], text)
