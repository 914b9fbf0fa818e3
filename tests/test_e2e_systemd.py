"""The Debian package and tradebalancer@.service under real systemd, in Debian 12 and 13 guests.

One boot per release (bookworm, then trixie, each with its own package) runs the whole
scenario of tests/vm/scenarios/systemd-e2e.sh: install the package,
refuse a wrong API key, stream a wss replay feed over kernel TLS into two verifying sink
workers (bench/sink.py), stop, restart on a watchdog timeout, upgrade to a rebuilt package,
purge. The guest records what it saw in results/results.env and a few evidence files in the
share; each test here judges one behaviour from them, prints what it checked, and fails with
the guest's output, console and journal.

The event check is exact: the host computes each pipe's event count and CRC-32 from the same
synthetic source (seed and count) with an independent splitter, and the sinks in the guest
report theirs at end of file.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from debpackages import UPGRADE_VERSION, Packages, debian_version
from test_packaging import read_key_values
from test_service import expected_streams
from tlsca import make_ca
from vm import SUITES, VMResult, ensure_image, run_scenario, vm_available

import tradebalancer
from tradebalancer.errors import ExitCode
from tradebalancer.replay import synth

REPO = Path(__file__).resolve().parent.parent
SINK = REPO / "bench" / "sink.py"
SNOOP = REPO / "tests" / "snoop.py"
SYSTEMD = REPO / "systemd"
EVENTS = 30_000  # Python under TCG is slow: enough to fill every pipe many times over
SEED = 20_261_124
PIPES = 5  # odd, as the README advises
WORKERS = 2
KEY = "e2e-test-key-7f3a"
WRONG_KEY = "e2e-wrong-key-0000"
WATCHDOG_SEC = 5
LOOP_RECORDING = "loop.jsonl"
LOOP_EVENTS = 5_000
VM_TIMEOUT = 600  # the scenario itself takes 2-4 minutes under TCG
TEST_TIMEOUT = 1200  # builds, the image (built once), the boot
UNIT = "tradebalancer@feed.service"
IDENTIFIER = "tradebalancer@feed"  # SyslogIdentifier=: the service's own lines
FEED_URL = "wss://localhost:9443/stocks"  # the replay feed in the guest (the scenario's config)
JOURNAL_PRIORITY = {"INFO": 6, "WARNING": 4, "ERROR": 3}  # syslog(3) numbers
# What the streaming run must log, in the journal, at which level (a substring of the message).
LIFECYCLE = [
    ("starting feed feed", "INFO"),
    (f"{PIPES} pipes of ", "INFO"),
    ("worker 0 started", "INFO"),
    ("connected to localhost:9443 (TLS: kernel)", "INFO"),
    ("authenticated; subscribing", "INFO"),
    ("subscription confirmed", "INFO"),
    ("events/s", "INFO"),  # the stats line
    ("the feed closed the websocket", "WARNING"),  # the replay's end: reconnecting
    ("SIGTERM received: stopping", "INFO"),
    ("worker 0 exited with status 0", "INFO"),
    (f"stopped: all {EVENTS:,} events delivered", "INFO"),
]
MAX_EXPOSURE = 2.0  # systemd-analyze security: "OK" and better
START_TIMEOUT = 60.0  # TimeoutStartSec= of the unit
STOP_LIMIT = 10.0  # seconds for systemctl stop of an idle instance, under TCG
WATCHDOG_LIMIT = 90.0  # WatchdogSec, the abort, RestartSec=5 and a start, under TCG


@dataclass(frozen=True)
class Scenario:
    """What the guest recorded, what the host expected, and how long each part took."""

    guest: VMResult
    results: dict[str, str]
    expected: dict[int, tuple[int, int]]  # pipe -> (events, CRC-32 of their bytes in order)
    build_seconds: float
    dist: str  # the Debian release of the guest and the package: bookworm, trixie

    @property
    def out(self) -> Path:
        """The guest's results directory in the share."""
        return self.guest.share / "results"

    def value(self, name: str) -> str:
        """One recorded result; fails with the guest's log if the guest never got there."""
        assert name in self.results, f"the guest recorded no {name}\n{self.explain()}"
        return self.results[name]

    def number(self, name: str) -> float:
        """A recorded result that must be a number."""
        text = self.value(name)
        assert re.fullmatch(r"-?\d+(\.\d+)?", text), f"{name}={text!r} is not a number"
        return float(text)

    def evidence(self, name: str) -> str:
        """The text of an evidence file the guest left in results/ ('' if it is missing)."""
        path = self.out / name
        return path.read_text(errors="replace") if path.is_file() else ""

    def main_process_entries(self) -> list[dict[str, Any]]:
        """The journal entries of the streaming run's main process (the right key), in order."""
        pid = self.value("start_main_pid")
        return [
            entry
            for entry in self.journal()
            if entry.get("SYSLOG_IDENTIFIER") == IDENTIFIER and entry.get("_PID") == pid
        ]

    def journal(self) -> list[dict[str, Any]]:
        """The instance's journal entries (journalctl -u UNIT -o json), oldest first."""
        lines = self.evidence("journal.json").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def explain(self) -> str:
        """Everything a failure message needs: the results, the output, console and journal."""
        journal = self.evidence("journal-all.txt").splitlines()
        unit_lines = [line for line in journal if "tradebalancer" in line]
        try:  # how the streaming run began: the last lines are often of the upgrade and purge
            first = [str(entry.get("MESSAGE")) for entry in self.main_process_entries()[:40]]
        except (KeyError, ValueError):
            first = ["(no journal of the streaming run)"]
        return (
            f"--- results.env ---\n{self.evidence('results.env')}\n"
            f"{self.guest.explain()}\n"
            "--- the streaming run's first 40 lines ---\n" + "\n".join(first) + "\n"
            "--- guest journal, tradebalancer lines (last 80) ---\n" + "\n".join(unit_lines[-80:])
        )


