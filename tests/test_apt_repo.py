"""The signed apt repository of packaging/build-repo.sh, checked on the host and used by apt.

The repository is built from this tree's packages for Debian 12 and 13 (version N), then
updated with N+1 as a maintainer would publish it; the host checks its layout and signatures
with gpgv. Then, in a guest of each release, tests/vm/scenarios/apt-repo.sh adds it exactly as
README.md shows (the host serves it over HTTP on 127.0.0.1, which the guest reaches as
10.0.2.2), installs N with apt, runs an instance, is served three bad repositories that apt
must refuse (signed by another key, altered after signing, unsigned: each would offer N+1),
and finally the real update, which `apt-get upgrade` installs, restarting the instance with its
configuration kept. Each test judges one behaviour from what the guest recorded.
"""

from __future__ import annotations

import concurrent.futures
import http.server
import os
import re
import shutil
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from debpackages import DISTS, UPGRADE_VERSION, Packages, debian_version
from tlsca import make_ca
from vm import SUITES, VMResult, run_scenario, vm_available

import tradebalancer
from tradebalancer.replay import synth

ROOT = Path(__file__).resolve().parent.parent
BUILD_REPO = ROOT / "packaging" / "build-repo.sh"
README = ROOT / "README.md"
KEYRING = "tradebalancer-archive-keyring.asc"
# The address README's lines name; the guest gets the host's server in its place.
README_URL = "https://apt.example.org/tradebalancer"
KEY = "apt-test-key-4411"
VM_TIMEOUT = 600  # the scenario: two apt installs and the venv compiled twice, under TCG
BUILD_TIMEOUT = 1200  # four packages, when no other module has built them yet
N = tradebalancer.__version__


@dataclass(frozen=True)
class Repositories:
    """The repository at N and at N+1, the three bad ones, and the signing key's home."""

    v1: Path
    v2: Path
    foreign: Path
    tampered: Path
    unsigned: Path
    key_dir: Path


