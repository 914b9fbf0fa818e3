"""Keeping the API key from the workers, which run the user's code as the service's own user.

Owns what stands between a worker and the key, beyond what other modules do (plan.py gives
workers an environment without the key's variables; config.py refuses a key in the URL):

* The balancer's memory. ``seal`` clears PR_SET_DUMPABLE (prctl(2)) before the key is read:
  /proc/PID/environ (where MASSIVE_API_KEY may sit from the start), mem, maps, fd, cwd and root,
  ptrace and process_vm_readv are then refused to every process without CAP_SYS_PTRACE, the
  same user's workers included (ptrace(2), "Ptrace access mode checking"), and no core dump is
  written. The children it forks inherit the setting until their exec.
* The key file. ``Cover`` starts each worker in a user and a mount namespace of its own
  (unshare(2), between fork and exec), where an empty read-only file system covers
  $CREDENTIALS_DIRECTORY (every file there is a secret) and /dev/null the key file itself.
  The mounts exist in the worker's namespace only; after exec the worker holds no capability
  there to undo them, and in a namespace it makes itself they are locked (mount_namespaces(7)).

Why no uid_map. A process may write its own uid_map only while it is dumpable, and a child of
the sealed balancer must not become dumpable before its exec: its memory is a copy of the
balancer's, key included, and would be readable by the other workers for that moment. So the
worker's namespace maps no user: inside it, getuid() says 65534 and files show that owner, but
every access is still checked against the service's real user, and files it creates belong to
that user (README: "What the workers cannot read").

Where the kernel refuses an unprivileged user namespace (user.max_user_namespaces = 0,
kernel.unprivileged_userns_clone = 0, an AppArmor restriction, a unit with
RestrictNamespaces= that does not allow "user mnt" or a SystemCallFilter= without @mount),
``probe`` says why before any worker starts; the service then warns once and starts the workers
without it, or stops (key_isolation = "required").
"""

from __future__ import annotations

import ctypes
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import prctl

from . import signals
from .config import FeedConfig
from .errors import KeyIsolationUnavailable

__all__ = ["Cover", "cover_for", "prepare", "probe", "seal", "sealed"]

logger = logging.getLogger(__name__)

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_BIND, _MS_REC, _MS_PRIVATE = 4096, 16384, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)  # loaded here: between fork and exec it is only used


def seal() -> None:
    """Make this process's memory and /proc files unreadable to the same user's processes."""
    prctl.set_dumpable(False)


def sealed() -> bool:
    """Whether ``seal`` is in force."""
    return not prctl.get_dumpable()


@dataclass(frozen=True)
class Cover:
    """What a worker must not see: files (covered one by one) and directories (whole)."""

    files: tuple[str, ...]
    directories: tuple[str, ...]

    def apply(self) -> None:  # pragma: no cover - runs in a child, between fork and exec
        """Enter a user and mount namespace of our own and cover every path; OSError if not.

        Clears the parent-death signal (a new user namespace changes the credentials): set it
        after this.
        """
        _call(_libc.unshare, _CLONE_NEWUSER | _CLONE_NEWNS, what="unshare(CLONE_NEWUSER)")
        # the mounts below must never propagate to the service's namespace
        _mount(None, "/", None, _MS_REC | _MS_PRIVATE, None, what="mount --make-rprivate /")
        flags = _MS_RDONLY | _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
        for directory in self.directories:
            _mount(
                b"none",
                directory,
                b"tmpfs",
                flags,
                b"size=4k,mode=0",
                what=f"mount tmpfs on {directory}",
            )
        for file in self.files:
            _mount(b"/dev/null", file, None, _MS_BIND, None, what=f"mount /dev/null on {file}")
        # The namespace gave this process every capability in it, and a program with file
        # capabilities would keep them there after exec (enough to unmount the cover): no exec
        # from here on grants any privilege.
        prctl.set_no_new_privs(True)


def _mount(  # pragma: no cover - runs in a child, between fork and exec
    source: bytes | None,
    target: str,
    fstype: bytes | None,
    flags: int,
    data: bytes | None,
    *,
    what: str,
) -> None:
    """mount(2) on ``target``; OSError "WHAT: reason" if refused."""
    _call(_libc.mount, source, os.fsencode(target), fstype, flags, data, what=what)


def _call(function: Callable[..., int], *args: object, what: str) -> None:  # pragma: no cover
    if function(*args) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"{what}: {os.strerror(number)}")


def cover_for(feed: FeedConfig, environ: Mapping[str, str], key_file: str | None) -> Cover | None:
    """What to cover for the workers of ``feed``: the file the key was read from, and the
    credentials directory; None when there is nothing to cover or key_isolation is "off"."""
    if feed.key_isolation == "off":
        return None
    directories = []
    credentials = environ.get("CREDENTIALS_DIRECTORY", "")
    if credentials and os.path.isdir(credentials):
        directories.append(os.path.realpath(credentials))
    files = []
    if key_file is not None and os.path.isfile(key_file):
        real = os.path.realpath(key_file)
        if not any(real.startswith(directory + "/") for directory in directories):
            files.append(real)
    if not files and not directories:
        return None
    return Cover(tuple(files), tuple(directories))


def prepare(feed: FeedConfig, environ: Mapping[str, str], key_file: str | None) -> Cover | None:
    """The cover for ``feed``'s workers if this kernel allows it (probed), said once either
    way; None without one. Raises KeyIsolationUnavailable if it is required and refused."""
    cover = cover_for(feed, environ, key_file)
    if cover is None:
        return None
    reason = probe(cover)
    if reason is None:
        logger.info("workers start without access to %s", describe(cover))
        return cover
    message = (
        f"the workers would see {describe(cover)}: no user and mount namespace of their own "
        f"here ({reason}); allow unprivileged user namespaces (README: What the workers "
        "cannot read)"
    )
    if feed.key_isolation == "required":
        raise KeyIsolationUnavailable(f'{message}, or set key_isolation = "auto"')
    logger.warning('%s, or set key_isolation = "off" to silence this', message)
    return None


def probe(cover: Cover) -> str | None:
    """Try ``cover`` in a child that exits at once; return why it failed, or None."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    pid = signals.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            cover.apply()
        except BaseException as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else repr(exc)
            os.write(write_end, reason.encode())
            os._exit(1)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer:
        reason = answer.read().decode(errors="replace")
    os.waitpid(pid, 0)
    return reason or None


def describe(cover: Cover) -> str:
    """The covered paths, for the log."""
    return ", ".join([*cover.directories, *cover.files])