def check(scenario: Scenario, what: str, value: object, ok: bool, expected: str) -> None:
    """Print one line of the checklist, and fail with the guest's log if it is not ok."""
    print(f"[{'ok' if ok else 'FAILED'}] {what}: {value} (expected {expected})")
    assert ok, f"{what}: got {value!r}, expected {expected}\n{scenario.explain()}"


def check_recorded(scenario: Scenario, expectations: dict[str, str]) -> None:
    """Check that each named result is exactly the value given for it."""
    for name, wanted in expectations.items():
        value = scenario.value(name)
        check(scenario, name, repr(value), value == wanted, repr(wanted))


def check_changed(scenario: Scenario, what: str, before: str, after: str) -> None:
    """Check that a recorded value (a PID) changed from ``before`` to ``after``."""
    old, new = scenario.value(before), scenario.value(after)
    check(scenario, what, f"{old} -> {new}", old != new, "a new one")


def read_modules(path: Path) -> list[str]:
    """The module names of a modules-load.d(5) file."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith(("#", ";"))]


def expected_pipes() -> dict[int, tuple[int, int]]:
    """Each pipe's event count and chained CRC-32, computed from the replay's source."""
    streams = expected_streams(EVENTS, SEED, PIPES)
    return {pipe: (len(events), zlib.crc32(b"".join(events))) for pipe, events in streams.items()}


def build_packages(packages: Packages, dist: str) -> tuple[Path, Path]:
    """The package of ``dist`` as built from this tree, and the same sources as a higher version."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(packages.deb, dist)
        second = pool.submit(packages.deb, dist, UPGRADE_VERSION)
        return first.result(), second.result()


