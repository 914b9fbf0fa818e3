"""The systemd units, the kernel settings and the Debian package, checked from the host.

The unit files are parsed here (systemd-analyze verify needs systemd as PID 1) and held to the
contract of the program: its path, its exit codes, its credential name, its /proc needs. The
package is built for Debian 12 and for Debian 13 with packaging/build-deb.sh (once per test
session, shared with the VM tests: debpackages.py) and inspected with dpkg-deb and each
release's own lintian; where the host allows a private mount namespace, the venv of the host
release's package is run at its final path through an overlay of /usr. Installing it for
real, with systemd, is the VM tests' job.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import subprocess
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from debpackages import (
    BUILD_TIMEOUT,
    DISTS,
    PYTHON_VERSION,
    UNIT_DIRECTORY,
    UPGRADE_VERSION,
    Packages,
    callers_pip_cache,
    debian_version,
    host_dist,
)
from packaging.requirements import Requirement

import tradebalancer
from tradebalancer import config, pipes
from tradebalancer.errors import ExitCode

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "systemd"
PACKAGING = ROOT / "packaging"
DEBIAN = PACKAGING / "debian"
TEMPLATE = SYSTEMD / "tradebalancer@.service"
UMBRELLA = SYSTEMD / "tradebalancer.service"
VENV = "/usr/lib/tradebalancer/venv"
# A shell in a private mount namespace: its mounts vanish with it and never reach the host.
IN_MOUNT_NAMESPACE = ("unshare", "--mount", "--propagation", "private", "sh", "-c")


@dataclass(frozen=True)
class Unit:
    """A parsed unit file: every value of every key, in order, by section."""

    sections: Mapping[str, Mapping[str, list[str]]]

    def values(self, section: str, key: str) -> list[str]:
        """Return every value given to ``key`` in ``section`` (empty if none)."""
        return list(self.sections.get(section, {}).get(key, []))

    def value(self, section: str, key: str) -> str:
        """Return the value of a key that must be set exactly once."""
        values = self.values(section, key)
        assert len(values) == 1, f"[{section}] {key}= is set {len(values)} times"
        return values[0]


_SECTION = re.compile(r"\[(?P<name>[A-Za-z]+)\]")
_ASSIGNMENT = re.compile(r"(?P<key>[A-Z][A-Za-z0-9]*)=(?P<value>.*)")


def parse_unit(path: Path) -> Unit:
    """Parse a unit file as systemd.syntax(7) describes it, strictly: any other line fails."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    pending = ""
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if section := _SECTION.fullmatch(line):
            assert section["name"] not in sections, f"{path.name}:{number}: section repeated"
            current = sections.setdefault(section["name"], {})
            continue
        assignment = _ASSIGNMENT.fullmatch(line)
        assert assignment, f"{path.name}:{number}: not a section or Key=value: {raw!r}"
        assert current is not None, f"{path.name}:{number}: assignment outside a section"
        current.setdefault(assignment["key"], []).append(assignment["value"].strip())
    assert not pending, f"{path.name}: ends in a line continuation"
    return Unit(sections)


def read_key_values(path: Path) -> dict[str, str]:
    """Return the ``key = value`` lines of a sysctl.d(5) file."""
    settings = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


@pytest.fixture(scope="module")
def template() -> Unit:
    return parse_unit(TEMPLATE)


@pytest.fixture(scope="module")
def umbrella() -> Unit:
    return parse_unit(UMBRELLA)


# -- the units ------------------------------------------------------------------------------


def test_units_parse_with_the_expected_sections(template: Unit, umbrella: Unit) -> None:
    """Both unit files are well-formed and have exactly [Unit], [Service] and [Install]."""
    assert set(template.sections) == {"Unit", "Service", "Install"}
    assert set(umbrella.sections) == {"Unit", "Service", "Install"}


def test_the_unit_runs_the_installed_command(template: Unit) -> None:
    """ExecStart runs /usr/bin/tradebalancer run %i, and ExecStartPre checks config and key."""
    install = (DEBIAN / "tradebalancer.install").read_text().split("\n")
    assert "packaging/bin/tradebalancer usr/bin/" in install
    assert template.value("Service", "ExecStart") == "/usr/bin/tradebalancer run %i"
    assert template.value("Service", "ExecStartPre") == (
        "/usr/bin/tradebalancer check-config --require-key %i"
    )


