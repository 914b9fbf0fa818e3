"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tradebalancer import framing


@pytest.fixture(scope="module", params=["c", "python"])
def framing_loop(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a module's tests with the C message loop, then with the Python loop alone.

    A module asks for it with ``pytestmark = pytest.mark.usefixtures("framing_loop")``.
    """
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "python":
            patch.setattr(framing, "_parse_in_c", None)
        yield request.param
