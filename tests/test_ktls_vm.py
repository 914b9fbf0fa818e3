"""Kernel TLS on Debian's own kernels (tls is a module there), in a guest booted once per
release: Debian 12 (kernel 6.1) and Debian 13 (kernel 6.12).

The host builds the .deb from this tree (so the tradebalancer under test is this one), makes
two test CAs (ECDSA for Python's ssl server, RSA for ``openssl s_server`` and nginx, which
covers both the ECDHE-ECDSA and the ECDHE-RSA suites of TLS 1.2) and a plan; the guest
installs the package, takes the tls module out again, and runs tests/ktls_guest.py as the
user nobody twice: before ``modprobe tls`` (auto falls back and says why, kernel refuses, the
balancer exits 69, and nobody cannot load the module) and after it (every TLS 1.2/1.3 x
AES-128-GCM/AES-256-GCM/ChaCha20-Poly1305 pair against Python's ssl server and s_server, with
the hand-off right after the handshake and after application data went through OpenSSL; then
a whole ``tradebalancer replay`` feed through ``tradebalancer run``, with the feed serving wss
itself and behind nginx). The guest only records facts; the tests here hold them to what must
be, and compute the expected events themselves. Each test prints what it checked.

Run alone with ``pytest -m vm tests/test_ktls_vm.py -s`` to see the checklist.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from debpackages import Packages
from tlsca import make_ca
from vm import SUITES, VMResult, run_in_vm, vm_available

from tradebalancer.replay import synth
from tradebalancer.routing import pipe_for
from tradebalancer.transport import keys as tls_keys

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
GUEST_WORK = "/tmp/ktls"  # where the guest copies the share's files (owned by nobody there)
VM_SECONDS = 900  # the guest run measured about 2.5 minutes on a 2-core host under TCG
pytestmark = [pytest.mark.vm, pytest.mark.timeout(VM_SECONDS + 900)]  # + building the .deb

KEY = "ktls-test-key-5309"
PIPES, WORKERS = 5, 2
NGINX_PORT, REPLAY_BEHIND_NGINX_PORT = 9445, 9944
_AES128, _AES256, _CHACHA = (
    tls_keys.TLS_CIPHER_AES_GCM_128,
    tls_keys.TLS_CIPHER_AES_GCM_256,
    tls_keys.TLS_CIPHER_CHACHA20_POLY1305,
)
# (version, label, Python peer's suite (ECDSA certificate), s_server's (RSA), kernel cipher)
PAIRS: list[dict[str, Any]] = [
    {"version": v, "label": f"tls{v}-{n}", "python": py, "openssl": o, "cipher_type": c}
    for v, n, py, o, c in [
        (
            "1.2",
            "aes128gcm",
            "ECDHE-ECDSA-AES128-GCM-SHA256",
            "ECDHE-RSA-AES128-GCM-SHA256",
            _AES128,
        ),
        (
            "1.2",
            "aes256gcm",
            "ECDHE-ECDSA-AES256-GCM-SHA384",
            "ECDHE-RSA-AES256-GCM-SHA384",
            _AES256,
        ),
        (
            "1.2",
            "chacha20",
            "ECDHE-ECDSA-CHACHA20-POLY1305",
            "ECDHE-RSA-CHACHA20-POLY1305",
            _CHACHA,
        ),
        ("1.3", "aes128gcm", "TLS_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256", _AES128),
        ("1.3", "aes256gcm", "TLS_AES_256_GCM_SHA384", "TLS_AES_256_GCM_SHA384", _AES256),
        (
            "1.3",
            "chacha20",
            "TLS_CHACHA20_POLY1305_SHA256",
            "TLS_CHACHA20_POLY1305_SHA256",
            _CHACHA,
        ),
    ]
]
PEERS_AND_ORDERS = [
    ("python", "immediate"),
    ("python", "deferred"),
    ("openssl", "immediate"),
    ("openssl", "deferred"),
]
RUNS: dict[str, dict[str, Any]] = {
    # Before modprobe: auto streams in user space; kernel stops with exit 69 (EX_UNAVAILABLE).
    # The feed cuts the first connection mid-frame once ("disconnect_after"), so the balancer
    # connects again: the fallback must still be one WARNING, and no event lost or repeated.
    "fallback-auto": {
        "tls": "auto",
        "certificate": "ec",
        "events": 3_000,
        "seed": 3,
        "disconnect_after": 1_500,
    },
    "fallback-kernel": {"tls": "kernel", "certificate": "ec", "events": 1_000, "seed": 4},
    # After modprobe: `tradebalancer replay` serving wss itself (Python's ssl, TLS 1.3), cut
    # once so a second kernel TLS session picks the stream up; then nginx terminating TLS 1.2
    # with AES-128-GCM (explicit nonces, counted by the kernel) in front of a ws:// feed.
    "direct": {
        "tls": "kernel",
        "certificate": "ec",
        "events": 30_000,
        "seed": 7,
        "disconnect_after": 15_000,
    },
    "nginx": {"tls": "kernel", "certificate": "rsa", "events": 30_000, "seed": 9},
}
NGINX_TLS = ("TLSv1.2", "ECDHE-RSA-AES128-GCM-SHA256")
# SIGTERM at random moments of the installed balancer's life over kernel TLS (stopstress.py):
# 5 per scenario x 12 scenarios = 60 on Debian 12. How a stop is honoured is the balancer's own
# doing, not the release's: Debian 13 runs one per scenario (12), which still reaches kernel
# TLS on its kernel, and saves about two minutes of make test. The seed is printed;
# TRADEBALANCER_STRESS_SEED replays it.
STOP_STRESS_PER_SCENARIO = {"bookworm": 5, "trixie": 1}
STOP_STRESS_SEED = int(os.environ.get("TRADEBALANCER_STRESS_SEED", random.randrange(1 << 31)))

SCRIPT = r"""
set -u
share=/mnt/share
work=__WORK__
results=$share/results
python=/usr/lib/tradebalancer/venv/bin/python
guest=$work/files/ktls_guest.py
plan=$work/files/plan.json
mkdir -p "$results"
status=0
fact() { printf '%s\n' "$2" >"$results/fact-$1"; echo "fact $1: $2"; }
loaded() { grep -c '^tls ' /proc/modules; }
# Unprivileged, no capabilities (setpriv drops them with the root uid): as the service runs.
as_nobody() { env HOME=/tmp setpriv --reuid=nobody --regid=nogroup --clear-groups -- "$@"; }