def test_the_launcher_runs_the_private_venv_isolated() -> None:
    """The /usr/bin launcher execs the venv's python with -I, keeping its PID for sd_notify."""
    launcher = (PACKAGING / "bin" / "tradebalancer").read_text()
    assert launcher.startswith("#!/bin/sh\n")
    assert f'exec {VENV}/bin/python3 -I -m tradebalancer "$@"\n' in launcher
    assert os.access(PACKAGING / "bin" / "tradebalancer", os.X_OK)


def test_restarts_stop_on_the_exit_codes_restarting_cannot_fix(template: Unit) -> None:
    """RestartPreventExitStatus is exactly the config, auth and kernel TLS exit codes."""
    assert template.value("Service", "Restart") == "on-failure"
    prevented = {
        int(code) for code in template.value("Service", "RestartPreventExitStatus").split()
    }
    assert prevented == {ExitCode.CONFIG, ExitCode.NOPERM, ExitCode.UNAVAILABLE}
    assert int(template.value("Unit", "StartLimitBurst")) > 1
    assert template.value("Unit", "StartLimitIntervalSec")


def test_the_credential_is_where_the_configuration_looks(template: Unit) -> None:
    """LoadCredential provides api-key, the file the default api_key_file names."""
    name, _, source = template.value("Service", "LoadCredential").partition(":")
    assert "${CREDENTIALS_DIRECTORY}/" + name == config.DEFAULT_API_KEY_FILE
    assert source == "/etc/tradebalancer/%i.key"


def test_the_service_notifies_and_is_watched(template: Unit) -> None:
    """Type=notify from the main process only, a watchdog, and time to stop before SIGKILL."""
    from tradebalancer import service  # the whole service: imported by this test alone

    assert template.value("Service", "Type") == "notify"
    assert template.value("Service", "NotifyAccess") == "main"
    assert int(template.value("Service", "WatchdogSec")) > 0
    assert template.value("Service", "KillMode") == "mixed"
    drain = config.loads('[feeds.f]\ncommand = ["w"]\n').feed("f").drain_timeout  # the default
    own_worst_case = 2 * drain + service.WORKER_TERM_TIMEOUT  # flush, exit, SIGTERM's grace
    assert int(template.value("Service", "TimeoutStopSec")) > own_worst_case


def test_each_instance_has_its_own_state_directory(template: Unit) -> None:
    """The dynamic user works in StateDirectory tradebalancer/%i, its working directory."""
    assert template.value("Service", "DynamicUser") == "yes"
    assert template.value("Service", "StateDirectory") == "tradebalancer/%i"
    assert template.value("Service", "WorkingDirectory") == "%S/tradebalancer/%i"
    assert template.value("Service", "SyslogIdentifier") == "tradebalancer@%i"


def test_instances_are_part_of_the_umbrella(template: Unit, umbrella: Unit) -> None:
    """Instances are PartOf the umbrella, a oneshot that stays active and is wanted at boot."""
    assert template.value("Unit", "PartOf") == UMBRELLA.name
    assert template.value("Install", "WantedBy") == "multi-user.target"
    assert umbrella.value("Service", "Type") == "oneshot"
    assert umbrella.value("Service", "RemainAfterExit") == "yes"
    assert umbrella.value("Service", "ExecStart") == "/bin/true"
    assert umbrella.value("Install", "WantedBy") == "multi-user.target"
    for unit in (template, umbrella):
        assert unit.value("Unit", "Documentation") == "man:tradebalancer(8)"


