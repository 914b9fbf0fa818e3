"""A real Prometheus server for tests: Debian's /usr/bin/prometheus on a private port and directory.

The server gets its own configuration, TSDB directory and working directory under the test's
tmp_path and listens on 127.0.0.1 at a free port, so it never touches /var/lib/prometheus, the
system unit's port (9090) or its configuration, whether or not the package started that
service. It scrapes every second, so a test sees a counter move within a few seconds.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

PROMETHEUS = Path("/usr/bin/prometheus")
PROMTOOL = Path("/usr/bin/promtool")
SCRAPE_INTERVAL = 1.0  # seconds; rules are evaluated as often


def require_prometheus() -> None:
    """Skip the calling test when Debian's prometheus package is not installed."""
    for binary in (PROMETHEUS, PROMTOOL):
        if not binary.exists():
            pytest.skip(f"needs {binary} from Debian's prometheus package (make deps installs it)")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(address: str, timeout: float = 5.0) -> tuple[str, str]:
    """GET /metrics from ``host:port``: the body and its Content-Type."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as response:
        return response.read().decode(), response.headers["Content-Type"]


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool with ``args``; its output and status are for the caller to judge."""
    return subprocess.run(
        [str(PROMTOOL), *args], input=stdin, capture_output=True, text=True, timeout=30
    )


class Prometheus:
    """``prometheus`` scraping ``targets`` every second, with ``rule_files`` loaded.

    A context manager: entering starts the server and waits until it answers; leaving stops it.
    """

    def __init__(
        self, directory: Path, targets: Sequence[str], rule_files: Sequence[Path] = ()
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.address = f"127.0.0.1:{free_port()}"
        self.config = directory / "prometheus.yml"
        self.log = directory / "prometheus.log"
        self.config.write_text(
            json.dumps(  # JSON is YAML: no YAML writer needed
                {
                    "global": {
                        "scrape_interval": f"{SCRAPE_INTERVAL:g}s",
                        "scrape_timeout": f"{SCRAPE_INTERVAL:g}s",
                        "evaluation_interval": f"{SCRAPE_INTERVAL:g}s",
                    },
                    "rule_files": [str(path) for path in rule_files],
                    "scrape_configs": [
                        {"job_name": "tradebalancer", "static_configs": [{"targets": [*targets]}]}
                    ],
                },
                indent=2,
            )
        )
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Prometheus:
        require_prometheus()
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.directory / 'data'}",
                    f"--web.listen-address={self.address}",
                    # The console files of the Debian default live under /etc: not ours to read.
                    f"--web.console.templates={self.directory}",
                    f"--web.console.libraries={self.directory}",
                ],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            self.wait_for(self._ready, 30, "prometheus to answer /-/ready")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def log_text(self) -> str:
        """What the server logged so far."""
        return self.log.read_text(errors="replace")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def wait_for(self, predicate: Callable[[], object], timeout: float, what: str) -> Any:
        """Poll ``predicate`` until it returns something true, and return that."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(
                    f"prometheus exited {self.process.returncode}:\n{self.log_text()[-4000:]}"
                )
            result = predicate()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.2)

    def request(self, path: str, params: dict[str, str] | None = None) -> tuple[int, Any]:
        """GET an API path: the HTTP status and the decoded JSON body (errors included)."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://{self.address}{path}{query}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            with error:
                return error.code, json.loads(error.read() or b"{}")

    def api(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET an API path that must succeed; its ``data``."""
        status, body = self.request(path, params)
        assert status == 200 and body.get("status") == "success", f"{path} {params}: {body}"
        return body["data"]

    def query(self, expression: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (now, or at the Unix time ``at``): a list of
        {"metric": labels, "value": [time, "text"]}."""
        params = {"query": expression} | ({"time": repr(at)} if at is not None else {})
        data = self.api("/api/v1/query", params)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def values(
        self, expression: str, at: float | None = None
    ) -> dict[tuple[tuple[str, str], ...], float]:
        """An instant query's result as {sorted label pairs: value}."""
        return {
            tuple(sorted(item["metric"].items())): float(item["value"][1])
            for item in self.query(expression, at)
        }

    def value(self, expression: str, at: float | None = None) -> float | None:
        """The one value of an instant query, or None if it has no result."""
        result = self.query(expression, at)
        assert len(result) <= 1, f"{expression}: more than one series: {result}"
        return float(result[0]["value"][1]) if result else None

    def wait_value(
        self,
        expression: str,
        accept: Callable[[float], bool],
        timeout: float = 15.0,
        what: str = "",
    ) -> float:
        """Poll ``expression`` until it has one value that ``accept`` takes; return that value."""
        seen: list[float | None] = []

        def check() -> bool:
            value = self.value(expression)
            seen.append(value)
            return value is not None and accept(value)

        try:
            self.wait_for(check, timeout, what or expression)
        except AssertionError as error:
            raise AssertionError(f"{error}: {expression} was {seen[-5:]}") from None
        value = seen[-1]
        assert value is not None
        return value

    def targets_up(self) -> bool:
        """True once every configured target was scraped with success."""
        active = self.api("/api/v1/targets")["activeTargets"]
        return bool(active) and all(target["health"] == "up" for target in active)

    def wait_targets_up(self, timeout: float = 15.0) -> None:
        """Wait until every target is up, saying why it is not if it never is."""
        try:
            self.wait_for(self.targets_up, timeout, "every target up")
        except AssertionError as error:
            active = self.api("/api/v1/targets")["activeTargets"]
            raise AssertionError(f"{error}: {active}") from None
