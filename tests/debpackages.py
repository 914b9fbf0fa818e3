"""The Debian packages of this tree, built once per test session and shared by the modules.

packaging/build-deb.sh builds one package in about a minute (the first Debian 13 build also
makes the build root: a few minutes more). test_packaging, the VM tests and the apt repository
test need the same few: this tree's version and one higher version, for Debian 12 and for
Debian 13. `Packages.build` builds each (distribution, version) once however many modules and
threads ask for it; the session fixture `packages` (conftest.py) is the one instance.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

import tradebalancer

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "packaging" / "build-deb.sh"
BUILD_TIMEOUT = 900  # seconds: the build downloads its dependencies from the package index
DISTS = ("bookworm", "trixie")
# What build-deb.sh adds to the Debian version per distribution, and what each one has.
VERSION_SUFFIX = {"bookworm": "", "trixie": "+deb13"}
PYTHON_VERSION = {"bookworm": "3.11", "trixie": "3.13"}
UNIT_DIRECTORY = {"bookworm": "/lib/systemd/system", "trixie": "/usr/lib/systemd/system"}
# The same sources as a higher version: what the upgrade tests upgrade to.
UPGRADE_VERSION = f"{tradebalancer.__version__}+upgrade2"


def debian_version(upstream: str, dist: str) -> str:
    """The Debian version build-deb.sh gives ``upstream`` for ``dist``: 0.1.0-1+deb13."""
    return f"{upstream}-1{VERSION_SUFFIX[dist]}"


def host_dist() -> str:
    """The code name of the Debian release this host runs ('' if not Debian)."""
    for line in Path("/etc/os-release").read_text().splitlines():
        name, _, value = line.partition("=")
        if name == "VERSION_CODENAME":
            return value.strip('"')
    return ""


@dataclass(frozen=True)
class PackageBuild:
    """One built package: the .deb, the build directory it was made in, its distribution."""

    deb: Path
    build_dir: Path
    dist: str


def callers_pip_cache(build_dir: Path) -> Path:
    """The pip cache that build_package's caller would share with every other pip run."""
    return build_dir.with_name(f"{build_dir.name}-callers-pip-cache")


def build_package(
    build_dir: Path, out_dir: Path, version: str | None = None, dist: str = "bookworm"
) -> Path:
    """Run packaging/build-deb.sh for ``dist`` into ``out_dir``; return the one .deb it made."""
    for tool in ("dpkg-buildpackage", "dh", "dpkg-deb"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make deps installs it)")
    if dist != host_dist() and os.geteuid() != 0:
        pytest.skip(f"a package for {dist} is built in a {dist} build root, which needs root")
    env = {
        **os.environ,
        "TB_DEB_DIST": dist,
        "TB_DEB_BUILD_DIR": str(build_dir),
        "TB_DEB_OUT_DIR": str(out_dir),
        "TB_DEB_LINTIAN": "0",
        "PIP_CACHE_DIR": str(callers_pip_cache(build_dir)),
    }
    if version is not None:
        env["TB_DEB_VERSION"] = version
    result = subprocess.run(
        ["sh", str(BUILD_SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=BUILD_TIMEOUT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (deb,) = out_dir.glob("*.deb")
    assert result.stdout.strip().endswith(str(deb))
    return deb


class Packages:
    """Packages of this tree built on first demand, once per (distribution, version)."""

    def __init__(self, base: Path) -> None:
        self._base = base
        self._lock = threading.Lock()
        self._builds: dict[tuple[str, str | None], concurrent.futures.Future[PackageBuild]] = {}

    def build(self, dist: str = "bookworm", version: str | None = None) -> PackageBuild:
        """The package of ``dist`` at ``version`` (None: the changelog's), built if need be."""
        key = (dist, version)
        with self._lock:
            future = self._builds.get(key)
            owner = future is None
            if future is None:
                future = self._builds[key] = concurrent.futures.Future()
        if owner:
            name = f"{dist}-{version or 'current'}"
            build_dir = self._base / name / "build"
            try:
                deb = build_package(build_dir, self._base / name / "out", version, dist)
            except BaseException as exc:  # a skip or a failure: every caller sees the same
                future.set_exception(exc)
                raise
            future.set_result(PackageBuild(deb, build_dir, dist))
        return future.result()

    def deb(self, dist: str = "bookworm", version: str | None = None) -> Path:
        """The .deb of ``dist`` at ``version``, built if need be."""
        return self.build(dist, version).deb
