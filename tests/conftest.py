"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from debpackages import Packages
from hypothesis import settings

from tradebalancer.reader import framing

# No deadline: a per-example time limit is a timed test, which fails on a loaded machine and
# proves nothing (speed is measured by make bench).
settings.register_profile("tradebalancer", deadline=None)
settings.load_profile("tradebalancer")


@pytest.fixture(scope="module", params=["c", "python"])
def framing_loop(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a module's tests with the C message loop, then with the Python loop alone.

    A module asks for it with ``pytestmark = pytest.mark.usefixtures("framing_loop")``.
    """
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "python":
            patch.setattr(framing, "_parse_in_c", None)
        yield request.param


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory) -> Packages:
    """This tree's Debian packages, each (distribution, version) built once per session."""
    return Packages(tmp_path_factory.mktemp("packages"))


@pytest.fixture
def balancers() -> Iterator[list[Any]]:
    """Balancers a test starts (test_service.Balancer): killed at the end if still running."""
    started: list[Any] = []
    yield started
    for balancer in started:
        if balancer.process.poll() is None:
            balancer.process.kill()
            balancer.process.wait()
