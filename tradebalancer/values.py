"""A value of the configuration file, read and checked: every error names its key path.

Owns how one value is taken out of the parsed TOML and checked, whatever key it sits under: a
feed's merged values read by key (``Reader``: integers, numbers, strings, choices, arrays),
tables and strings, a host, an address, a CA bundle, ``${NAME}`` variables in paths, and the
words of an error (``describe`` a value; an unknown key with the nearest known one). config.py
says which key means what; this module says how a value is read. Reads no file but the CA
bundle a key names, which it parses as ``run`` will.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from typing import Literal, TypeVar

from .address import Address, parse_address
from .errors import ConfigError

__all__ = [
    "Choice",
    "Reader",
    "Values",
    "as_address",
    "as_string",
    "as_table",
    "check_ca_file",
    "check_variables",
    "describe",
    "expand_variables",
    "unknown_key",
    "unset_variables",
    "valid_host",
]

Values = dict[str, tuple[object, str]]  # flat key ("reconnect.max") -> (value, key path)
Choice = TypeVar("Choice", bound=str)
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")  # ${NAME} in a path
_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


class Reader:
    """Reads one feed's merged values by key, each error naming where the value was written."""

    def __init__(self, name: str, values: Values) -> None:
        self.name = name
        self.values = values

    def get(self, key: str, default: object) -> tuple[object, str]:
        return self.values.get(key, (default, f"feeds.{self.name}.{key}"))

    def path(self, key: str) -> str:
        return self.get(key, None)[1]

    def integer(self, key: str, default: int, low: int, high: int | None, unit: str = "") -> int:
        value, path = self.get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < low
            or (high is not None and value > high)
        ):
            limits = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise ConfigError(path, f"must be an integer {limits}{unit}, got {describe(value)}")
        return value

    def number(
        self,
        key: str,
        default: float,
        low: float = 0.0,
        *,
        strict: bool = True,
        maximum: float | None = None,
    ) -> float:
        value, path = self.get(key, default)
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            above = value > low if strict else value >= low
            if above and (maximum is None or value <= maximum):
                return float(value)
        limits = f"{'>' if strict else '>='} {low:g}"
        if maximum is not None:
            limits += f" and <= {maximum:g}"
        raise ConfigError(path, f"must be a number {limits}, got {describe(value)}")

    def string(self, key: str, default: str, *, empty: bool = True, variables: bool = False) -> str:
        value, path = self.get(key, default)
        text = as_string(value, path, empty)
        if variables:
            check_variables(text, path)
        return text

    def optional(self, key: str, *, variables: bool = False) -> str | None:
        if self.get(key, None)[0] is None:
            return None
        return self.string(key, "", empty=False, variables=variables)

    def choice(self, key: str, default: Choice, choices: tuple[Choice, ...]) -> Choice:
        value, path = self.get(key, default)
        for choice in choices:
            if value == choice:
                return choice
        quoted = ", ".join(f'"{choice}"' for choice in choices)
        raise ConfigError(path, f"must be one of {quoted}, got {describe(value)}")

    def strings(
        self,
        key: str,
        default: Sequence[str],
        pattern: re.Pattern[str] | None = None,
        what: str = "",
        *,
        empty: bool = False,
    ) -> list[str]:
        value, path = self.get(key, list(default))
        if not isinstance(value, list) or (not empty and not value):
            kind = "an array of strings" if empty else "a non-empty array of strings"
            raise ConfigError(path, f"must be {kind}, got {describe(value)}")
        items = [as_string(item, f"{path}[{index}]", False) for index, item in enumerate(value)]
        for index, item in enumerate(items):
            if pattern is not None and not pattern.fullmatch(item):
                raise ConfigError(f"{path}[{index}]", f"must be {what}, got {describe(item)}")
        return items

    def pipe_size(self) -> int | Literal["max"]:
        if self.get("pipe_size", "max")[0] == "max":
            return "max"
        return self.integer("pipe_size", 0, 4096, 1 << 31, ' (bytes) or "max"')


def as_address(value: object, path: str) -> Address | None:
    text = as_string(value, path)
    if not text:
        return None
    try:
        return parse_address(text)
    except ValueError as exc:
        raise ConfigError(path, str(exc)) from None


def valid_host(host: str) -> bool:
    """A DNS name (RFC 1123 labels; "_" allowed, as some internal names have it) or an
    IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in host.split("."))
    return True


def check_ca_file(ca_file: str, path: str) -> None:
    """Parse ``ca_file`` as ``run`` will: a bundle OpenSSL cannot load fails here, not at
    every connection attempt forever."""
    if not os.path.isfile(ca_file):
        raise ConfigError(
            path, f"must name a PEM CA bundle, got {describe(ca_file)}, which is not a file"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=ca_file)
    except (ssl.SSLError, OSError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(
            path,
            f"must name a PEM CA bundle, got {describe(ca_file)}, which OpenSSL cannot load "
            f"({reason}); point it at the PEM file of the CA that signed the feed's certificate",
        ) from exc
    if not context.get_ca_certs():
        raise ConfigError(
            path, f"must name a PEM CA bundle, got {describe(ca_file)}, which holds no CA"
        )


def describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | list):
        text = json.dumps(value, ensure_ascii=False, default=str)
        return text if len(text) <= 80 else text[:77] + "..."
    return f"{value} (a {type(value).__name__})"  # TOML dates and times


def as_table(value: object, path: str, expected: str = "a table") -> dict[str, object]:
    if not isinstance(value, dict):
        raise ConfigError(path, f"must be {expected}, got {describe(value)}")
    return value


def as_string(value: object, path: str, empty: bool = True) -> str:
    if not isinstance(value, str) or (not empty and not value):
        kind = "a string" if empty else "a non-empty string"
        raise ConfigError(path, f"must be {kind}, got {describe(value)}")
    return value


def unknown_key(path: str, key: str, known: Sequence[str] | frozenset[str]) -> ConfigError:
    if key == "api_key":
        return ConfigError(
            path,
            "the API key does not belong in this file: put it in the file api_key_file names "
            "(systemd: LoadCredential=api-key:...) or in a variable api_key_env names",
        )
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(known))}"
    return ConfigError(path, f"unknown key; {hint}")


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