echo "== installing the package"
fact kernel "$(uname -r)"
fact tls-before-install "$(loaded)"
if ! dpkg -i "$share/tradebalancer.deb" >"$results/dpkg.log" 2>&1; then
    cat "$results/dpkg.log"
    exit 10
fi
fact tls-after-install "$(loaded)"
modprobe -r tls
fact tls-after-removal "$(loaded)"
mkdir -p "$work"
cp -r "$share/files" "$work/"
chown -R nobody:nogroup "$work"

echo "== without the tls module, as nobody"
as_nobody "$python" "$guest" without-module "$plan" "$work/results" || status=1
fact tls-after-unprivileged-use "$(loaded)"

echo "== modprobe tls (root), then as nobody"
modprobe tls
fact tls-after-modprobe "$(loaded)"
mkdir -p /tmp/nginx
nginx -c "$work/files/nginx.conf" || status=1
as_nobody "$python" "$guest" with-module "$plan" "$work/results" || status=1
nginx -c "$work/files/nginx.conf" -s stop

cp -r "$work/results/." "$results/"
cp /tmp/nginx/*.log "$results/" 2>/dev/null
for log in "$work"/*/balancer-*/balancer.log "$work"/*/balancer-*/replay.log; do
    cp "$log" "$results/$(basename "$(dirname "$log")")-$(basename "$log")"