def test_the_sandbox_keeps_what_the_balancer_needs(template: Unit) -> None:
    """No capabilities, inet and unix sockets only, and /proc/sys stays readable."""
    service = template.sections["Service"]
    assert service["CapabilityBoundingSet"] == [""]
    assert set(template.value("Service", "RestrictAddressFamilies").split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
    }
    assert pipes.PIPE_MAX_SIZE_PATH.parts[:3] == ("/", "proc", "sys")
    assert template.values("Service", "ProcSubset") in ([], ["all"])
    assert template.value("Service", "ProtectSystem") == "strict"
    assert template.value("Service", "ProtectProc") == "invisible"
    assert template.values("Service", "SystemCallFilter")[0] == "@system-service"
    for key in ("NoNewPrivileges", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables"):
        assert template.value("Service", key) == "yes", key


def test_the_security_exposure_is_at_most_2(tmp_path: Path) -> None:
    """systemd-analyze security --offline rates an instance at 2.0 or better."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "tradebalancer@feed.service"
    shutil.copyfile(TEMPLATE, unit)
    result = subprocess.run(
        [analyze, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if result.returncode != 0 and "offline" in result.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {result.stderr.strip()}")
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match[1]) <= 2.0, result.stdout


# -- kernel settings ------------------------------------------------------------------------


def test_sysctl_lifts_the_pipe_limits() -> None:
    """The sysctl.d file raises fs.pipe-max-size to 2 GiB and lifts the per-user page limits."""
    settings = read_key_values(SYSTEMD / "sysctl.d" / "60-tradebalancer.conf")
    assert settings == {
        "fs.pipe-max-size": str(2**31),
        "fs.pipe-user-pages-soft": "0",
        "fs.pipe-user-pages-hard": "0",
    }


def test_modules_load_loads_kernel_tls() -> None:
    """The modules-load.d file loads the tls module and nothing else."""
    lines = (SYSTEMD / "modules-load.d" / "tradebalancer.conf").read_text().splitlines()
    assert [line for line in lines if line and not line.startswith(("#", ";"))] == ["tls"]


# -- package sources ------------------------------------------------------------------------


def test_the_versions_agree() -> None:
    """The changelog and the man page carry the version of tradebalancer.__version__."""
    first_line = (DEBIAN / "changelog").read_text().splitlines()[0]
    match = re.fullmatch(r"tradebalancer \((?P<version>[^)]+)\) \S+; urgency=\w+", first_line)
    assert match, first_line
    assert match["version"].rpartition("-")[0] == tradebalancer.__version__
    title = next(
        line
        for line in (PACKAGING / "tradebalancer.8").read_text().splitlines()
        if line.startswith(".TH ")
    )
    assert f'"tradebalancer {tradebalancer.__version__}"' in title


def test_the_man_page_lists_every_exit_code() -> None:
    """Every ExitCode appears under EXIT STATUS in the man page."""
    page = (PACKAGING / "tradebalancer.8").read_text()
    section = page.split(".SH EXIT STATUS\n", 1)[1].split("\n.SH ", 1)[0]
    listed = {int(code) for code in re.findall(r"^\.B (\d+)$", section, flags=re.MULTILINE)}
    assert listed == {int(code) for code in ExitCode}


def test_the_lock_pins_every_runtime_dependency() -> None:
    """requirements.txt pins each pyproject dependency, with hashes, inside its range."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text = (PACKAGING / "requirements.txt").read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+) \\$", text, flags=re.MULTILINE))
    pins = {name.lower().replace("_", "-"): version for name, version in pins.items()}
    for dependency in project["dependencies"]:
        requirement = Requirement(dependency)
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned in packaging/requirements.txt"
        assert requirement.specifier.contains(pins[name]), (name, pins[name])
    requirements = [line for line in text.splitlines() if "==" in line]
    assert all(line.endswith(" \\") for line in requirements), "every pin needs its hashes"


def test_the_maintainer_scripts_are_valid_shell() -> None:
    """postinst, prerm and postrm parse with sh -n and keep the #DEBHELPER# token."""
    for name in ("postinst", "prerm", "postrm"):
        script = DEBIAN / f"tradebalancer.{name}"
        assert "\n#DEBHELPER#\n" in script.read_text(), name
        subprocess.run(["sh", "-n", str(script)], check=True, timeout=10)


# -- the built package ----------------------------------------------------------------------


@dataclass(frozen=True)
class Built:
    """The package built for this module's distribution, and where its build tree was."""

    deb: Path
    build_dir: Path
    extracted: Path
    dist: str


@pytest.fixture(scope="module", params=DISTS)
def built(
    request: pytest.FixtureRequest, packages: Packages, tmp_path_factory: pytest.TempPathFactory
) -> Built:
    build = packages.build(request.param)
    extracted = tmp_path_factory.mktemp(f"deb-{request.param}") / "root"
    subprocess.run(["dpkg-deb", "-x", str(build.deb), str(extracted)], check=True, timeout=60)
    return Built(build.deb, build.build_dir, extracted, build.dist)