def prepare_share(
    share: Path, debs: tuple[Path, Path], expected: dict[int, tuple[int, int]]
) -> None:
    """Put the packages, the test CA, the sink, the expectations and the parameters in the share."""
    # The service's dynamic user reads the sink, the CA and expect.json from the share: the
    # guest applies the host's modes, and pytest makes its directories 0700.
    share.chmod(0o755)
    for deb in debs:
        shutil.copyfile(deb, share / deb.name)
    make_ca(share)
    shutil.copyfile(SINK, share / "sink.py")
    shutil.copyfile(SNOOP, share / "snoop.py")
    (share / "expect.json").write_text(
        json.dumps({str(pipe): count for pipe, (count, _) in expected.items()})
    )
    synth.write_recording(
        share / LOOP_RECORDING,
        synth.generate_frames(seed=SEED + 1, count_events=LOOP_EVENTS),
        comment="tradebalancer end-to-end test: the endless replay's loop",
    )
    parameters = {
        "DEB1": debs[0].name,
        "DEB2": debs[1].name,
        "KEY": KEY,
        "WRONG_KEY": WRONG_KEY,
        "EVENTS": EVENTS,
        "SEED": SEED,
        "PIPES": PIPES,
        "WORKERS": WORKERS,
        "WATCHDOG_SEC": WATCHDOG_SEC,
        "LOOP_RECORDING": LOOP_RECORDING,
    }
    (share / "scenario.env").write_text(
        "".join(f"{name}={value}\n" for name, value in parameters.items())
    )


def read_results(path: Path) -> dict[str, str]:
    """The KEY=VALUE lines of results.env (later lines win)."""
    if not path.is_file():
        return {}
    results = {}
    for line in path.read_text(errors="replace").splitlines():
        name, separator, value = line.partition("=")
        if separator:
            results[name] = value.strip()
    return results


