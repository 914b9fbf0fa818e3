"""The package's import graph: no circle, nothing imports upward, each audience on its own.

The layers below are the architecture, lowest first; a module may import modules of its own
layer or lower, never higher, and the graph has no circle at all (TYPE_CHECKING imports
count). A new module must be given a layer here: where it goes is a design decision.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tradebalancer"

LAYERS: list[list[str]] = [
    # the worker library (its C loop), and the package's version
    [
        *("reader", "reader.format", "reader.framing", "reader.sample", "reader._fastread"),
        "reader.jetstream",
    ],
    ["tradebalancer"],
    # leaves: no logic of the service (the C router is split.py's loop)
    [
        *("errors", "units", "routing", "spans", "backoff", "systemd", "episode", "_fastsplit"),
        *("histogram", "delay", "address", "frames", "ledger"),
    ],
    [
        *("signals", "command", "stats", "handshake", "subscriptions", "transport.keys"),
        *("delivery", "websocket", "pysplit", "values"),
    ],
    ["transport.kernel"],
    # the parts, each sans-I/O or the owner of one kind of fd
    [
        "config",
        "split",
        "feed",
        "pipes",
        "transport.session",
        "transport.stream",
        "replay.synth",
        "replay.options",
    ],
    [
        "credentials",
        "plan",
        "keyguard",
        "reload",
        "transport.connector",
        "transport",
        "replay.stream",
    ],
    [
        *("workers", "connection", "forward", "status", "poller", "preflight"),
        *("replay.connection", "metrics", "control", "listener"),
    ],
    # what wires the parts
    ["service", "replay.server", "statusview"],
    ["bridge.options"],
    ["bridge.server"],
    ["bridge.publisher"],
    ["replay.cli", "replay", "sample", "bridge"],
    ["cli"],
    ["__main__", "replay.__main__", "bridge.__main__"],
]
LAYER = {name: index for index, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    """tradebalancer/transport/kernel.py -> 'transport.kernel'; the package is 'tradebalancer'."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts) or "tradebalancer"


# The C loops count as modules that import nothing.
MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))} | {
    module_name(path): path for path in sorted(PACKAGE.rglob("*.c"))
}


def package_of(name: str) -> str:
    """The package a module's relative imports start from."""
    if name == "tradebalancer" or MODULES[name].name == "__init__.py":
        return name
    return name.rpartition(".")[0] or "tradebalancer"


def resolve(base: str, relative: str) -> str:
    """Join a package and a dotted relative name inside tradebalancer ('' is the top)."""
    base = "" if base == "tradebalancer" else base
    joined = ".".join(part for part in (base, relative) if part)
    return joined or "tradebalancer"


def imports(name: str) -> tuple[set[str], set[str]]:
    """The package modules ``name`` imports, and the top-level names of everything else.

    An import in a ``try`` whose handler catches ImportError is optional and not counted
    outside (the reader's sample worker uses orjson where it is installed).
    """
    if MODULES[name].suffix == ".c":
        return set(), set()
    tree = ast.parse(MODULES[name].read_text())
    optional = {
        id(statement)
        for node in ast.walk(tree)
        if isinstance(node, ast.Try)
        and any(_catches_import_error(handler) for handler in node.handlers)
        for statement in node.body
    }
    inside: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "tradebalancer":
                    inside.add(resolve("tradebalancer", alias.name.partition(".")[2]))
                elif id(node) not in optional:
                    outside.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                module = node.module or ""
                if module.split(".")[0] != "tradebalancer":
                    if id(node) not in optional:
                        outside.add(module.split(".")[0])
                    continue
                base, relative = "tradebalancer", module.partition(".")[2]
            else:
                base = package_of(name)
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0] or "tradebalancer"
                relative = node.module or ""
            target = resolve(base, relative)
            for alias in node.names:  # "from . import x": x may be a module of its own
                candidate = resolve(target, alias.name)
                inside.add(candidate if candidate in MODULES else target)
    inside.discard(name)
    return inside, outside


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(
        isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names
    )


GRAPH = {name: imports(name)[0] for name in MODULES}


def test_every_module_has_a_layer() -> None:
    """Each module of the package is placed in the architecture (and each placed one exists)."""
    assert sorted(set(MODULES) - set(LAYER)) == []
    assert sorted(set(LAYER) - set(MODULES)) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_module_imports_a_higher_layer(name: str) -> None:
    """A module imports only modules of its own layer or lower."""
    upward = {target: LAYER[target] for target in GRAPH[name] if LAYER[target] > LAYER[name]}
    assert upward == {}, f"{name} (layer {LAYER[name]}) imports higher layers: {upward}"


def test_the_import_graph_has_no_circle() -> None:
    """No module reaches itself through its imports."""
    circles = []
    for start in GRAPH:
        stack, seen = [(start, (start,))], set()
        while stack:
            node, path = stack.pop()
            for target in GRAPH[node]:
                if target == start:
                    circles.append(" -> ".join((*path, start)))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, (*path, target)))
    assert circles == []


def test_the_worker_library_needs_nothing_but_the_standard_library() -> None:
    """tradebalancer.reader imports nothing of the daemon and no third-party package."""
    for name in MODULES:
        if name == "reader" or name.startswith("reader."):
            inside, outside = imports(name)
            assert all(target == "reader" or target.startswith("reader.") for target in inside)
            assert outside - set(sys.stdlib_module_names) - {"__future__"} == set(), name


def test_the_replay_feed_and_the_transport_keep_to_themselves() -> None:
    """replay/ imports only the error tree of the service; transport/ nothing of the feed."""
    for name in MODULES:
        if name == "replay" or name.startswith("replay."):
            foreign = {t for t in GRAPH[name] if not t.startswith("replay")} - {"errors"}
            assert foreign == set(), name
        if name == "transport" or name.startswith("transport."):
            foreign = {t for t in GRAPH[name] if not t.startswith("transport")} - {"errors"}
            assert foreign == set(), name
