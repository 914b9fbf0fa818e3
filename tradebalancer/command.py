"""The worker command: an argv rendered from jinja2 templates, one per element, never a shell.

Owns compiling and rendering the ``command`` key: a list of jinja2 templates, one per argv
element, so no shell ever splits or quotes anything. Knows nothing of feeds, pipes or workers:
``plan.py`` says what each worker's template is rendered with. Does no I/O.

Templates are compiled with ``StrictUndefined``: a misspelt variable is an error, never an
empty string; a variable the plan does not provide (``KNOWN_VARIABLES``) is refused when the
file is loaded, in every branch of the template, not only the one a test happens to take.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import jinja2
import jinja2.meta

from .errors import ConfigError

# The variables a worker command template may use, in the order the error messages list them.
KNOWN_VARIABLES = ("feed", "worker", "workers", "fds", "pipes", "pipe_count", "workdir", "python")

_ENVIRONMENT = jinja2.Environment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False
)


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
