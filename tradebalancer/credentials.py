"""The API key: where it is found, and what makes it acceptable.

Owns reading the key for a feed: the file ``api_key_file`` names (by default the systemd
credential ``${CREDENTIALS_DIRECTORY}/api-key``), else the first non-empty variable of
``api_key_env``; and the checks on what was found (not empty, no spaces or control
characters). Must not touch: the configuration file (``config`` validated the feed table
already), the network. The key is returned, never kept, never logged and never put in a
message: errors name the file or the variable, not the content.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from .config import FeedConfig
from .errors import ConfigError
from .values import expand_variables, unset_variables


def resolve_api_key(feed: FeedConfig, environ: Mapping[str, str]) -> str:
    """Return the API key of ``feed``: from ``api_key_file``, else the first ``api_key_env``."""
    return _find_api_key(feed, environ)[0]


def describe_api_key_source(feed: FeedConfig, environ: Mapping[str, str]) -> str:
    """Say where ``resolve_api_key`` finds the key ("file ...", "environment variable ...")."""
    return _find_api_key(feed, environ)[1]


def api_key_file(feed: FeedConfig, environ: Mapping[str, str]) -> str | None:
    """The file ``resolve_api_key`` reads the key from, or None if it comes from a variable."""
    return _find_api_key(feed, environ)[2]


def _find_api_key(feed: FeedConfig, environ: Mapping[str, str]) -> tuple[str, str, str | None]:
    key_path = f"feeds.{feed.name}.api_key_file"
    if not feed.api_key_file:
        looked = "api_key_file is empty"
    elif unset := unset_variables(feed.api_key_file, environ):
        looked = f"api_key_file {feed.api_key_file} was not read (${unset[0]} is not set)"
    else:
        file = expand_variables(feed.api_key_file, environ, key_path)
        try:
            text = Path(file).read_bytes().decode("utf-8")
        except FileNotFoundError:
            looked = f"{file} does not exist"
        except OSError as exc:
            raise ConfigError(key_path, f"cannot read {file}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(key_path, f"{file} is not UTF-8 text") from exc
        else:
            return _check_key(text, file, key_path), f"file {file}", file
    for name in feed.api_key_env:
        if environ.get(name, "").strip():
            env_path = f"feeds.{feed.name}.api_key_env"
            key = _check_key(environ[name], f"${name}", env_path)
            return key, f"environment variable {name}", None
    if feed.api_key_env:
        verb = "is" if len(feed.api_key_env) == 1 else "are"
        env_text = f"{', '.join(feed.api_key_env)} {verb} unset or empty"
    else:
        env_text = "api_key_env names no variable"
    first = feed.api_key_env[0] if feed.api_key_env else "a variable named in api_key_env"
    raise ConfigError(
        key_path,
        f"no API key: {looked}, and {env_text}; put the key in the file api_key_file names "
        f"(systemd: LoadCredential=api-key:/etc/tradebalancer/{feed.name}.key, as the packaged "
        f"unit does) or set {first}",
    )


def _check_key(text: str, source: str, key_path: str) -> str:
    key = text.strip()
    if not key:
        raise ConfigError(key_path, f"the API key in {source} is empty")
    if any(character.isspace() or not character.isprintable() for character in key):
        raise ConfigError(key_path, f"the API key in {source} has spaces or control characters")
    return key


def share_a_key(first: FeedConfig, second: FeedConfig, environ: Mapping[str, str]) -> bool:
    """Whether two feeds would connect with the same API key to the same cluster (URL).

    The feed allows one connection per key and cluster: two such feeds would take the stream
    from each other in turn (max_connections). Keys that can be read are compared; otherwise
    their sources: the same file path, or the same variables; a path under
    ${CREDENTIALS_DIRECTORY} is each systemd instance's own credential, never shared.
    """
    if (first.host, first.port, first.path) != (second.host, second.port, second.path):
        return False
    try:
        return _find_api_key(first, environ)[0] == _find_api_key(second, environ)[0]
    except ConfigError:
        pass
    if first.api_key_file or second.api_key_file:
        per_instance = "${CREDENTIALS_DIRECTORY}" in first.api_key_file
        return first.api_key_file == second.api_key_file and not per_instance
    return first.api_key_env == second.api_key_env
