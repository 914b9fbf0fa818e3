"""Boots a Debian 12 or Debian 13 test guest under qemu and runs one shell script in it.

Owns: the guest image cache (one image per suite, built by build-image.sh, under a lock, keyed
by a hash of its inputs and the suite), the qemu command line, and reading back what the guest
leaves in the 9p share.
Must not touch: the tradebalancer package and the repository (the image lives in the cache
directory, ${TRADEBALANCER_VM_CACHE:-/var/cache/tradebalancer-vm}, never in the work tree).

A run, as `run_in_vm` does it:

1. the caller's script is written as `run.sh` into a share directory on the host, beside any
   files the caller put there (a .deb, a config);
2. qemu boots the cached kernel, a small initramfs and the disk in snapshot mode (the image is
   never modified) with the share exported over virtio-9p as tag `share`;
3. in the guest, vm-test.service mounts the share on /mnt/share, runs `bash run.sh` from there
   with its output teed to `output.log` and the serial console, writes the exit status to
   `exit-code`, and powers off;
4. the host reads `exit-code`, `output.log` and `console.log` (the serial console) back;
   a guest that powered off without an exit code raises VMError, VMPanic if its kernel
   panicked (named by its oops line), VMTimeout if it never powered off.

Speed, measured on a 2-core host where /dev/kvm is not usable, so qemu runs under TCG: boot to
power-off for a trivial script takes 12-17 s (29 s with Debian's default initramfs and an
untrimmed boot, see build-image.sh); building the image takes about 75 s, once per change of
its inputs (Debian 13's: about the same).

Suites: "bookworm" (Debian 12, kernel 6.1, the default) and "trixie" (Debian 13, kernel 6.12).
Every function that needs an image takes `suite=`; the images live side by side in the cache
as debian12-KEY and debian13-KEY.

Command line, for humans and the Makefile:

    python tests/vm/vm.py build [--suite S]          # build the image unless cached
    python tests/vm/vm.py run SCRIPT [--share DIR] [--suite S]  # boot, run SCRIPT, print it
    python tests/vm/vm.py info [--suite S]           # cache key, paths, availability
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = [
    "DEFAULT_SUITE",
    "SUITES",
    "VMError",
    "VMImage",
    "VMPanic",
    "VMResult",
    "VMTimeout",
    "cache_directory",
    "ensure_image",
    "find_image",
    "image_key",
    "image_name",
    "kernel_panic",
    "main",
    "qemu_command",
    "run_in_vm",
    "vm_available",
]

HERE = Path(__file__).resolve().parent
BUILD_SCRIPT = HERE / "build-image.sh"
CACHE_ENV = "TRADEBALANCER_VM_CACHE"
DEFAULT_CACHE = Path("/var/cache/tradebalancer-vm")
QEMU = "qemu-system-x86_64"
# Debian's code name -> the cache directory's prefix (debian12-KEY).
SUITES = {"bookworm": "debian12", "trixie": "debian13"}
DEFAULT_SUITE = "bookworm"
# Older images of a suite are deleted after a build; a few are kept for checkouts that differ.
KEEP_IMAGES = 3
# What the guest leaves in the share (see guest/vm-test-run) and what the host adds.
SCRIPT_NAME = "run.sh"
OUTPUT_NAME = "output.log"
EXIT_CODE_NAME = "exit-code"
CONSOLE_NAME = "console.log"
QEMU_LOG_NAME = "qemu.log"
# vCPUs per suite. Debian 13's kernel gets one: with two, qemu 7.2's TCG (a host thread per
# vCPU, translated code shared between them) panicked it in about one boot in ten (9 boots in a
# row on an idle host: one panic): a static key flipped at boot ("sched_clock: Marking stable")
# leaves a stale int3 in sched_clock_cpu's translated code, and the next call dies with "Oops:
# int3". One vCPU cannot race itself. Debian 12's kernel never did in well over a hundred
# boots, and its stop stress takes 0.6x the time on two (146 s against 278 s).
GUEST_CPUS = {"bookworm": 2, "trixie": 1}
# panic=-1 with qemu -no-reboot turns a guest panic into an immediate qemu exit instead of a
# hang until the timeout. mitigations=off: the guest is throw-away and TCG pays for every
# barrier. systemd.firstboot=off: the image has a machine-id, never prompt.
KERNEL_COMMAND_LINE = (
    "console=ttyS0,115200 root=/dev/vda rootfstype=ext4 rw panic=-1 mitigations=off "
    "systemd.firstboot=off"
)
# Build tools live in /usr/sbin, which a non-root PATH may lack.
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# The kernel's own words (kernel/panic.c, arch/x86/kernel/dumpstack.c, lib/bug.c).
_PANIC = re.compile(r"Kernel panic - not syncing:[^\r\n]*")
_OOPS = re.compile(r"(Oops: |BUG: |kernel BUG at )[^\r\n]*")


class VMError(Exception):
    """The guest could not be built, booted or did not report an exit code."""

    def __init__(self, message: str, console: str = "") -> None:
        super().__init__(message, console)
        self.message = message
        self.console = console

    def __str__(self) -> str:
        if not self.console:
            return self.message
        return f"{self.message}\n--- last lines of the log ---\n{_tail(self.console, 60)}"


class VMTimeout(VMError):
    """The guest did not power off in time; qemu was killed."""


class VMPanic(VMError):
    """The guest kernel panicked (qemu exits at once: panic=-1 and -no-reboot)."""


@dataclass(frozen=True)
class VMImage:
    """A built guest image: a directory holding the disk, the kernel and the initramfs."""

    directory: Path

    @property
    def suite(self) -> str:
        """The Debian release it was built from, by its directory's name (debian13-KEY)."""
        for suite, prefix in SUITES.items():
            if self.directory.name.startswith(prefix + "-"):
                return suite
        return DEFAULT_SUITE

    @property
    def disk(self) -> Path:
        """The qcow2 root disk (ext4, no partition table), always booted in snapshot mode."""
        return self.directory / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        """Debian's kernel image, booted with qemu -kernel."""
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        """The small initramfs (virtio, ext4 and 9p modules only)."""
        return self.directory / "initrd.img"

    @property
    def kernel_release(self) -> str:
        """`uname -r` of the guest kernel, e.g. '6.1.0-28-amd64'."""
        return (self.directory / "kernel-release").read_text().strip()

    def is_complete(self) -> bool:
        """Whether every file a boot needs is present."""
        return all(path.is_file() for path in (self.disk, self.kernel, self.initrd))


