"""A worker that tries every way its uid allows to find the balancer's API key.

Run as a tradebalancer worker: it records each attempt (what it read, or the error) in the
JSON file ``SNOOP_REPORT`` names (``{worker}`` replaced by TRADEBALANCER_WORKER), then reads
its pipes to end of file like any worker. ``SNOOP_PATHS`` lists, colon-separated, the paths a
curious worker would know from the configuration or the unit (the key file, the credentials
directory). The test decides what counts as a leak; this only looks. Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import select
import sys
from collections.abc import Callable

PTRACE_ATTACH, PTRACE_SEIZE, PTRACE_DETACH = 16, 0x4206, 17
_MAPS = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (r...) ")


class _IOVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("length", ctypes.c_size_t)]


def attempt(report: dict[str, object], name: str, action: Callable[[], object]) -> None:
    try:
        report[name] = {"ok": True, "got": action()}
    except Exception as exc:
        report[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read(1 << 20).decode("latin-1")


def readable_regions(pid: int) -> list[tuple[int, int]]:
    regions = []
    for line in read(f"/proc/{pid}/maps").splitlines():
        match = _MAPS.match(line)
        if match and match[3].startswith("r") and "[vvar]" not in line:
            regions.append((int(match[1], 16), int(match[2], 16)))
    return regions


def read_memory(pid: int) -> str:
    """Every readable region of ``pid`` through /proc/PID/mem, as text to search."""
    found = []
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for start, end in readable_regions(pid):
            try:
                mem.seek(start)
                found.append(mem.read(min(end - start, 64 << 20)).decode("latin-1"))
            except OSError:
                continue
    return "".join(found)


def ptrace(request: int, pid: int) -> str:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(request, pid, None, None) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    libc.ptrace(PTRACE_DETACH, pid, None, None)
    return "attached"


def vm_read(pid: int) -> str:
    """process_vm_readv of the balancer's heap (or any address, if its maps are closed)."""
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        start, end = next(r for r in readable_regions(pid))
    except Exception:
        start, end = 0x400000, 0x401000
    size = min(end - start, 1 << 20)
    buffer = ctypes.create_string_buffer(size)
    local = _IOVec(ctypes.cast(buffer, ctypes.c_void_p), size)
    remote = _IOVec(ctypes.c_void_p(start), size)
    got = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if got < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return buffer.raw[:got].decode("latin-1")


def file_or_directory(path: str) -> object:
    if os.path.isdir(path):
        return {name: read(os.path.join(path, name)) for name in os.listdir(path)}
    return read(path)


def every_process(paths: list[str]) -> dict[str, str]:
    """What every visible process gives away: environ, cmdline, and the paths by its root."""
    found = {}
    for pid in (name for name in os.listdir("/proc") if name.isdigit()):
        for what in ("environ", "cmdline"):
            with contextlib.suppress(OSError):
                found[f"{pid}/{what}"] = read(f"/proc/{pid}/{what}")
        for path in paths:
            with contextlib.suppress(OSError):
                found[f"{pid}/root{path}"] = str(file_or_directory(f"/proc/{pid}/root{path}"))
    return found


def balancer_fds(pid: int) -> dict[str, str]:
    found = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        link = os.readlink(f"/proc/{pid}/fd/{name}")
        found[name] = link
        if not link.startswith(("pipe:", "socket:", "anon_inode:", "/dev/")):
            found[f"{name} content"] = read(f"/proc/{pid}/fd/{name}")
    return found


def main() -> int:
    balancer = os.getppid()
    paths = [p for p in os.environ.get("SNOOP_PATHS", "").split(":") if p]
    report: dict[str, object] = {"uid": os.getuid(), "balancer": balancer}
    own = dict(line.partition(":")[::2] for line in read("/proc/self/status").splitlines())
    report["no_new_privs"] = own["NoNewPrivs"].strip() == "1"  # a file capability grants none
    for path in paths:
        attempt(report, f"read {path}", lambda path=path: file_or_directory(path))
        attempt(
            report,
            f"balancer's root {path}",
            lambda path=path: file_or_directory(f"/proc/{balancer}/root{path}"),
        )
    for what in ("environ", "cmdline", "maps", "status"):
        attempt(report, f"balancer's {what}", lambda what=what: read(f"/proc/{balancer}/{what}"))
    attempt(report, "balancer's memory", lambda: read_memory(balancer))
    attempt(report, "balancer's fds", lambda: balancer_fds(balancer))
    attempt(report, "balancer's cwd", lambda: os.listdir(f"/proc/{balancer}/cwd"))
    attempt(report, "ptrace attach", lambda: ptrace(PTRACE_ATTACH, balancer))
    attempt(report, "ptrace seize", lambda: ptrace(PTRACE_SEIZE, balancer))
    attempt(report, "process_vm_readv", lambda: vm_read(balancer))
    attempt(report, "own environment", lambda: dict(os.environ))
    attempt(report, "own arguments", lambda: sys.argv)
    attempt(report, "every process", lambda: every_process(paths))
    target = os.environ["SNOOP_REPORT"].replace("{worker}", os.environ["TRADEBALANCER_WORKER"])
    with open(target + ".partial", "w") as f:
        json.dump(report, f)
    os.rename(target + ".partial", target)
    fds = [int(fd) for fd in os.environ["TRADEBALANCER_FDS"].split(",")]
    while fds:  # then a worker like any other: read to end of file
        for fd in select.select(fds, [], [])[0]:
            if not os.read(fd, 1 << 16):
                fds.remove(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