def require_host_release(built: Built) -> None:
    """Skip the test unless the package is for the host's own Debian release (its python3)."""
    if built.dist != host_dist():
        pytest.skip(f"runs the {built.dist} package's venv, which needs {built.dist}'s python3")


def deb_field(deb: Path, field: str) -> str:
    """Return a control field of ``deb``."""
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_package_is_named_after_the_version(built: Built) -> None:
    """The build leaves tradebalancer_<version>-1[+deb13]_<arch>.deb with that version inside."""
    arch = deb_field(built.deb, "Architecture")
    version = deb_field(built.deb, "Version")
    assert version == debian_version(tradebalancer.__version__, built.dist)
    assert built.deb.name == f"tradebalancer_{version}_{arch}.deb"


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_build_keeps_its_own_pip_cache(built: Built) -> None:
    """Two builds at once must not share pip's cache, which concurrent installs corrupt."""
    assert not callers_pip_cache(built.build_dir).exists()
    assert any((built.build_dir / "pip-cache").iterdir())


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_package_holds_every_file(built: Built) -> None:
    """The launcher, units, kernel settings, man page, config, venv, examples: all packaged."""
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(built.deb)], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    paths = {line.split()[5].removeprefix(".").split(" -> ")[0] for line in listing.splitlines()}
    units = UNIT_DIRECTORY[built.dist]
    site_packages = f"{VENV}/lib/python{PYTHON_VERSION[built.dist]}/site-packages"
    for path in (
        "/usr/bin/tradebalancer",
        f"{units}/tradebalancer.service",
        f"{units}/tradebalancer@.service",
        "/usr/lib/sysctl.d/60-tradebalancer.conf",
        "/usr/lib/modules-load.d/tradebalancer.conf",
        "/usr/share/man/man8/tradebalancer.8.gz",
        "/etc/tradebalancer.toml",
        f"{VENV}/pyvenv.cfg",
        f"{VENV}/bin/python3",
        f"{site_packages}/tradebalancer/cli.py",
        "/usr/share/doc/tradebalancer/copyright",
        "/usr/share/doc/tradebalancer/examples/grafana-dashboard.json",
        "/usr/share/doc/tradebalancer/examples/tradebalancer-alerts.yml",
    ):
        assert path in paths, path
    assert not [path for path in paths if "__pycache__" in path or path.endswith(".pyc")]
    package = f"{site_packages}/tradebalancer/"
    assert [path for path in paths if path.startswith(package + "_fastsplit.")], "no C router"
    assert [path for path in paths if path.startswith(package + "reader/_fastread.")], "no C reader"
    for module in ("reader/format.py", "transport/connector.py", "replay/server.py"):
        assert package + module in paths, f"the subpackages are not all packaged: {module}"


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_configuration_is_a_conffile(built: Built, tmp_path: Path) -> None:
    """/etc/tradebalancer.toml is the package's one conffile."""
    subprocess.run(["dpkg-deb", "-e", str(built.deb), str(tmp_path / "control")], check=True)
    conffiles = (tmp_path / "control" / "conffiles").read_text().split()
    assert conffiles == ["/etc/tradebalancer.toml"]


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_package_depends_on_the_python_it_was_built_for(built: Built) -> None:
    """Depends names its release's python3 minor version exactly (3.11 on 12, 3.13 on 13),
    libcap2 (python-prctl) and ca-certificates."""
    depends = [item.strip() for item in deb_field(built.deb, "Depends").split(",")]
    major, minor = PYTHON_VERSION[built.dist].split(".")
    assert f"python3 (>= {major}.{minor}~)" in depends
    assert f"python3 (<< {major}.{int(minor) + 1})" in depends
    assert "ca-certificates" in depends
    assert any(item.startswith("libcap2 ") for item in depends)


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_lintian_reports_no_error_or_warning(built: Built, tmp_path: Path) -> None:
    """The lintian of the package's own release passes it with no E: or W: line."""
    if built.dist == host_dist():
        if shutil.which("lintian") is None:
            pytest.skip("lintian is not installed")
        argv = ["lintian", "--fail-on", "error,warning", str(built.deb)]
    else:
        # The build root of the release has its lintian (packaging/build-root.sh).
        shutil.copy(built.deb, tmp_path / built.deb.name)
        lintian = ["lintian", "--fail-on", "error,warning", f"/build/{built.deb.name}"]
        argv = ["sh", str(PACKAGING / "build-root.sh"), "run", built.dist, str(tmp_path), *lintian]
    result = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    problems = [line for line in result.stdout.splitlines() if line.startswith(("E:", "W:"))]
    assert result.returncode == 0 and not problems, result.stdout + result.stderr


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_venv_points_at_debian_python_and_its_final_path(built: Built) -> None:
    """pyvenv.cfg and the python link name /usr/bin, and nothing names the build tree."""
    venv = built.extracted / VENV.lstrip("/")
    cfg = dict(
        line.split(" = ", 1) for line in (venv / "pyvenv.cfg").read_text().splitlines() if line
    )
    assert cfg["home"] == "/usr/bin"
    assert cfg["include-system-site-packages"] == "false"
    assert cfg["command"] == f"/usr/bin/python3 -m venv {VENV}"
    link = os.readlink(venv / "bin" / "python3")
    assert posixpath.normpath(posixpath.join(f"{VENV}/bin", link)) == "/usr/bin/python3"
    assert sorted(path.name for path in (venv / "bin").iterdir()) == [
        "python",
        "python3",
        f"python{PYTHON_VERSION[built.dist]}",
    ]
    build_path = str(built.build_dir).encode()
    for path in built.extracted.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert build_path not in path.read_bytes(), path