@dataclass(frozen=True)
class VMResult:
    """What one guest run left behind: its exit code, its output and the serial console."""

    exit_code: int
    output: str
    console: str
    share: Path
    seconds: float

    def console_tail(self, lines: int = 60) -> str:
        """The last lines of the serial console, for an assertion message."""
        return _tail(self.console, lines)

    def explain(self, lines: int = 60) -> str:
        """Exit code, output and console tail in one text, for an assertion message."""
        return (
            f"run.sh exited with {self.exit_code} after {self.seconds:.1f} s\n"
            f"--- output.log (last {lines} lines) ---\n{_tail(self.output, lines)}\n"
            f"--- guest console (last {lines} lines) ---\n{self.console_tail(lines)}"
        )


def cache_directory() -> Path:
    """Where built images are kept: $TRADEBALANCER_VM_CACHE or /var/cache/tradebalancer-vm."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def image_key(sources: Path = HERE, suite: str = DEFAULT_SUITE) -> str:
    """A hash of all the image is built from: the suite, build-image.sh, packages.txt, guest/."""
    inputs = [sources / "build-image.sh", sources / "packages.txt"]
    inputs += sorted(path for path in (sources / "guest").rglob("*") if path.is_file())
    digest = hashlib.sha256()
    digest.update(_suite_prefix(suite).encode() + b"\0")
    for path in inputs:
        digest.update(path.relative_to(sources).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def image_name(suite: str = DEFAULT_SUITE) -> str:
    """The cache directory name of the suite's image for the current inputs: debian12-KEY."""
    return f"{_suite_prefix(suite)}-{image_key(suite=suite)}"


def find_image(suite: str = DEFAULT_SUITE) -> VMImage | None:
    """The cached image of `suite` for the current build inputs, or None if not built yet."""
    image = VMImage(cache_directory() / image_name(suite))
    return image if image.is_complete() else None


