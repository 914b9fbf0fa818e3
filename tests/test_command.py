"""The worker command: jinja2 templates compiled and rendered to argv, one element each."""

from __future__ import annotations

import pytest

from tradebalancer.command import KNOWN_VARIABLES, compile_command
from tradebalancer.errors import ConfigError


@pytest.mark.parametrize(
    ("templates", "index", "message"),
    [
        (
            ["worker", "--x", "{{ fd }}"],
            2,
            "unknown variable 'fd' in template '{{ fd }}'; known: " + ", ".join(KNOWN_VARIABLES),
        ),
        (
            ["{% if worker > 5 %}{{ nope }}{% endif %}x"],
            0,
            "unknown variable 'nope' in template '{% if worker > 5 %}{{ nope }}{% endif %}x'",
        ),
        (["w", "{{ feed }}\n{% if %}"], 1, "at line 2: Expected an expression"),
        (["{{ feed | nosuchfilter }}"], 0, "No filter named 'nosuchfilter'"),
        (["{{ feed "], 0, "syntax error in template '{{ feed ' at line 1"),
    ],
)
def test_a_bad_template_fails_to_compile_naming_its_element(
    templates: list[str], index: int, message: str
) -> None:
    """Unknown variables (in any branch), syntax errors and unknown filters fail compilation."""
    with pytest.raises(ConfigError) as caught:
        compile_command(templates, "feeds.feed.command")
    assert caught.value.key_path == f"feeds.feed.command[{index}]"
    assert message in caught.value.message


def test_an_empty_command_is_refused() -> None:
    """A command with no element at all cannot start anything."""
    with pytest.raises(ConfigError, match="non-empty array") as caught:
        compile_command([], "defaults.command")
    assert caught.value.key_path == "defaults.command"


def test_a_single_trailing_newline_is_dropped() -> None:
    """keep_trailing_newline is off: a multi-line TOML string does not end its argument in \\n."""
    template = compile_command(["{{ feed }}\n"], "feeds.feed.command")
    assert template.render({"feed": "feed", "worker": 0}) == ["feed"]