def build_repo(repo: Path, key_dir: Path, debs: dict[str, Path]) -> str:
    """Run build-repo.sh DIST=DEB... on ``repo`` with the key in ``key_dir``; its output."""
    result = subprocess.run(
        ["sh", str(BUILD_REPO), *(f"{dist}={deb}" for dist, deb in debs.items())],
        env={**os.environ, "TB_REPO_DIR": str(repo), "TB_REPO_KEY_DIR": str(key_dir)},
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def gpgv(keyring_asc: Path, *files: Path, scratch: Path) -> subprocess.CompletedProcess[str]:
    """Verify a signature with gpgv against the armored public key ``keyring_asc``."""
    keyring = scratch / f"{keyring_asc.parent.name}-keyring.gpg"
    with keyring_asc.open("rb") as armored, keyring.open("wb") as binary:
        subprocess.run(["gpg", "--dearmor"], stdin=armored, stdout=binary, check=True, timeout=30)
    return subprocess.run(
        ["gpgv", "--keyring", str(keyring), *map(str, files)],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )


def packages_index(repo: Path, dist: str) -> list[tuple[str, str]]:
    """(Version, Filename) of every package in ``dist``'s Packages index."""
    text = (repo / "dists" / dist / "main" / "binary-amd64" / "Packages").read_text()
    return re.findall(r"^Version: (\S+)\n(?:.*\n)*?Filename: (\S+)$", text, flags=re.MULTILINE)


@pytest.fixture(scope="module")
def repositories(packages: Packages, tmp_path_factory: pytest.TempPathFactory) -> Repositories:
    for tool in ("apt-ftparchive", "gpg", "gpgv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make deps installs apt-utils, gnupg, gpgv)")
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        builds = {
            (dist, version): pool.submit(packages.deb, dist, version)
            for version in (None, UPGRADE_VERSION)
            for dist in DISTS
        }
        debs = {key: future.result() for key, future in builds.items()}
    base = tmp_path_factory.mktemp("apt-repo")
    repo, key_dir = base / "repo", base / "key"
    build_repo(repo, key_dir, {dist: debs[dist, None] for dist in DISTS})
    v1 = shutil.copytree(repo, base / "v1")
    # The update, as a maintainer publishes N+1: into the same repository, with the same key.
    build_repo(repo, key_dir, {dist: debs[dist, UPGRADE_VERSION] for dist in DISTS})
    v2 = shutil.copytree(repo, base / "v2")
    newer = {dist: debs[dist, UPGRADE_VERSION] for dist in DISTS}
    foreign = base / "foreign"
    build_repo(foreign, base / "foreign-key", newer)
    tampered = shutil.copytree(v2, base / "tampered")
    unsigned = shutil.copytree(v2, base / "unsigned")
    for dist in DISTS:
        # Altered after signing, in a line no hash covers: only the signature can tell.
        in_release = tampered / "dists" / dist / "InRelease"
        text = in_release.read_text()
        assert f"Description: tradebalancer for Debian {dist}\n" in text
        in_release.write_text(text.replace(f"for Debian {dist}\n", f"for Debian {dist}.\n", 1))
        (tampered / "dists" / dist / "Release.gpg").unlink()
        (unsigned / "dists" / dist / "InRelease").unlink()
        (unsigned / "dists" / dist / "Release.gpg").unlink()
    return Repositories(v1, v2, foreign, tampered, unsigned, key_dir)


# -- the repository, on the host --------------------------------------------------------------


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_each_release_has_its_package_signed(repositories: Repositories, tmp_path: Path) -> None:
    """dists/bookworm and dists/trixie index their own package, and gpgv accepts both
    signatures of each Release with the public key the repository publishes."""
    repo = repositories.v1
    for dist in DISTS:
        version = debian_version(N, dist)
        assert packages_index(repo, dist) == [
            (version, f"pool/{dist}/main/t/tradebalancer/tradebalancer_{version}_amd64.deb")
        ]
        release = repo / "dists" / dist
        text = (release / "Release").read_text()
        assert f"\nCodename: {dist}\n" in text and "\nSHA256:\n" in text
        inline = gpgv(repo / KEYRING, release / "InRelease", scratch=tmp_path)
        assert inline.returncode == 0, inline.stderr
        detached = gpgv(
            repo / KEYRING, release / "Release.gpg", release / "Release", scratch=tmp_path
        )
        assert detached.returncode == 0, detached.stderr


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_an_update_keeps_the_key_and_the_older_version(
    repositories: Repositories, tmp_path: Path
) -> None:
    """Adding N+1 keeps N in the pool and the index, and signs with the same key."""
    assert (repositories.v1 / KEYRING).read_text() == (repositories.v2 / KEYRING).read_text()
    for dist in DISTS:
        versions = sorted(version for version, _ in packages_index(repositories.v2, dist))
        assert versions == sorted([debian_version(N, dist), debian_version(UPGRADE_VERSION, dist)])
        in_release = repositories.v2 / "dists" / dist / "InRelease"
        assert gpgv(repositories.v1 / KEYRING, in_release, scratch=tmp_path).returncode == 0


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_secret_key_never_enters_the_repository(
    repositories: Repositories, tmp_path: Path
) -> None:
    """The repository holds only the public key, and a key directory inside it is refused."""
    for path in repositories.v2.rglob("*"):
        if path.is_file():
            assert b"PRIVATE KEY" not in path.read_bytes(), path
    shown = subprocess.run(
        ["gpg", "--show-keys", "--with-colons", str(repositories.v2 / KEYRING)],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert [line.split(":")[0] for line in shown.splitlines() if line[:3] in ("pub", "sec")] == [
        "pub"
    ]
    repo = shutil.copytree(repositories.v2, tmp_path / "repo")
    refused = subprocess.run(
        ["sh", str(BUILD_REPO)],
        env={**os.environ, "TB_REPO_DIR": str(repo), "TB_REPO_KEY_DIR": str(repo / "key")},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert refused.returncode != 0
    assert "the secret key would be published" in refused.stderr
    assert not (repo / "key").exists()


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_bad_repositories_fail_gpgv(repositories: Repositories, tmp_path: Path) -> None:
    """What the guest is served as bad is bad: another key's and the altered InRelease fail."""
    for bad in (repositories.foreign, repositories.tampered):
        result = gpgv(
            repositories.v1 / KEYRING, bad / "dists" / "trixie" / "InRelease", scratch=tmp_path
        )
        assert result.returncode != 0, f"{bad.name}: {result.stderr}"


def test_readme_adds_the_key_and_a_deb822_source_with_signed_by() -> None:
    """README's install block fetches the key into /etc/apt/keyrings and writes a .sources
    entry whose Signed-By names it, for the release the machine runs."""
    lines = readme_install_lines()
    assert len(lines) == 2
    key, source = lines
    assert key.startswith("sudo curl ") and "/etc/apt/keyrings/tradebalancer.asc" in key
    assert f"{README_URL}/{KEYRING}" in key
    for field in (
        "'Types: deb'",
        f"'URIs: {README_URL}'",
        '"Suites: $(. /etc/os-release && echo "$VERSION_CODENAME")"',
        "'Components: main'",
        "'Signed-By: /etc/apt/keyrings/tradebalancer.asc'",
    ):
        assert field in source
    assert "/etc/apt/sources.list.d/tradebalancer.sources" in source


def readme_install_lines() -> list[str]:
    """The lines of README's install block that add the repository (all but `apt install`)."""
    section = README.read_text().split("\n### Install\n", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    assert match is not None, "no ```sh block under ### Install in README.md"
    return [line for line in match.group(1).splitlines() if line and "apt install" not in line]


# -- apt in a guest of each release -----------------------------------------------------------


@dataclass(frozen=True)
class Guest:
    """What one guest run recorded, and what the host's web server was asked for."""

    dist: str
    result: VMResult
    results: dict[str, str]
    requests: list[str]

    def value(self, name: str) -> str:
        """One recorded result; fails with the guest's log if it never got there."""
        assert name in self.results, f"the guest recorded no {name}\n{self.explain()}"
        return self.results[name]

    def evidence(self, name: str) -> str:
        """A log the guest left in results/ ('' if missing)."""
        path = self.result.share / "results" / name
        return path.read_text(errors="replace") if path.is_file() else ""

    def explain(self) -> str:
        """The results, the guest's output and console, and the requests, for a failure."""
        results = "\n".join(f"{name}={value}" for name, value in self.results.items())
        return (
            f"--- results.env ---\n{results}\n{self.result.explain()}\n"
            "--- HTTP requests (last 40) ---\n" + "\n".join(self.requests[-40:])
        )


def check(guest: Guest, what: str, value: object, ok: bool, expected: str) -> None:
    """Print one line of the checklist, and fail with the guest's log if it is not ok."""
    print(f"[{'ok' if ok else 'FAILED'}] {guest.dist}: {what}: {value!r} (expected {expected})")
    assert ok, f"{guest.dist}: {what}: got {value!r}, expected {expected}\n{guest.explain()}"


def check_recorded(guest: Guest, expectations: dict[str, str]) -> None:
    """Check that each named result is exactly the value given for it."""
    for name, wanted in expectations.items():
        value = guest.value(name)
        check(guest, name, value, value == wanted, repr(wanted))


@dataclass
class Server:
    """A static web server on 127.0.0.1 in a thread, recording each request line."""

    directory: Path
    requests: list[str]
    port: int = 0

    def __post_init__(self) -> None:
        requests, directory = self.requests, str(self.directory)

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, directory=directory, **kwargs)

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                # apt quotes the path: "+" of a version arrives as %2b.
                requests.append(f"{self.command} {urllib.parse.unquote(self.path)} {int(code)}")

            def log_message(self, format: str, *args: Any) -> None:
                pass  # every request is in `requests`, errors included: no noise on stderr

            def send_head(self) -> Any:
                # No "304 Not Modified" from file times: the repositories served here are made
                # within the same second, and apt asks with If-Modified-Since.
                del self.headers["If-Modified-Since"]
                return super().send_head()

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving and release the port."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


@pytest.fixture(scope="module", params=list(SUITES))
def guest(
    request: pytest.FixtureRequest,
    repositories: Repositories,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Guest]:
    dist = request.param
    reason = vm_available(dist)
    if reason is not None:
        pytest.skip(reason)
    share = tmp_path_factory.mktemp(f"apt-{dist}")
    share.chmod(0o755)  # the service's dynamic user reads the CA and the recording here
    www = share / "www"
    for name, repo in (
        ("repo", repositories.v1),
        ("repo-v2", repositories.v2),
        ("repo-foreign", repositories.foreign),
        ("repo-tampered", repositories.tampered),
        ("repo-unsigned", repositories.unsigned),
    ):
        shutil.copytree(repo, www / name)
    make_ca(share)
    synth.write_recording(
        share / "loop.jsonl",
        synth.generate_frames(seed=4411, count_events=2_000),
        comment="tradebalancer apt repository test: the endless replay's loop",
    )
    server = Server(www, [])
    try:
        url = f"http://10.0.2.2:{server.port}/repo"
        lines = [line.replace(README_URL, url) for line in readme_install_lines()]
        (share / "readme-install.sh").write_text("\n".join(lines) + "\n")
        (share / "scenario.env").write_text(f"REPO_URL={url}\nKEY={KEY}\n")
        result = run_scenario("apt-repo.sh", share, timeout=VM_TIMEOUT, suite=dist)
    finally:
        server.close()
    results: dict[str, str] = {}
    results_file = share / "results" / "results.env"
    if results_file.is_file():
        for line in results_file.read_text(errors="replace").splitlines():
            name, separator, value = line.partition("=")
            if separator:
                results[name] = value.strip()
    print(f"\napt repository scenario on {dist}: guest ran {result.seconds:.0f} s, share {share}")
    yield Guest(dist, result, results, server.requests)


@pytest.mark.vm
@pytest.mark.timeout(BUILD_TIMEOUT + VM_TIMEOUT)
def test_readme_lines_add_the_repository(guest: Guest) -> None:
    """README's two lines, run as they are, leave the key in /etc/apt/keyrings and a deb822
    source for the guest's release that names it."""
    check(guest, "guest script exit code", guest.result.exit_code, guest.result.exit_code == 0, "0")
    check_recorded(
        guest,
        {
            "network": "0",
            "readme_status": "0",
            "keyring": "tradebalancer.asc",
            "source_signed_by": "/etc/apt/keyrings/tradebalancer.asc",
            "source_suite": guest.dist,
        },
    )
    fetched = f"GET /repo/{KEYRING} 200"
    check(
        guest,
        "the key fetched over HTTP",
        fetched in guest.requests,
        fetched in guest.requests,
        "True",
    )


@pytest.mark.vm
@pytest.mark.timeout(BUILD_TIMEOUT + VM_TIMEOUT)
def test_apt_installs_the_package_from_the_repository(guest: Guest) -> None:
    """apt-get update and apt-get install tradebalancer install N from the repository."""
    version = debian_version(N, guest.dist)
    check_recorded(
        guest,
        {
            "update1_status": "0",
            "candidate1": version,
            "install_status": "0",
            "version1": version,
        },
    )
    deb = f"GET /repo/pool/{guest.dist}/main/t/tradebalancer/tradebalancer_{version}_amd64.deb 200"
    check(
        guest,
        "the package downloaded over HTTP",
        deb in guest.requests,
        deb in guest.requests,
        "True",
    )
    signed = f"GET /repo/dists/{guest.dist}/InRelease 200"
    check(guest, "InRelease fetched", signed in guest.requests, signed in guest.requests, "True")
    check_recorded(guest, {"start_status": "0", "streaming1": "0"})


# What apt says when it refuses each bad repository (Debian 12's gpgv, Debian 13's sqv), and
# what it does then: for a repository it verified before, a bad signature keeps the previous
# indices (apt-get update warns and exits 0); a repository that is no longer signed at all is an
# error (exit 100).
REFUSALS = {
    "foreign": ("NO_PUBKEY|Missing key", "The repository is not updated"),
    "tampered": ("BADSIG|Message has been manipulated", "The repository is not updated"),
    "unsigned": ("is no longer signed", "E: The repository"),
}


@pytest.mark.vm
@pytest.mark.timeout(BUILD_TIMEOUT + VM_TIMEOUT)
@pytest.mark.parametrize("bad", sorted(REFUSALS))
def test_apt_refuses_a_repository_it_cannot_verify(guest: Guest, bad: str) -> None:
    """Served N+1 signed by another key, altered after signing, or unsigned, apt refuses the
    new indices: the candidate stays N and apt-get upgrade installs nothing."""
    version = debian_version(N, guest.dist)
    check_recorded(guest, {f"{bad}_candidate": version, f"{bad}_version": version})
    log = guest.evidence(f"update-{bad}.log")
    reason, verdict = REFUSALS[bad]
    found = re.search(reason, log)
    check(guest, f"{bad}: apt's reason", found and found.group(0), found is not None, reason)
    check(guest, f"{bad}: apt's verdict", verdict in log, verdict in log, verdict)
    if bad == "unsigned":
        status = guest.value(f"{bad}_update_status")
        check(guest, f"{bad}: apt-get update exit status", status, status == "100", "100")


@pytest.mark.vm
@pytest.mark.timeout(BUILD_TIMEOUT + VM_TIMEOUT)
def test_apt_upgrade_brings_the_update_and_the_service_back(guest: Guest) -> None:
    """Once the repository carries N+1, apt-get upgrade installs it; the instance restarts on
    it, enabled and streaming, with its configuration kept and no conffile prompt."""
    newer = debian_version(UPGRADE_VERSION, guest.dist)
    check_recorded(
        guest,
        {
            "update2_status": "0",
            "candidate2": newer,
            "upgrade_status": "0",
            "version2": newer,
            "upgrade_active": "active",
            "upgrade_enabled": "enabled",
            "streaming2": "0",
            "config_kept": "yes",
            "config_prompts": "",
        },
    )
    before, after = guest.value("pid1"), guest.value("pid2")
    check(guest, "main PID", f"{before} -> {after}", before != after, "a new one")