def vm_available(suite: str = DEFAULT_SUITE) -> str | None:
    """None if a `suite` guest can be booted here (building its image if needed), else why not."""
    if not sys.platform.startswith("linux"):
        return f"the VM tests need Linux, not {sys.platform}"
    if shutil.which(QEMU) is None:
        return f"{QEMU} not found: apt-get install qemu-system-x86"
    if find_image(suite) is not None:
        return None
    missing = [
        tool
        for tool in ("debootstrap", "mkfs.ext4", "qemu-img", "chroot")
        if shutil.which(tool, path=_TOOL_PATH) is None
    ]
    if missing:
        return (
            f"the guest image is not built and {', '.join(missing)} not found: "
            "apt-get install debootstrap e2fsprogs qemu-utils"
        )
    if os.geteuid() != 0:
        return (
            f"the {suite} guest image is not built and building it needs root (debootstrap): "
            f"run `sudo python3 tests/vm/vm.py build --suite {suite}` once"
        )
    return None


def ensure_image(suite: str = DEFAULT_SUITE, *, echo: bool = False) -> VMImage:
    """Return the cached image of `suite`, building it first if missing or its inputs changed.

    Parallel callers wait on a lock in the cache directory, so only one builds; the build
    goes to a temporary directory renamed into place only when complete. With `echo`, the
    build log is also copied to stderr. Raises VMError if the build fails.
    """
    image = find_image(suite)
    if image is not None:
        _mark_used(image.directory)
        return image
    reason = vm_available(suite)
    if reason is not None:
        raise VMError(reason)
    cache = cache_directory()
    cache.mkdir(parents=True, exist_ok=True)
    with _locked(cache / "lock"):
        image = find_image(suite)
        if image is not None:
            return image
        _remove_leftovers(cache)
        name = image_name(suite)
        building = cache / f".build-{name}-{os.getpid()}"
        log_path = cache / f"build-{name}.log"
        started = time.monotonic()
        try:
            returncode = _run_logged(
                ["bash", str(BUILD_SCRIPT), suite, str(building)], log_path, echo
            )
            if returncode != 0:
                raise VMError(
                    f"building the guest image failed (exit {returncode}); log: {log_path}",
                    log_path.read_text(errors="replace"),
                )
            built = VMImage(building)
            if not built.is_complete():
                raise VMError(f"build-image.sh left no complete image in {building}")
            final = cache / name
            building.rename(final)
        except BaseException:
            _remove_tree(building)
            raise
        with log_path.open("a") as log:
            log.write(f"== built in {time.monotonic() - started:.0f} s\n")
        _prune(cache, keep=final, prefix=_suite_prefix(suite))
        return VMImage(final)


def qemu_command(
    image: VMImage,
    share: Path,
    *,
    memory_mb: int = 2048,
    cpus: int | None = None,
    network: bool = True,
) -> list[str]:
    """The qemu argv that boots `image` with `share` as 9p tag 'share' and the console in it;
    `cpus` defaults to its suite's GUEST_CPUS."""
    console = share / CONSOLE_NAME
    argv = [
        QEMU,
        # /dev/kvm is not usable on the test hosts; "max" gives the guest every CPU feature
        # TCG emulates (AES-NI, PCLMUL: what kernel TLS ciphers use).
        "-accel",
        "tcg",
        "-cpu",
        "max",
        "-machine",
        "q35",
        "-smp",
        str(cpus or GUEST_CPUS.get(image.suite, 2)),
        "-m",
        str(memory_mb),
        "-nodefaults",
        "-no-reboot",
        "-display",
        "none",
        "-kernel",
        str(image.kernel),
        "-initrd",
        str(image.initrd),
        "-append",
        KERNEL_COMMAND_LINE,
        "-drive",
        f"file={_escape(image.disk)},if=virtio,format=qcow2,snapshot=on",
        "-virtfs",
        f"local,path={_escape(share)},mount_tag=share,security_model=none,id=share",
        "-device",
        "virtio-rng-pci",
        "-serial",
        f"file:{_escape(console)}",
    ]
    argv += ["-nic", "user,model=virtio-net-pci"] if network else ["-nic", "none"]
    return argv


SCENARIOS = Path(__file__).resolve().parent / "scenarios"


def run_scenario(name: str, share: Path, **options: Any) -> VMResult:
    """Run scenarios/NAME in the guest as `run_in_vm` does, with scenarios/common.sh, which
    each scenario sources first, beside it in the share."""
    extra = {"common.sh": SCENARIOS / "common.sh", **options.pop("extra_files", {})}
    return run_in_vm((SCENARIOS / name).read_text(), share, extra_files=extra, **options)