def require_mount_namespace(scratch: Path) -> None:
    """Skip the test unless this process can make a private mount namespace with overlays."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private mount namespace")
    for name in ("upper", "lower", "target"):
        (scratch / name).mkdir(parents=True)
    probe = subprocess.run(
        [
            *IN_MOUNT_NAMESPACE,
            'mount -t overlay overlay -o "lowerdir=$0/upper:$0/lower" "$0/target"',
            str(scratch),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace with overlayfs here: {probe.stderr.strip()}")


def run_at_final_path(built: Built, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` in a private mount namespace where the package's /usr overlays the host's."""
    lower = f"{built.extracted}/usr:/usr"
    script = 'mount -t overlay overlay -o "lowerdir=$0" /usr && exec "$@"'
    return subprocess.run(
        [*IN_MOUNT_NAMESPACE, script, lower, *argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_installed_command_runs_from_the_final_path(built: Built, tmp_path: Path) -> None:
    """At /usr/lib/tradebalancer/venv, the launcher prints the version and checks the config."""
    require_host_release(built)
    require_mount_namespace(tmp_path / "probe")
    version = run_at_final_path(built, "/usr/bin/tradebalancer", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"tradebalancer {tradebalancer.__version__}"
    conf = str(built.extracted / "etc" / "tradebalancer.toml")
    checked = run_at_final_path(built, "/usr/bin/tradebalancer", "--config", conf, "check-config")
    assert checked.returncode == 0, checked.stderr
    imports = run_at_final_path(
        built,
        f"{VENV}/bin/python3",
        "-I",
        "-c",
        "import sys, orjson, prctl, sdnotify, websockets; from tradebalancer import split;"
        " print(sys.prefix, split.Splitter(3).accelerated)",
    )
    assert imports.returncode == 0, imports.stderr
    assert imports.stdout.strip() == f"{VENV} True"  # the C router is built and loads


_MAINTAINER_SCRIPTS = r"""
set -eu
mount -t overlay overlay -o "lowerdir=$STAGE/usr:/usr,upperdir=$UP/usr,workdir=$UP/usr-work" /usr
for dir in etc var; do
    mount -t overlay overlay -o "lowerdir=/$dir,upperdir=$UP/$dir,workdir=$UP/$dir-work" "/$dir"
done
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
cp "$STAGE/etc/tradebalancer.toml" /etc/tradebalancer.toml
export DPKG_MAINTSCRIPT_PACKAGE=tradebalancer
DPKG_MAINTSCRIPT_NAME=postinst sh "$CONTROL/postinst" configure
echo "pyc=$(find /usr/lib/tradebalancer -name '*.pyc' | wc -l)"
echo "keydir=$(stat -c %a /etc/tradebalancer)"
echo "umbrella=$(ls /etc/systemd/system/multi-user.target.wants/ | grep -c '^tradebalancer')"
mkdir -p /var/lib/private/tradebalancer/feed
ln -s /lib/systemd/system/tradebalancer@.service \
    /etc/systemd/system/multi-user.target.wants/tradebalancer@feed.service
touch /etc/tradebalancer/feed.key
DPKG_MAINTSCRIPT_NAME=prerm sh "$CONTROL/prerm" remove
echo "pycache_after_prerm=$(find /usr/lib/tradebalancer -name __pycache__ | wc -l)"
DPKG_MAINTSCRIPT_NAME=postrm sh "$CONTROL/postrm" remove
DPKG_MAINTSCRIPT_NAME=postrm sh "$CONTROL/postrm" purge
echo "links_after_purge=$(find /etc/systemd/system -name 'tradebalancer*' | wc -l)"
echo "state_after_purge=$(ls -d /var/lib/private/tradebalancer 2>/dev/null | wc -l)"
echo "keys_after_purge=$(ls /etc/tradebalancer)"
"""


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_the_maintainer_scripts_tolerate_a_container_and_purge_cleans_up(
    built: Built, tmp_path: Path
) -> None:
    """In a container-like root the postinst succeeds; prerm and purge remove what was made."""
    require_host_release(built)
    require_mount_namespace(tmp_path / "probe")
    stage = tmp_path / "stage"
    shutil.copytree(built.extracted / "usr", stage / "usr", symlinks=True)
    # Debian 12 is usr-merged: /lib is /usr/lib, so the units join the /usr overlay.
    shutil.copytree(
        built.extracted / "lib", stage / "usr" / "lib", symlinks=True, dirs_exist_ok=True
    )
    shutil.copytree(built.extracted / "etc", stage / "etc")
    up = tmp_path / "up"
    for name in ("usr", "usr-work", "etc", "etc-work", "var", "var-work"):
        (up / name).mkdir(parents=True)
    # The kernel cannot take these here: ischroot says "not a chroot", modprobe fails.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "ischroot").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "modprobe").write_text("#!/bin/sh\necho 'modprobe: not here' >&2\nexit 1\n")
    for tool in fake_bin.iterdir():
        tool.chmod(0o755)
    control = tmp_path / "control"
    subprocess.run(["dpkg-deb", "-e", str(built.deb), str(control)], check=True, timeout=30)
    before = Path("/proc/sys/fs/pipe-max-size").read_text()
    result = subprocess.run(
        [*IN_MOUNT_NAMESPACE, _MAINTAINER_SCRIPTS],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env={
            "PATH": f"{fake_bin}:/usr/sbin:/usr/bin:/sbin:/bin",
            "STAGE": str(stage),
            "UP": str(up),
            "CONTROL": str(control),
        },
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "could not load the kernel TLS module" in result.stdout
    report = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    assert int(report["pyc"]) > 0
    assert report["keydir"] == "700"
    assert report["umbrella"] == "1"
    assert report["pycache_after_prerm"] == "0"
    assert report["links_after_purge"] == "0"
    assert report["state_after_purge"] == "0"
    assert report["keys_after_purge"] == "feed.key"
    assert Path("/proc/sys/fs/pipe-max-size").read_text() == before


@pytest.mark.timeout(BUILD_TIMEOUT)
def test_a_version_override_builds_a_newer_package(built: Built, packages: Packages) -> None:
    """TB_DEB_VERSION builds the same sources as a higher version, for the upgrade tests."""
    deb = packages.deb(built.dist, UPGRADE_VERSION)
    newer = deb_field(deb, "Version")
    assert newer == debian_version(UPGRADE_VERSION, built.dist)
    older = deb_field(built.deb, "Version")
    subprocess.run(["dpkg", "--compare-versions", newer, "gt", older], check=True, timeout=10)


def test_the_debian_13_package_sorts_above_the_debian_12_one() -> None:
    """A system upgraded from Debian 12 to 13 moves on to the package built for 13."""
    bookworm, trixie = (debian_version(tradebalancer.__version__, dist) for dist in DISTS)
    subprocess.run(["dpkg", "--compare-versions", trixie, "gt", bookworm], check=True, timeout=10)