@pytest.fixture(scope="module", params=list(SUITES))
def scenario(
    request: pytest.FixtureRequest, packages: Packages, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    dist = request.param
    reason = vm_available(dist)
    if reason is not None:
        pytest.skip(reason)
    image = ensure_image(dist)
    base = tmp_path_factory.mktemp(f"e2e-{dist}")
    started = time.monotonic()
    debs = build_packages(packages, dist)
    build_seconds = time.monotonic() - started
    expected = expected_pipes()
    share = base / "share"
    share.mkdir()
    prepare_share(share, debs, expected)
    guest = run_scenario("systemd-e2e.sh", share, timeout=VM_TIMEOUT, image=image)
    results = read_results(share / "results" / "results.env")
    print(
        f"\nend-to-end scenario on {dist}: packages built in {build_seconds:.0f} s, guest ran "
        f"{guest.seconds:.0f} s (boot included), exit {guest.exit_code}; share {share}"
    )
    yield Scenario(guest, results, expected, build_seconds, dist)


pytestmark = [pytest.mark.vm, pytest.mark.timeout(TEST_TIMEOUT)]


def test_the_scenario_runs_to_its_end(scenario: Scenario) -> None:
    """The guest script ran every step and exited 0."""
    code = scenario.guest.exit_code
    check(scenario, "guest script exit code", code, code == 0, "0")
    reached = "purge_unit_files" in scenario.results
    check(scenario, "last step (purge) reached", reached, reached, "True")


def test_the_package_installs_and_applies_its_kernel_settings(scenario: Scenario) -> None:
    """apt installs the package, which applies its sysctls and loads tls without a reboot."""
    check_recorded(
        scenario,
        {
            "install1_status": "0",
            "version1": debian_version(tradebalancer.__version__, scenario.dist),
            "umbrella_active": "active",
            "umbrella_enabled": "enabled",
            "keydir_mode": "700",
        },
    )
    for key, value in read_key_values(SYSTEMD / "sysctl.d" / "60-tradebalancer.conf").items():
        before, after = scenario.value(f"before sysctl {key}"), scenario.value(f"sysctl {key}")
        check(scenario, f"sysctl {key} (was {before})", after, after == value, value)
    for module in read_modules(SYSTEMD / "modules-load.d" / "tradebalancer.conf"):
        before, after = (
            scenario.value(f"before module {module}"),
            scenario.value(f"module {module}"),
        )
        check(scenario, f"module {module} (was {before})", after, after == "loaded", "loaded")


def test_the_unit_is_hardened(scenario: Scenario) -> None:
    """systemd-analyze security rates tradebalancer@feed.service at most 2.0."""
    score = scenario.number("security_score")
    what = f"systemd-analyze security {UNIT} exposure"
    check(scenario, what, score, score <= MAX_EXPOSURE, f"<= {MAX_EXPOSURE}")


def test_a_wrong_key_fails_the_unit_with_77_and_no_restart(scenario: Scenario) -> None:
    """A key the feed refuses fails `systemctl start` and leaves the unit failed with 77."""
    status = scenario.value("wrongkey_start_status")
    check(scenario, "systemctl start with a wrong key exits", status, status != "0", "not 0")
    check_recorded(
        scenario,
        {
            "wrongkey_is_failed": "failed",
            "wrongkey_exec_main_status": str(int(ExitCode.NOPERM)),
            "wrongkey_result": "exit-code",
            "wrongkey_nrestarts": "0",
        },
    )


def test_the_unit_is_active_after_ready_with_its_status_line(scenario: Scenario) -> None:
    """systemctl start returns on READY=1 with the unit active; systemctl status shows STATUS."""
    check_recorded(scenario, {"start_status": "0", "start_active": "active"})
    seconds = scenario.number("start_seconds")
    check(
        scenario, "systemctl start took (s)", seconds, seconds < START_TIMEOUT, f"< {START_TIMEOUT}"
    )
    # Right after READY, in whatever state the instance is by then: the 30,000-event replay may
    # already be over (it takes 0.6 s in the Debian 13 guest), the instance reconnecting with
    # no TLS session ("TLS -"). Later, while the endless replay streams, over kernel TLS at a
    # non-zero rate.
    url = re.escape(FEED_URL)
    for name, pattern in (
        ("start_status_line", rf'"\w+: {url} TLS (kernel|-); [\d,]+ ev/s, .*"'),
        ("streaming_status_line", rf'"streaming: {url} TLS kernel; [1-9][\d,]* ev/s, .*"'),
    ):
        line = scenario.value(name)
        ok = bool(re.fullmatch(pattern, line))
        check(scenario, f"systemctl status ({name})", line, ok, f"Status: {pattern}")


def test_kernel_tls_carries_the_feed(scenario: Scenario) -> None:
    """The session is handed to the kernel: tls_stat counters move and the log says kernel."""
    for direction in ("Tx", "Rx"):
        name = direction.lower()
        before = scenario.number(f"tls_{name}_sw_before")
        after = scenario.number(f"tls_{name}_sw_after")
        check(
            scenario,
            f"/proc/net/tls_stat Tls{direction}Sw over the stream",
            f"{before:.0f} -> {after:.0f}",
            after > before,
            "an increase",
        )
        current = scenario.number(f"tls_{name}_sw_current")
        check(
            scenario,
            f"/proc/net/tls_stat TlsCurr{direction}Sw while streaming",
            current,
            current >= 1,
            ">= 1",
        )
    lines = [entry["MESSAGE"] for entry in scenario.main_process_entries()]
    connected = [line for line in lines if "connected to localhost:9443 (TLS: " in line]
    check(
        scenario,
        "log of the connection",
        connected,
        bool(connected) and all("(TLS: kernel)" in line for line in connected),
        "connected to localhost:9443 (TLS: kernel)",
    )
    fallback = [line for line in lines if "kernel TLS not used" in line]
    check(scenario, "user-space TLS fallback warnings", fallback, not fallback, "none")


def test_every_event_reaches_its_worker_once(scenario: Scenario) -> None:
    """The sinks saw each pipe's events exactly once, in order: count and CRC-32 per pipe."""
    check_recorded(scenario, {"stream_complete": "0"})
    got: dict[int, tuple[int, int]] = {}
    problems: list[str] = []
    for worker in range(WORKERS):
        text = scenario.evidence(f"reports/report-{worker}.json")
        check(scenario, f"worker {worker} report at end of file", bool(text), bool(text), "True")
        report = json.loads(text)
        for pipe, figures in report["pipes"].items():
            got[int(pipe)] = (figures["count"], figures["crc"])
            if figures["skipped"]:
                problems.append(f"pipe {pipe}: {figures['skipped']} bytes skipped")
        problems += report["errors"]
    for pipe in range(PIPES):
        count, crc = scenario.expected[pipe]
        seen = got.get(pipe)
        check(
            scenario,
            f"pipe {pipe} (events, CRC-32)",
            seen,
            seen == (count, crc),
            f"({count}, {crc}) from the host",
        )
    total = sum(count for count, _ in got.values())
    check(scenario, "events in all", total, total == EVENTS, str(EVENTS))
    check(scenario, "sink errors and skipped bytes", problems, not problems, "none")


def test_the_journal_has_the_lifecycle_at_its_priorities(scenario: Scenario) -> None:
    """journalctl -u shows each lifecycle line with its syslog priority (the PRIORITY field)."""
    lines = [
        (entry["MESSAGE"], int(entry["PRIORITY"])) for entry in scenario.main_process_entries()
    ]
    for text, level in LIFECYCLE:
        found = [priority for message, priority in lines if text in message]
        wanted = JOURNAL_PRIORITY[level]
        check(
            scenario,
            f"journal: {text!r}",
            found[:1],
            found[:1] == [wanted],
            f"[{wanted}] ({level})",
        )
    # A clean run logs nothing above INFO until the replay feed ends the stream.
    end = next(
        (index for index, (message, _) in enumerate(lines) if "the feed closed" in message),
        len(lines),
    )
    noisy = [message for message, priority in lines[:end] if priority < JOURNAL_PRIORITY["INFO"]]
    check(scenario, "journal: warnings before the feed closed", noisy, not noisy, "none")
    refused = [
        int(entry["PRIORITY"])
        for entry in scenario.journal()
        if entry.get("SYSLOG_IDENTIFIER") == IDENTIFIER
        and "refused the API key" in entry.get("MESSAGE", "")
    ]
    wanted = JOURNAL_PRIORITY["ERROR"]
    check(
        scenario,
        "journal: 'refused the API key'",
        refused,
        refused == [wanted],
        f"[{wanted}] (ERROR, once)",
    )


def test_stop_ends_cleanly_within_seconds(scenario: Scenario) -> None:
    """systemctl stop: the balancer flushes, the workers read to end of file, exit 0, quickly."""
    seconds = scenario.number("stop_seconds")
    check(scenario, "systemctl stop took (s)", seconds, seconds < STOP_LIMIT, f"< {STOP_LIMIT}")
    check_recorded(
        scenario,
        {
            "stop_status": "0",
            "stop_active": "inactive",
            "stop_result": "success",
            "stop_exec_main_status": "0",
            "reports": " ".join(f"report-{worker}.json" for worker in range(WORKERS)),
        },
    )


def test_workers_under_the_unit_find_the_key_nowhere(scenario: Scenario) -> None:
    """Two workers that snoop (tests/snoop.py), under the installed unit with LoadCredential=:
    the credential, the key file, the balancer's /proc files, memory and root, ptrace and
    every process they see give them nothing of the key."""
    check_recorded(
        scenario, {"snoop_start_status": "0", "snoop_reported": "0", "snoop_stop_status": "0"}
    )
    journal = scenario.evidence("snoop-journal.txt")
    hidden = "workers start without access to /run/credentials/tradebalancer@snoop.service"
    check(scenario, "the snoop instance's journal", hidden in journal, hidden in journal, hidden)
    for worker in range(2):
        report = json.loads(scenario.evidence(f"snoop/snoop-{worker}.json") or "{}")
        leaks = [name for name, found in report.items() if KEY in json.dumps(found)]
        check(scenario, f"snooping worker {worker}: where it found the key", leaks, not leaks, "[]")
        opened = [
            name
            for name in ("balancer's environ", "balancer's memory", "ptrace attach")
            if report.get(name, {}).get("ok", True)
        ]
        what = f"snooping worker {worker}: what it opened of the balancer"
        check(scenario, what, opened, not opened, "[]")
        credential = report.get("read /run/credentials/tradebalancer@snoop.service", {})
        what = f"snooping worker {worker}: the credentials directory"
        check(scenario, what, credential, not credential.get("ok", True), "refused")


def test_the_watchdog_restarts_a_stopped_main_process(scenario: Scenario) -> None:
    """After SIGSTOP the watchdog fires, the process is killed and the unit runs again."""
    check_recorded(
        scenario,
        {
            "watchdog_usec": f"{WATCHDOG_SEC}s",
            "watchdog_streaming": "0",
            "watchdog_restarted": "0",
            "watchdog_timeout_logged": "yes",
            "watchdog_old_pid_gone": "yes",
            "watchdog_active": "active",
        },
    )
    check_changed(scenario, "main PID", "watchdog_pid_before", "watchdog_pid_after")
    before = scenario.number("watchdog_nrestarts_before")
    after = scenario.number("watchdog_nrestarts_after")
    check(scenario, "NRestarts", f"{before:.0f} -> {after:.0f}", after == before + 1, "+1")
    seconds = scenario.number("watchdog_seconds")
    check(
        scenario,
        "SIGSTOP to running again (s)",
        seconds,
        seconds < WATCHDOG_LIMIT,
        f"< {WATCHDOG_LIMIT}",
    )


def test_systemctl_reload_resubscribes_live_and_refuses_a_restart_key(scenario: Scenario) -> None:
    """`systemctl reload` adds a channel on the live connection (same PID, confirmed, logged),
    fails for a key that needs a restart, and `tradebalancer status` shows the instance."""
    check_recorded(
        scenario,
        {
            "reload_status": "0",
            "reload_confirmed": "0",
            "reload_logged": "yes",
            "reload_job_logged": "yes",
            "reload_refused_logged": "yes",
            "reload_active": "active",
            "status_view_status": "0",
            "status_view_subscribed": "T.*, Q.AAPL; refused: -",
            "control_socket_mode": "600",
        },
    )
    refused = scenario.value("reload_refused_status")
    check(scenario, "systemctl reload with a restart key", refused, refused != "0", "fails")
    same = scenario.value("reload_pid_before") == scenario.value("reload_pid_after")
    check(scenario, "main PID across reloads", scenario.value("reload_pid_after"), same, "same")
    state = scenario.value("status_view_state")
    ok = state.startswith("streaming: wss://localhost:9443/stocks, TLS kernel")
    check(scenario, "status view", state, ok, "streaming over kernel TLS")


def test_an_upgrade_restarts_the_running_instance(scenario: Scenario) -> None:
    """apt install of a newer package restarts the running instance through the umbrella."""
    check_recorded(
        scenario,
        {
            "instance_enabled": "enabled",
            "upgrade_status": "0",
            "version2": debian_version(UPGRADE_VERSION, scenario.dist),
            "upgrade_main_started_after": "yes",
            "upgrade_active": "active",
            "upgrade_streaming": "0",
            "upgrade_config_kept": "yes",
        },
    )
    check_changed(scenario, "main PID", "upgrade_pid_before", "upgrade_pid_after")


def test_purge_removes_what_the_package_made(scenario: Scenario) -> None:
    """apt purge stops the instance and removes its files, state and links; key files stay."""
    check_recorded(
        scenario,
        {
            "purge_status": "0",
            "purge_package_state": "",  # dpkg-query: no longer known at all
            "purge_instance_active": "inactive",
            "purge_left": "",
            "purge_links": "",
            "purge_unit_files": "",
            "purge_keydir": "feed.key",  # the administrator's: kept, as documented
        },
    )
    print(
        f"timings (s): install {scenario.value('install1_seconds')}, start "
        f"{scenario.value('start_seconds')}, stream {scenario.value('stream_seconds')}, stop "
        f"{scenario.value('stop_seconds')}, watchdog {scenario.value('watchdog_seconds')}, "
        f"upgrade {scenario.value('upgrade_seconds')}, purge {scenario.value('purge_seconds')}; "
        f"builds {scenario.build_seconds:.0f}, guest {scenario.guest.seconds:.0f}"
    )