def run_in_vm(
    script: str,
    share: Path,
    *,
    timeout: float = 600,
    memory_mb: int = 2048,
    cpus: int | None = None,
    network: bool = True,
    extra_files: Mapping[str, str | bytes | Path] | None = None,
    image: VMImage | None = None,
    suite: str = DEFAULT_SUITE,
) -> VMResult:
    """Boot the guest, run `script` with bash as root in /mnt/share, return what it left.

    The guest is `image` if given, else the cached image of `suite` (built if need be).

    `script` is written to `share`/run.sh; `extra_files` maps names relative to the share to
    their content (text, bytes, or a host file to copy). The guest sees the share as
    /mnt/share, may write to it, and has the network through qemu user networking
    (10.0.2.0/24, DNS 10.0.2.3) unless `network` is false. A non-zero exit code is a result,
    not an error. Raises VMTimeout if the guest has not powered off within `timeout`
    seconds (qemu is killed), VMError if it powered off without reporting an exit code;
    both carry the console tail.
    """
    image = image or ensure_image(suite)
    share = share.resolve()
    share.mkdir(parents=True, exist_ok=True)
    for name in (OUTPUT_NAME, EXIT_CODE_NAME, CONSOLE_NAME, QEMU_LOG_NAME):
        (share / name).unlink(missing_ok=True)
    for name, content in (extra_files or {}).items():
        _write_share_file(share, name, content)
    script_path = share / SCRIPT_NAME
    script_path.write_text(script)
    script_path.chmod(0o755)

    argv = qemu_command(image, share, memory_mb=memory_mb, cpus=cpus, network=network)
    started = time.monotonic()
    with (share / QEMU_LOG_NAME).open("wb") as qemu_log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=qemu_log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(),
        )
    returncode: int | None = None
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:
        _stop(process)
    seconds = time.monotonic() - started
    console = _read_text(share / CONSOLE_NAME)
    if returncode is None:
        raise VMTimeout(f"the guest did not power off within {timeout:.0f} s; qemu killed", console)
    exit_code = _read_text(share / EXIT_CODE_NAME).strip()
    if not exit_code.isdigit() and (panic := kernel_panic(console)):
        raise VMPanic(f"the guest kernel panicked after {seconds:.0f} s: {panic}", console)
    if not exit_code.isdigit():
        qemu_output = _read_text(share / QEMU_LOG_NAME).strip()
        raise VMError(
            f"the guest powered off without writing {EXIT_CODE_NAME} (qemu exit {returncode}"
            + (f": {qemu_output}" if qemu_output else "")
            + ")",
            console,
        )
    return VMResult(
        exit_code=int(exit_code),
        output=_read_text(share / OUTPUT_NAME),
        console=console,
        share=share,
        seconds=seconds,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: `build`, `run SCRIPT [--share DIR]` and `info`."""
    parser = argparse.ArgumentParser(prog="vm.py", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--suite", choices=sorted(SUITES), default=DEFAULT_SUITE, help="Debian release"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the guest image unless it is cached")
    commands.add_parser("info", help="print the cache key, the image paths and availability")
    run = commands.add_parser("run", help="boot the guest and run SCRIPT in it")
    run.add_argument("script", type=Path, help="shell script, run with bash as root")
    run.add_argument("--share", type=Path, help="9p share directory (default: a new temp dir)")
    run.add_argument("--timeout", type=float, default=600, help="seconds (default: 600)")
    run.add_argument("--memory", type=int, default=2048, help="MiB (default: 2048)")
    run.add_argument("--no-network", action="store_true", help="boot without a NIC")
    args = parser.parse_args(argv)

    if args.command == "info":
        image = find_image(args.suite)
        print(f"suite:     {args.suite}")
        print(f"cache:     {cache_directory()}")
        print(f"key:       {image_key(suite=args.suite)}")
        print(f"image:     {image.directory if image else 'not built'}")
        print(f"available: {vm_available(args.suite) or 'yes'}")
        return 0
    try:
        image = ensure_image(args.suite, echo=True)
        if args.command == "build":
            print(f"image:  {image.disk}\nkernel: {image.kernel}\ninitrd: {image.initrd}")
            return 0
        share = args.share or Path(tempfile.mkdtemp(prefix="tradebalancer-vm-"))
        result = run_in_vm(
            args.script.read_text(),
            share,
            timeout=args.timeout,
            memory_mb=args.memory,
            network=not args.no_network,
            image=image,
        )
    except VMError as exc:
        print(f"vm.py: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(result.output)
    print(
        f"vm.py: run.sh exited with {result.exit_code} in {result.seconds:.1f} s; "
        f"console: {result.share / CONSOLE_NAME}",
        file=sys.stderr,
    )
    return result.exit_code


def kernel_panic(console: str) -> str | None:
    """What the console says of a kernel panic: its first oops or BUG line and the panic line
    ("Oops: int3 ...; Kernel panic - not syncing: ..."), or None if the kernel did not panic."""
    found = _PANIC.search(console)
    if found is None:
        return None
    oops = _OOPS.search(console, 0, found.start())
    why = found.group(0).strip()
    return f"{oops.group(0).strip()}; {why}" if oops is not None else why


def _suite_prefix(suite: str) -> str:
    try:
        return SUITES[suite]
    except KeyError:
        known = ", ".join(sorted(SUITES))
        raise VMError(f"unknown Debian suite {suite!r}: the VM tests know {known}") from None


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _escape(path: Path) -> str:
    # qemu option values are comma-separated: a literal comma is written twice.
    return str(path).replace(",", ",,")


def _read_text(path: Path) -> str:
    try:
        # The serial console carries carriage returns and, rarely, non-UTF-8 bytes.
        return path.read_bytes().decode(errors="replace").replace("\r\n", "\n")
    except FileNotFoundError:
        return ""


def _write_share_file(share: Path, name: str, content: str | bytes | Path) -> None:
    target = (share / name).resolve()
    if share not in target.parents:
        raise ValueError(f"extra file {name!r} is outside the share {share}")
    target.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, Path):
        shutil.copyfile(content, target)
    elif isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)


def _die_with_parent() -> Callable[[], None]:
    # If the test process dies without reaching `finally` (SIGKILL, os._exit), qemu follows it
    # instead of running on for up to the timeout. Bound before the fork: a child may only
    # call async-signal-safe code.
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl

    def set_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return set_death_signal


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run_logged(argv: list[str], log_path: Path, echo: bool) -> int:
    """Run argv with its output in log_path (and on stderr with echo); return its status."""
    env = dict(os.environ, PATH=_TOOL_PATH, LC_ALL="C.UTF-8")
    with log_path.open("w") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            assert process.stdout is not None
            _copy_lines(process.stdout, log, sys.stderr if echo else None)
            return process.wait()
        finally:
            if process.poll() is None:
                # Interrupted (Ctrl-C, a test timeout): stop the whole build, debootstrap too;
                # SIGTERM first so build-image.sh's trap unmounts and cleans up.
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
            if process.stdout is not None:
                process.stdout.close()


def _copy_lines(source: IO[bytes], log: IO[str], echo: IO[str] | None) -> None:
    for raw in source:
        line = raw.decode(errors="replace")
        log.write(line)
        log.flush()
        if echo is not None:
            echo.write(line)
            echo.flush()


def _mark_used(directory: Path) -> None:
    # The directory's mtime records its last use, which _prune orders by.
    with contextlib.suppress(OSError):
        os.utime(directory)


def _prune(cache: Path, keep: Path, prefix: str) -> None:
    images = sorted(
        (path for path in cache.glob(f"{prefix}-*") if path.is_dir() and path != keep),
        key=lambda path: path.stat().st_mtime,
        reverse=True,
    )
    for old in images[KEEP_IMAGES - 1 :]:
        _remove_tree(old)
        (cache / f"build-{old.name}.log").unlink(missing_ok=True)
        # Logs of builds before the suite was part of the name: build-KEY.log.
        (cache / f"build-{old.name.removeprefix(prefix + '-')}.log").unlink(missing_ok=True)


def _remove_leftovers(cache: Path) -> None:
    # Builds killed outright (SIGKILL, power loss) leave their temporary directory; the lock
    # is held, so no build is running now.
    for leftover in cache.glob(".build-*"):
        _remove_tree(leftover)


def _remove_tree(path: Path) -> None:
    """Delete a build directory, unmounting first whatever a killed build left mounted in it."""
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
