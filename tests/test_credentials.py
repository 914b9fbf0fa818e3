"""The API key: the credential file first, then the environment; errors that never show it."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from tradebalancer import config, credentials
from tradebalancer.config import FeedConfig
from tradebalancer.errors import ConfigError

FEED = '[feeds.feed]\ncommand = ["worker"]\n'
SECRET = "Zq8-SECRET-api-key-77"


def load_feed(text: str) -> FeedConfig:
    """Load the TOML ``text`` and return its feed "feed"."""
    return config.loads(text).feed("feed")


def write_credential(tmp_path: Path, content: str) -> dict[str, str]:
    """Write ``content`` as the api-key credential; return the environment systemd would set."""
    (tmp_path / "api-key").write_text(content)
    return {"CREDENTIALS_DIRECTORY": str(tmp_path)}


def test_the_key_comes_from_the_credential_file_first(tmp_path: Path) -> None:
    """With $CREDENTIALS_DIRECTORY/api-key present, the key is its stripped content."""
    environ = write_credential(tmp_path, f"  {SECRET}\n") | {"MASSIVE_API_KEY": "other"}
    feed = load_feed(FEED)
    assert credentials.resolve_api_key(feed, environ) == SECRET
    assert credentials.describe_api_key_source(feed, environ) == f"file {tmp_path}/api-key"


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({"MASSIVE_API_KEY": SECRET, "POLYGON_API_KEY": "other"}, "MASSIVE_API_KEY"),
        ({"MASSIVE_API_KEY": " ", "POLYGON_API_KEY": SECRET}, "POLYGON_API_KEY"),
        ({"POLYGON_API_KEY": f"{SECRET}\n"}, "POLYGON_API_KEY"),
    ],
)
def test_without_the_file_the_first_non_empty_variable_wins(
    environ: dict[str, str], variable: str
) -> None:
    """With no credential directory, the first non-empty api_key_env variable gives the key."""
    feed = load_feed(FEED)
    assert credentials.resolve_api_key(feed, environ) == SECRET
    assert credentials.describe_api_key_source(feed, environ) == f"environment variable {variable}"


def test_a_missing_file_falls_back_to_the_environment(tmp_path: Path) -> None:
    """$CREDENTIALS_DIRECTORY set but no api-key in it: the environment is tried next."""
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path), "MASSIVE_API_KEY": SECRET}
    assert credentials.resolve_api_key(load_feed(FEED), environ) == SECRET


def test_configured_file_and_variables_are_used(tmp_path: Path) -> None:
    """api_key_file and api_key_env replace the defaults; "" turns the file off."""
    (tmp_path / "key").write_text(SECRET)
    feed = load_feed(FEED + f'api_key_file = "{tmp_path}/key"\napi_key_env = ["MY_KEY"]')
    assert credentials.resolve_api_key(feed, {}) == SECRET
    feed = load_feed(FEED + 'api_key_file = ""\napi_key_env = ["MY_KEY"]')
    assert credentials.resolve_api_key(feed, {"MY_KEY": SECRET, "MASSIVE_API_KEY": "no"}) == SECRET


@pytest.mark.parametrize(
    ("lines", "credential", "environ", "parts"),
    [
        (
            "",
            None,
            {},
            [
                "no API key: api_key_file ${CREDENTIALS_DIRECTORY}/api-key was not read "
                "($CREDENTIALS_DIRECTORY is not set)",
                "MASSIVE_API_KEY, POLYGON_API_KEY are unset or empty",
                "LoadCredential=api-key:/etc/tradebalancer/feed.key",
                "or set MASSIVE_API_KEY",
            ],
        ),
        ("", None, {"MASSIVE_API_KEY": ""}, ["{dir}/api-key does not exist", "MASSIVE_API_KEY"]),
        (
            'api_key_file = ""\napi_key_env = []',
            None,
            {"MASSIVE_API_KEY": SECRET},
            ["api_key_file is empty, and api_key_env names no variable"],
        ),
        ('api_key_env = ["K"]', None, {}, ["K is unset or empty", "or set K"]),
    ],
)
def test_no_key_anywhere_says_exactly_where_it_looked(
    tmp_path: Path, lines: str, credential: str | None, environ: dict[str, str], parts: list[str]
) -> None:
    """The error names the file (expanded when it can be), every variable, and what to do."""
    if "does not exist" in parts[0]:
        environ = environ | {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    feed = load_feed(FEED + lines)
    with pytest.raises(ConfigError) as caught:
        credentials.resolve_api_key(feed, environ)
    assert caught.value.key_path == "feeds.feed.api_key_file"
    for part in parts:
        assert part.replace("{dir}", str(tmp_path)) in caught.value.message
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("\n  \n", "is empty"),
        (f"{SECRET} {SECRET}", "has spaces or control characters"),
        (f"{SECRET}\x07", "has spaces or control characters"),
    ],
)
def test_a_bad_key_file_is_an_error_that_never_shows_the_key(
    tmp_path: Path, content: str, message: str
) -> None:
    """An empty key file or one with more than a key stops here, without quoting its content."""
    environ = write_credential(tmp_path, content) | {"MASSIVE_API_KEY": "fallback-not-used"}
    with pytest.raises(ConfigError) as caught:
        credentials.resolve_api_key(load_feed(FEED), environ)
    assert caught.value.key_path == "feeds.feed.api_key_file"
    assert caught.value.message == f"the API key in {tmp_path}/api-key {message}"
    assert SECRET not in str(caught.value)
    assert "fallback" not in str(caught.value)


def test_an_unreadable_key_file_is_an_error(tmp_path: Path) -> None:
    """A key path that cannot be read (here a directory) is reported, not skipped."""
    (tmp_path / "api-key").mkdir()
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path), "MASSIVE_API_KEY": SECRET}
    with pytest.raises(ConfigError, match=f"cannot read {re.escape(str(tmp_path))}/api-key: "):
        credentials.resolve_api_key(load_feed(FEED), environ)


def test_a_bad_key_in_a_variable_names_the_variable_not_the_key() -> None:
    """A variable holding two words is refused under api_key_env, naming the variable only."""
    with pytest.raises(ConfigError) as caught:
        credentials.resolve_api_key(load_feed(FEED), {"MASSIVE_API_KEY": f"{SECRET} x"})
    assert caught.value.key_path == "feeds.feed.api_key_env"
    assert "$MASSIVE_API_KEY" in caught.value.message
    assert SECRET not in str(caught.value)


def test_the_key_never_appears_in_the_configuration(tmp_path: Path) -> None:
    """The key is not kept in the FeedConfig: neither its repr nor its fields hold it."""
    environ = write_credential(tmp_path, SECRET)
    feed = load_feed(FEED)
    assert credentials.resolve_api_key(feed, environ) == SECRET
    assert SECRET not in repr(feed)
    for field in dataclasses.fields(feed):
        assert SECRET not in repr(getattr(feed, field.name))
    assert SECRET not in credentials.describe_api_key_source(feed, environ)