done
exit $status
"""

NGINX_CONF = """
worker_processes 1;
pid /tmp/nginx/nginx.pid;
error_log /tmp/nginx/error.log info;
events { worker_connections 64; }
http {
    log_format tls '$remote_addr "$request" $status $ssl_protocol $ssl_cipher $bytes_sent';
    access_log /tmp/nginx/access.log tls;
    map $http_upgrade $connection_upgrade { default upgrade; "" close; }
    server {
        listen 127.0.0.1:__NGINX_PORT__ ssl;
        ssl_certificate __CERT__;
        ssl_certificate_key __KEY__;
        ssl_protocols __PROTOCOL__;
        ssl_ciphers __CIPHER__;
        location / {
            # A websocket through an HTTP/1.1 proxy: the Upgrade goes to the replay feed.
            proxy_pass http://127.0.0.1:__UPSTREAM__;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }
    }
}
"""


def expected_pipes(events: int, seed: int, pipes: int) -> dict[str, dict[str, int]]:
    """Per pipe, the count and CRC-32 of every event the replay feed sends, in order."""
    streams: dict[int, list[bytes]] = {p: [] for p in range(pipes)}
    for frame in synth.generate_frames(seed=seed, count_events=events):
        for event in synth.split_events(frame):
            symbol = orjson.loads(event)["sym"]
            streams[pipe_for(symbol.encode(), pipes)].append(event)
    return {
        str(p): {"count": len(events_of_pipe), "crc": zlib.crc32(b"".join(events_of_pipe))}
        for p, events_of_pipe in streams.items()
    }


@dataclass
class Guest:
    """What the one boot left: the VM result, the guest's records by name, the shell facts."""

    result: VMResult
    records: dict[str, dict[str, Any]]
    facts: dict[str, str]
    expected: dict[str, dict[str, dict[str, int]]]
    suite: str

    def record(self, name: str) -> dict[str, Any]:
        """The record of scenario ``name``; fails with the guest's output if it is missing."""
        assert name in self.records, f"the guest recorded no {name}\n{self.result.explain()}"
        record = self.records[name]
        assert record["error"] is None, f"{name} raised in the guest:\n{record['error']}"
        return record

    def explain(self, record: dict[str, Any]) -> str:
        """A record (without its long fields) and the end of the guest's output."""
        shown = {k: v for k, v in record.items() if k not in ("log_tail", "reports")}
        tail = record.get("log_tail", "")
        return f"{json.dumps(shown, indent=1)}\n{tail}\n{self.result.explain(30)}"


def _write_plan(files: Path, suite: str) -> dict[str, dict[str, dict[str, int]]]:
    """Certificates, nginx.conf and plan.json in ``files``; returns the expected events."""
    guest_files = f"{GUEST_WORK}/files"
    certificates = {}
    for key_type in ("ec", "rsa"):
        paths = make_ca(files / key_type, key_type=key_type)
        guest_paths = [f"{guest_files}/{p.relative_to(files).as_posix()}" for p in paths]
        certificates[key_type] = dict(zip(("ca", "cert", "key"), guest_paths, strict=True))
    expected, runs = {}, {}
    for name, run in RUNS.items():
        expected[name] = expected_pipes(run["events"], run["seed"], PIPES)
        runs[name] = run | {
            "name": name,
            "expect": {p: v["count"] for p, v in expected[name].items()},
            "replay_port": REPLAY_BEHIND_NGINX_PORT if name == "nginx" else 0,
            "nginx_port": NGINX_PORT if name == "nginx" else None,
            "expect_exit": 69 if name == "fallback-kernel" else None,
            "seconds": 240,
        }
    plan = {
        "work": GUEST_WORK,
        "pairs": PAIRS,
        "immediate_bytes": 2 << 20,
        "deferred_bytes": 1 << 20,
        "certificates": certificates,
        "sink": f"{guest_files}/sink.py",
        "api_key": KEY,
        "pipes": PIPES,
        "workers": WORKERS,
        "runs": runs,
        "nginx_access_log": "/tmp/nginx/access.log",
        "stop_stress": {
            "per_scenario": STOP_STRESS_PER_SCENARIO[suite],
            "seed": STOP_STRESS_SEED,
            "bound": 2.0,
        },
    }
    (files / "plan.json").write_text(json.dumps(plan, indent=1))
    replacements = {
        "__NGINX_PORT__": str(NGINX_PORT),
        "__UPSTREAM__": str(REPLAY_BEHIND_NGINX_PORT),
        "__CERT__": certificates["rsa"]["cert"],
        "__KEY__": certificates["rsa"]["key"],
        "__PROTOCOL__": NGINX_TLS[0],
        "__CIPHER__": NGINX_TLS[1],
    }
    conf = NGINX_CONF
    for old, new in replacements.items():
        conf = conf.replace(old, new)
    (files / "nginx.conf").write_text(conf)
    return expected


def _checklist(guest: Guest) -> Iterator[str]:
    """One line per scenario with the values that matter, for the test's output."""
    result = guest.result
    yield f"kernel TLS in the guest: {result.seconds:.0f} s, exit {result.exit_code}"
    for name, value in sorted(guest.facts.items()):
        yield f"  fact {name}: {value}"
    for name, record in guest.records.items():
        mark = "ok " if record["error"] is None else "ERR"
        values = {
            k: record.get(k)
            for k in (
                "tls_version",
                "cipher",
                "tx_readback_matches",
                "rx_readback_matches",
                "tx_rec_seq",
                "rx_rec_seq",
                "tx_rec_seq_after",
                "rx_rec_seq_after",
                "tickets_skipped",
                "queued_at_hand_off",
                "received_intact",
                "server_close_status",
                "end",
                "fallback_reason",
                "raised",
                "exit_code",
                "connections",
                "trouble_before_end",
                "tls_lines",
                "delta",
                "access_log",
                "seconds",
            )
            if k in record
        }
        yield f"  [{mark}] {name}: {values}"


@pytest.fixture(scope="module", params=list(SUITES))
def guest(
    request: pytest.FixtureRequest, packages: Packages, tmp_path_factory: pytest.TempPathFactory
) -> Guest:
    suite = request.param
    reason = vm_available(suite)
    if reason is not None:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp(f"ktls-vm-{suite}")
    deb = packages.deb(suite)
    share = base / "share"
    files = share / "files"
    files.mkdir(parents=True)
    for source in (
        TESTS / "ktls_guest.py",
        TESTS / "tlspeer.py",
        TESTS / "hostile.py",
        TESTS / "stopstress.py",
        REPO / "bench" / "sink.py",
    ):
        shutil.copy(source, files / source.name)
    expected = _write_plan(files, suite)
    result = run_in_vm(
        SCRIPT.replace("__WORK__", GUEST_WORK),
        share,
        timeout=VM_SECONDS,
        network=False,  # everything talks over 127.0.0.1 in the guest
        extra_files={"tradebalancer.deb": deb},
        suite=suite,
    )
    records: dict[str, dict[str, Any]] = {}
    for phase in ("without-module", "with-module"):
        path = share / "results" / f"{phase}.json"
        if path.exists():
            records |= {r["name"]: r for r in json.loads(path.read_text())}
    facts = {
        path.name.removeprefix("fact-"): path.read_text().strip()
        for path in sorted((share / "results").glob("fact-*"))
    }
    found = Guest(result, records, facts, expected, suite)
    checklist = "\n".join(_checklist(found))
    (share / "checklist.txt").write_text(checklist + "\n")
    print(checklist)
    return found


# -- the tests -------------------------------------------------------------------------------

CIPHER_NAMES = {_AES128: "AES-128-GCM", _AES256: "AES-256-GCM", _CHACHA: "ChaCha20-Poly1305"}


def _pipes(reports: dict[str, Any]) -> dict[str, dict[str, int]]:
    """The sinks' reports reduced to what the host computes: per pipe, count and CRC-32."""
    return {pipe: {"count": r["count"], "crc": r["crc"]} for pipe, r in reports.items()}


def _check_delivery(guest: Guest, record: dict[str, Any], run: str) -> str:
    """Every event of ``run`` reached its pipe once, in order, over the first connection."""
    why = guest.explain(record)
    assert record["all_delivered"], why
    assert _pipes(record["reports"]) == guest.expected[run], why
    assert all(r["skipped"] == 0 for r in record["reports"].values()), why
    assert record["replay_events_sent"] == RUNS[run]["events"], why
    # The feed closed with "end of replay"; before that nothing went wrong but the one cut
    # asked for (reconnects after the end are the feed being over).
    assert record["end_of_replay_seen"], why
    trouble = record["trouble_before_end"]
    counts = [guest.expected[run][str(p)]["count"] for p in range(PIPES)]
    summary = f"{sum(counts)} events, per-pipe counts {counts} and CRC-32s equal to the host's"
    if RUNS[run].get("disconnect_after") is None:
        assert trouble == [], why
        return f"{summary}, all over the first connection"
    assert len(trouble) == 1 and "reconnecting" in trouble[0], why
    assert record["connections"] >= 2 and record["replay_connections"] >= 2, why
    return f"{summary}, across the feed's cut mid-frame and {record['connections']} connections"


def test_every_guest_scenario_ran_to_its_end(guest: Guest) -> None:
    """The guest script and every scenario it ran finished without raising."""
    raised = {name: r["error"] for name, r in guest.records.items() if r["error"] is not None}
    assert not raised, "\n".join(f"{n}:\n{e}" for n, e in raised.items())
    assert guest.result.exit_code == 0, guest.result.explain()
    # 6 without the module; with it one per pair, peer and order, and 8 more: tls_stat before,
    # after the pairs and at the end, the lost connection, the balancer direct and behind nginx,
    # nginx's log, the stop stress.
    assert len(guest.records) == 6 + len(PAIRS) * len(PEERS_AND_ORDERS) + 8, sorted(guest.records)
    print(f"\n  {len(guest.records)} guest scenarios ran, none raised; guest exit 0")


def test_only_root_loads_the_module_and_the_package_does(guest: Guest) -> None:
    """The postinst loads tls; once removed, nobody's kernel TLS attempts cannot load it again."""
    facts = guest.facts
    assert facts.get("tls-before-install") == "0", guest.result.explain()
    assert facts.get("tls-after-install") == "1", "the package's postinst did not load tls"
    assert facts.get("tls-after-removal") == "0"
    assert facts.get("tls-after-unprivileged-use") == "0", "an unprivileged user loaded tls"
    assert facts.get("tls-after-modprobe") == "1"
    for name in ("module-absent", "module-still-absent"):
        record = guest.record(name)
        assert record["uid"] == 65534 and int(record["effective_capabilities"], 16) == 0
        assert "ENOENT" in record["tcp_ulp"] and not record["tls_module_loaded"]
    print(
        f"\n  kernel {facts['kernel']}: postinst loaded tls; as nobody (uid 65534, CapEff 0) "
        f"TCP_ULP tls -> {guest.record('module-absent')['tcp_ulp']}, module still not loaded "
        "after every fallback scenario; root's modprobe loads it"
    )


def test_without_the_module_auto_falls_back_and_kernel_refuses(guest: Guest) -> None:
    """open_transport: auto keeps the session in user space with the reason; kernel raises."""
    auto = guest.record("transport-auto")
    assert (auto["tls"], auto["tx_mode"], auto["rx_mode"]) == ("user", "user", "user")
    reason = auto["fallback_reason"] or ""
    assert "tls kernel module is not loaded" in reason and "ENOENT" in reason
    assert "modprobe tls" in reason, guest.explain(auto)
    assert auto["server_echo_intact"] and auto["received_intact"]
    assert auto["server_saw_close_notify"] is True
    kernel = guest.record("transport-kernel")
    assert "KernelTLSUnavailable" in kernel.get("raised", ""), guest.explain(kernel)
    assert "modprobe tls" in kernel["raised"] and "ENOENT" in kernel["raised"]
    print(
        f"\n  transport auto: user space both ways ({auto['tls_version']} {auto['cipher']}), "
        f"echo intact, close_notify sent; reason: {reason}"
        f"\n  transport kernel: {kernel['raised']}"
    )


def test_without_the_module_the_balancer_falls_back_or_exits_69(guest: Guest) -> None:
    """The balancer streams in user space with one warning (auto), or exits 69 (kernel)."""
    auto = guest.record("balancer-fallback-auto")
    why = guest.explain(auto)
    assert auto["exit_code"] == 0, why
    connected = [line for line in auto["tls_lines"] if "(TLS: " in line]
    assert connected and all("(TLS: user)" in line for line in connected), why
    assert len(connected) >= 2 and len(auto["fallback_lines"]) == 1, why  # once, not per connection
    (warning,) = auto["fallback_lines"]
    assert " WARNING " in warning and "ENOENT" in warning and "modprobe tls" in warning, why
    delivered = _check_delivery(guest, auto, "fallback-auto")
    kernel = guest.record("balancer-fallback-kernel")
    why = guest.explain(kernel)
    assert kernel["exit_code"] == 69, why
    errors = [line for line in kernel["log_tail"].splitlines() if " ERROR " in line]
    assert any("modprobe tls" in line and "ENOENT" in line for line in errors), why
    assert not any("(TLS: " in line for line in kernel["tls_lines"]), why
    assert not auto["api_key_in_log"] and not kernel["api_key_in_log"]
    print(
        f"\n  balancer auto: {len(connected)} connection(s) in user space, one WARNING: "
        f"{warning.split(': ', 1)[1]}\n    {delivered}"
        f"\n  balancer kernel: exit 69, ERROR {errors[0].split(': ', 1)[1]}"
    )


@pytest.mark.parametrize("pair", PAIRS, ids=[p["label"] for p in PAIRS])
@pytest.mark.parametrize(
    ("peer", "order"), PEERS_AND_ORDERS, ids=["-".join(p) for p in PEERS_AND_ORDERS]
)
def test_both_directions_run_in_the_kernel(
    guest: Guest, pair: dict[str, Any], peer: str, order: str
) -> None:
    """The kernel reads back the derived crypto info, counts records, and moves MiBs both ways."""
    record = guest.record(f"{peer}-{order}-{pair['label']}")
    why = guest.explain(record)
    assert (record["tls"], record["tx_mode"], record["rx_mode"]) == ("kernel",) * 3, why
    assert record["tls_version"] == f"TLSv{pair['version']}", why
    assert record["cipher"] == pair[peer], why
    version = (
        f"{tls_keys.TLS_1_3_VERSION if pair['version'] == '1.3' else tls_keys.TLS_1_2_VERSION:#06x}"
    )
    for direction in ("tx", "rx"):
        differs = record[f"{direction}_readback_differs_in"]
        assert record[f"{direction}_readback_matches"], f"{direction} differs in {differs}\n{why}"
        assert record[f"{direction}_key_read_back"], why
        assert record[f"{direction}_version"] == version
        assert record[f"{direction}_cipher_type"] == pair["cipher_type"]
    first = 0 if pair["version"] == "1.3" else 1  # TLS 1.2: each Finished was record 0
    tickets = 2 if pair["version"] == "1.3" else 0  # OpenSSL servers send two by default
    if order == "immediate":
        assert (record["tx_rec_seq"], record["rx_rec_seq"]) == (first, first), why
    else:  # "hello" went out, tickets and "world" came in, all through OpenSSL
        assert record["user_space_sent_intact"] and record["user_space_received_intact"], why
        assert record["partial_hand_off"] is None, why
        assert (record["tx_rec_seq"], record["rx_rec_seq"]) == (first + 1, first + tickets + 1)
    if (peer, order) == ("python", "deferred"):
        # Records sent right behind "world" waited in the socket at the hand-off: not one lost.
        assert record["queued_at_hand_off"] > 0, why
        assert record["received_in_flight_intact"], why
    opened = record["tls_stat_while_open"]
    for counter in ("TlsCurrTxSw", "TlsCurrRxSw", "TlsTxSw", "TlsRxSw"):
        assert opened.get(counter) == 1, f"{counter} did not count this session\n{why}"
    assert record["received_intact"] and record["received"] >= 1 << 20, why
    assert record.get("server_echo_intact", record.get("server_received_intact")), why
    # Megabytes went through the kernel: many records each way.
    tx_records = record["tx_rec_seq_after"] - record["tx_rec_seq"]
    rx_records = record["rx_rec_seq_after"] - record["rx_rec_seq"]
    assert tx_records >= 16 and rx_records >= 16, why
    if "tx_explicit_nonce_advance" in record:  # TLS 1.2 AES-GCM: one nonce per record sent
        assert record["tx_explicit_nonce_advance"] == tx_records, why
    queued = record.get("queued_at_hand_off")
    in_flight = f", {queued} B already in the socket at the hand-off" if queued else ""
    print(
        f"\n  {peer} {order}: TLS {pair['version']} {CIPHER_NAMES[pair['cipher_type']]} "
        f"({record['cipher']}); tx/rx crypto_info read back equal (version {version}, cipher "
        f"{pair['cipher_type']}); rec_seq tx {record['tx_rec_seq']}->{record['tx_rec_seq_after']}"
        f" rx {record['rx_rec_seq']}->{record['rx_rec_seq_after']}; tls_stat {opened}; "
        f"{record['received']} B received, {record['sent']} B sent, intact{in_flight}"
    )


@pytest.mark.parametrize("peer", ["python", "openssl"])
@pytest.mark.parametrize("pair", PAIRS, ids=[p["label"] for p in PAIRS])
def test_new_session_tickets_before_data_are_skipped(
    guest: Guest, pair: dict[str, Any], peer: str
) -> None:
    """TLS 1.3 tickets that reach the kernel before any data are skipped, never read as data."""
    record = guest.record(f"{peer}-immediate-{pair['label']}")
    expected = 2 if pair["version"] == "1.3" else 0
    assert record["tickets_skipped"] == expected, guest.explain(record)
    assert record["received_intact"]
    print(f"\n  {peer} TLS {pair['version']}: {expected} tickets skipped, data intact after them")


@pytest.mark.parametrize("pair", PAIRS, ids=[p["label"] for p in PAIRS])
def test_close_notify_ends_the_stream_both_ways(guest: Guest, pair: dict[str, Any]) -> None:
    """The server's close_notify reads as 0, and close() sends one the server sees."""
    python = guest.record(f"python-immediate-{pair['label']}")
    assert python["end"] == "eof", guest.explain(python)
    assert python["server_saw_close_notify"] is True, guest.explain(python)
    checked = "Python server's close_notify read as EOF; ours ended its unwrap()"
    if pair["version"] == "1.2":
        # s_server: a HelloRequest is ignored; then DONE is its word for a close_notify.
        openssl = guest.record(f"openssl-immediate-{pair['label']}")
        why = guest.explain(openssl)
        assert openssl["hello_request_sent"], why
        assert openssl["data_after_hello_request_intact"], why
        assert openssl["server_close_status"] == "DONE", why
        checked += "; s_server's HelloRequest ignored, data intact after it, s_server saw DONE"
    print(f"\n  TLS {pair['version']} {CIPHER_NAMES[pair['cipher_type']]}: {checked}")


@pytest.mark.parametrize("pair", PAIRS, ids=[p["label"] for p in PAIRS])
def test_alerts_and_key_updates_are_transport_errors(guest: Guest, pair: dict[str, Any]) -> None:
    """A fatal alert or a TLS 1.3 KeyUpdate from the server is a TransportError naming it."""
    ends = []
    for peer in ("python", "openssl"):
        record = guest.record(f"{peer}-deferred-{pair['label']}")
        end = record["end"]
        assert (
            end == "TransportError: the server sent a fatal TLS alert: unexpected_message (10)"
        ), guest.explain(record)
        ends.append(f"{peer}: {end}")
    if pair["version"] == "1.3":
        record = guest.record(f"openssl-immediate-{pair['label']}")
        end = record["end"]
        assert end.startswith("TransportError: "), guest.explain(record)
        assert "KeyUpdate" in end and "reconnect" in end, guest.explain(record)
        ends.append(f"openssl KeyUpdate: {end}")
    print("\n  " + "\n  ".join(ends))


def test_a_connection_lost_before_the_hand_off_is_no_kernel_tls_verdict(guest: Guest) -> None:
    """A server gone between handshake and hand-off is a lost connection (reconnect), not 69."""
    record = guest.record("peer-gone-before-hand-off")
    why = guest.explain(record)
    assert record["tcp_state"] == "CLOSE_WAIT", why
    assert record["raised"] == "TransportError", why  # KernelTLSUnavailable would exit 69
    assert "ended before the kernel TLS hand-off (ENOTCONN)" in record["message"], why
    print(f"\n  peer gone before the hand-off ({record['tcp_state']}): {record['message']}")


def test_tls_stat_counts_every_session_and_no_decrypt_error(guest: Guest) -> None:
    """Each hand-off counts one TX and one RX session, all closed at the end, none failing."""
    sessions = len(PAIRS) * len(PEERS_AND_ORDERS)
    after_pairs = guest.record("tls-stat-after-pairs")
    delta = after_pairs["delta"]
    assert delta.get("TlsTxSw") == sessions and delta.get("TlsRxSw") == sessions, after_pairs
    assert delta.get("TlsCurrTxSw", 0) == 0 and delta.get("TlsCurrRxSw", 0) == 0, after_pairs
    final = guest.record("tls-stat-final")
    stat = final["tls_stat"]
    assert stat["TlsDecryptError"] == 0, stat
    assert stat["TlsCurrTxSw"] == 0 and stat["TlsCurrRxSw"] == 0, stat
    # Every balancer connection is a session too (each reconnect after the feed ended).
    balancer = sum(guest.record(f"balancer-{run}")["connections"] for run in ("direct", "nginx"))
    assert final["delta"].get("TlsTxSw") == sessions + balancer, final
    assert final["delta"].get("TlsRxSw") == sessions + balancer, final
    print(
        f"\n  /proc/net/tls_stat: +{sessions} TX/RX sessions for the pairs, "
        f"+{balancer} for the balancer's connections; none open at the end; "
        f"TlsDecryptError {stat['TlsDecryptError']}"
    )


@pytest.mark.parametrize("run", ["direct", "nginx"])
def test_the_balancer_delivers_every_event_over_kernel_tls(guest: Guest, run: str) -> None:
    """A whole replay feed goes through kernel TLS to the workers: every event once, in order."""
    record = guest.record(f"balancer-{run}")
    why = guest.explain(record)
    assert record["exit_code"] == 0, why
    connected = [line for line in record["tls_lines"] if "(TLS: " in line]
    assert connected and all("(TLS: kernel)" in line for line in connected), why
    assert not record["fallback_lines"], why
    assert all(
        "transmit in kernel space, receive in kernel space" in n for n in record["negotiated"]
    )
    while_connected = record["tls_stat_while_connected"]
    assert while_connected.get("TlsCurrTxSw") == 1 and while_connected.get("TlsCurrRxSw") == 1
    delivered = _check_delivery(guest, record, run)
    assert not record["api_key_in_log"]
    negotiated = record["negotiated"][0].split(": ", 2)[2]
    if run == "nginx":
        assert " ".join(NGINX_TLS) in negotiated, why
        access = guest.record("nginx-access-log")["access_log"]
        assert any(" 101 " in line and " ".join(NGINX_TLS) in line for line in access), access
    print(
        f"\n  balancer {run} ({record['url']}), as nobody: {negotiated}; tls_stat while "
        f"connected {while_connected}\n    {delivered}"
    )


def test_sigterm_at_random_moments_is_honoured_over_kernel_tls(guest: Guest) -> None:
    """SIGTERMs at random moments of the installed balancer's life (60 on Debian 12, 12 on 13):
    each honoured in 2 s."""
    record = guest.record("stop-stress")
    why = json.dumps(record["stress_failures"], indent=1)[:20000]
    assert record["stress_failures"] == [], f"seed {record['stress_seed']}:\n{why}"
    per_scenario = STOP_STRESS_PER_SCENARIO[guest.suite]
    assert record["stress_trials"] >= 10 * per_scenario  # of 12 scenarios x per_scenario
    # The balancer reached kernel TLS in the trials aimed after the handshake.
    assert record["stress_kernel_tls"] >= 4 * per_scenario, record["stress_scenarios"]
    print(f"\n  seed {record['stress_seed']}: {record['stress_trials']} SIGTERMs in the guest")
    for name, row in sorted(record["stress_scenarios"].items()):
        print(f"  {name:14} {row}")
