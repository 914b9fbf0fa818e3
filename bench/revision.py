"""A revision of tradebalancer made ready to benchmark: its tree, its interpreter, its options.

Owns, for ``bench.ab``: checking a revision out in a temporary ``git worktree`` (removed
again by ``close``), building it with its own venv (``python -m venv``, ``pip install -e``:
that compiles its C loops into the tree), and the command line its own ``python -m bench``
understands. The working tree itself is a side too, run as it is with this interpreter.

A build is kept in ``~/.cache/tradebalancer-bench/<sha>`` (``$XDG_CACHE_HOME`` if set): the
venv, and a copy of the C extensions the editable install compiled into the tree, which are
copied into the next worktree of the same commit instead of building again. The benchmark
imports the tree's own ``tradebalancer`` (its harness puts the tree first on ``PYTHONPATH``),
so the venv only provides the dependencies and the interpreter; the editable install's link
to a worktree that is gone is never followed. Every venv is made by the interpreter running
``bench.ab``, so both sides run the same Python.

An old revision may not know an option of today's benchmark: ``options`` reads the side's
``--help`` and drops (and reports) what it does not list, and ``result_options`` asks for the
result the way that side can write it: ``--json FILE``, else ``--results DIR`` (bench.json),
else only its stdout's JSON line.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXTENSIONS = ("*.so",)  # what an editable install compiles into the tree
_OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)(?:[ =]([A-Z][A-Z0-9_=]*))?")


def cache_directory() -> Path:
    """Where builds are kept: ``$XDG_CACHE_HOME`` or ``~/.cache``, then tradebalancer-bench."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tradebalancer-bench"


class BuildError(Exception):
    """A revision could not be built; the message ends with the build's log."""


@dataclass
class Tree:
    """A source tree to benchmark and the interpreter to run its bench with."""

    label: str  # "9f2c1ab (main~3)", "working tree (ca74106+changes)"
    path: Path
    python: Path
    temporary: Path | None = None  # the directory holding a worktree this module made


def git(*arguments: str, repo: Path = REPO) -> str:
    """Run git in ``repo``; its stdout, stripped. Raises CalledProcessError on failure."""
    done = subprocess.run(
        ["git", "-C", str(repo), *arguments], capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def working_tree(repo: Path = REPO) -> Tree:
    """The tree ``bench.ab`` runs from, as it is, with the interpreter running it."""
    try:
        head = git("rev-parse", "--short", "HEAD", repo=repo)
        changed = git("status", "--porcelain", "--untracked-files=no", repo=repo)
    except (OSError, subprocess.CalledProcessError):
        head, changed = "no git", ""
    label = f"working tree ({head}{'+changes' if changed else ''})"
    return Tree(label, repo, Path(sys.executable))


def open_tree(
    rev: str, progress: Callable[[str], None], repo: Path = REPO, cache: Path | None = None
) -> Tree:
    """Check ``rev`` out in a temporary worktree and build it (or take its cached build)."""
    try:
        sha = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", repo=repo)
    except subprocess.CalledProcessError as exc:
        raise BuildError(f"{rev}: not a commit of the repository in {repo}") from exc
    short = sha[:9]
    label = short if rev.startswith(short[:7]) else f"{short} ({rev})"
    temporary = Path(tempfile.mkdtemp(prefix=f"tradebalancer-ab-{short}-"))
    path = temporary / "tree"
    try:
        try:
            git("worktree", "add", "--detach", "--quiet", str(path), sha, repo=repo)
        except subprocess.CalledProcessError as exc:
            raise BuildError(f"{label}: git worktree add failed: {exc.stderr.strip()}") from exc
        build = (cache or cache_directory()) / sha
        build.mkdir(parents=True, exist_ok=True)
        with open(build / "lock", "w") as lock:  # two A/B runs building one commit wait
            fcntl.flock(lock, fcntl.LOCK_EX)
            if (build / "complete").exists():
                progress(f"{label}: cached build in {build}")
                _restore(build / "ext", path)
            else:
                progress(f"{label}: building in {path} (venv in {build})")
                _build(path, build)
        missing = unbuilt(path)
        if missing:  # its bench would time the Python fallback and call it the revision
            raise BuildError(f"{label}: no compiled extension for {', '.join(missing)}")
        return Tree(label, path, build / "venv" / "bin" / "python", temporary)
    except BaseException:
        close(Tree(label, path, Path(), temporary), repo)
        raise


def _build(path: Path, build: Path) -> None:
    """Make ``build/venv``, install the tree into it, keep the compiled extensions."""
    shutil.rmtree(build / "venv", ignore_errors=True)
    shutil.rmtree(build / "ext", ignore_errors=True)
    base = getattr(sys, "_base_executable", None) or "python3"
    python = str(build / "venv" / "bin" / "python")
    log = build / "build.log"
    with open(log, "w") as output:
        for argv in (
            [base, "-m", "venv", str(build / "venv")],
            [python, "-m", "pip", "install", "-q", "--upgrade", "pip"],
            [python, "-m", "pip", "install", "-q", "-e", str(path)],
        ):
            done = subprocess.run(argv, stdout=output, stderr=subprocess.STDOUT, check=False)
            if done.returncode:
                tail = log.read_text(errors="replace")[-1500:]
                raise BuildError(f"{' '.join(argv)} exited {done.returncode} (log {log}):\n{tail}")
    for pattern in EXTENSIONS:
        for built in (path / "tradebalancer").rglob(pattern):
            kept = build / "ext" / built.relative_to(path)
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(built, kept)
    (build / "complete").touch()


def _restore(kept: Path, path: Path) -> None:
    """Copy the cached extensions into a fresh worktree of their commit."""
    if not kept.exists():
        return
    for built in kept.rglob("*"):
        if built.is_file():
            target = path / built.relative_to(kept)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(built, target)  # newer than the fresh checkout's sources


def unbuilt(path: Path) -> list[str]:
    """The C sources of the tree's package with no compiled extension beside them, or an older."""
    found = []
    for source in sorted((path / "tradebalancer").rglob("*.c")):
        built = list(source.parent.glob(f"{source.stem}.*.so"))
        if not built or max(b.stat().st_mtime for b in built) < source.stat().st_mtime:
            found.append(str(source.relative_to(path)))
    return found


def close(tree: Tree, repo: Path = REPO) -> None:
    """Remove the worktree ``open_tree`` made (the cached build stays); nothing for the rest."""
    if tree.temporary is None:
        return
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "remove", "--force", str(tree.path)],
        capture_output=True,
        check=False,
    )
    shutil.rmtree(tree.temporary, ignore_errors=True)
    subprocess.run(["git", "-C", str(repo), "worktree", "prune"], capture_output=True, check=False)


def known_options(help_text: str) -> dict[str, bool]:
    """The long options a ``--help`` lists, each with whether it takes a value."""
    found: dict[str, bool] = {}
    for match in _OPTION.finditer(help_text):
        name, value = match.group(1), match.group(2)
        found[name] = found.get(name, False) or value is not None
    return found


def split_options(tokens: Sequence[str], known: dict[str, bool]) -> list[list[str]]:
    """Group a command line into options, each with its value if it takes one.

    ``--name=value`` is one option; an option that ``known`` does not list takes the next
    token as its value unless that starts with ``--``.
    """
    groups: list[list[str]] = []
    index = 0
    while index < len(tokens):
        token = tokens[index]
        name = token.split("=", 1)[0]
        takes = known.get(name)
        if takes is None:
            nxt = tokens[index + 1] if index + 1 < len(tokens) else None
            takes = nxt is not None and not nxt.startswith("--")
        if "=" in token or not takes or index + 1 >= len(tokens):
            groups.append([token])
            index += 1
        else:
            groups.append([token, tokens[index + 1]])
            index += 2
    return groups


def merge(defaults: Sequence[str], given: Sequence[str], known: dict[str, bool]) -> list[str]:
    """The defaults with every option also in ``given`` replaced by the given one."""
    ours = split_options(given, known)
    names = {group[0].split("=", 1)[0] for group in ours}
    kept = [g for g in split_options(defaults, known) if g[0].split("=", 1)[0] not in names]
    return [token for group in [*kept, *ours] for token in group]


def options(tokens: Sequence[str], known: dict[str, bool]) -> tuple[list[str], list[str]]:
    """The options a side understands, and the names of those it does not (dropped)."""
    kept: list[str] = []
    dropped: list[str] = []
    for group in split_options(tokens, known):
        name = group[0].split("=", 1)[0]
        if name in known:
            kept += group
        else:
            dropped.append(name)
    return kept, dropped


def result_options(known: dict[str, bool], directory: Path) -> tuple[list[str], Path | None]:
    """Options that make a side write its result into ``directory``, and the file to read."""
    if "--json" in known:
        return ["--results", "", "--json", str(directory / "bench.json")], directory / "bench.json"
    if "--results" in known:
        return ["--results", str(directory)], directory / "bench.json"
    return [], None  # its stdout's JSON line is all there is
