"""``make bench-ab AB=REV``: two revisions' figures in interleaved pairs, judged by ratios.

Owns the A/B command line and running its pairs. A is ``REV``; B is ``REV2``, or the working
tree as it is (uncommitted changes included) when there is none. Each side is a plain
``python -m bench`` run as a child, from its own tree and with its own interpreter
(``revision.py`` checks a revision out and builds it, or takes its cached build), and each pair
runs both sides one after the other, A first in odd pairs and B first in even ones
(``pairs.py``), so that neither side always gets the machine's next mood or the warmer caches.
By default a side is a short throughput run: 5 M trades, 4 and 16 pipes, the ceiling, and none
of TLS, latency, baseline, strict check or stage costs; with ``--paced``, a throughput run of
200k trades and 8 s paced at 100 k trades/s on 4 pipes, whose CPU per trade and p50 and p99
latency are paired too (``pairs.py``). Further options go to both sides' bench
and replace a default of the same name (an option a side's bench does not list in its
``--help`` is dropped for that side, and said so).

Progress and the sides' own progress go to stderr (the sides' to a log that a failure quotes);
stdout gets a line per pair and pipe count (each side's M trades/s and CPU ns per trade, the
B/A ratios), the summary (median ratios, pairs B was ahead in), then everything as one JSON
line. The worktrees it made are removed on the way out; their builds stay cached. Exit status
1 if any side failed or was not verified, 2 if a revision could not be checked out or built.

    python -m bench.ab REV [REV2] [--pairs 5] [--paced] [--cache DIR] [bench options ...]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from . import pairs, revision

DEFAULTS = (
    *("--trades", "5000000", "--repeat", "1", "--pipes", "4,16"),
    *("--no-tls", "--no-latency", "--no-baseline", "--no-strict", "--no-stages"),
    *("--results", ""),
)
# --paced: a short throughput run and one paced run at 100 k trades/s, 4 pipes, where each
# frame arrives alone and a wake-up's cost shows (CPU per trade, p50 and p99 latency).
PACED_DEFAULTS = (
    *("--trades", "200000", "--repeat", "1", "--pipes", "4"),
    *("--rates", "100000", "--latency-seconds", "8"),
    *("--no-tls", "--no-ceiling", "--no-baseline", "--no-strict", "--no-stages"),
    *("--results", ""),
)
SIDE_TIMEOUT = 3600.0  # seconds: a side that takes longer has hung


def progress(message: str) -> None:
    """One line of progress on stderr."""
    sys.stderr.write(f"[bench.ab {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stderr.flush()


def parse_arguments(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """The revisions and A/B's own options; the rest, in order, are the sides' bench options."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.ab",
        usage="python -m bench.ab REV [REV2] [--pairs N] [--paced] [--cache DIR] "
        "[bench options ...]",
        description="Interleaved A/B pairs of python -m bench: A is REV, B is REV2 or, without "
        "it, the working tree as it is.",
        epilog="Any other option goes to both sides' python -m bench, replacing the default of "
        f"the same name (defaults: {' '.join(t or repr(t) for t in DEFAULTS)}).",
        allow_abbrev=False,
    )
    parser.add_argument("--pairs", type=int, default=5, help="A/B pairs to run (default 5)")
    parser.add_argument(
        "--paced",
        action="store_true",
        help="pair paced runs too: each side runs 200k trades at full speed and 8 s at 100 k "
        f"trades/s on 4 pipes (defaults: {' '.join(t or repr(t) for t in PACED_DEFAULTS)})",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        help=f"where builds are kept (default {revision.cache_directory()})",
    )
    # Revisions first, and the parser has no positional: a bench option's value (--trades
    # 200000) must stay with its option, not be taken for a revision.
    revisions: list[str] = []
    rest = list(argv)
    while rest and not rest[0].startswith("-"):
        revisions.append(rest.pop(0))
    args, bench_options = parser.parse_known_args(rest)
    args.revisions = revisions
    if not 1 <= len(revisions) <= 2:
        parser.error("give one revision (A; B is the working tree) or two (A and B)")
    if args.pairs < 1:
        parser.error("--pairs must be at least 1")
    return args, bench_options


def side_options(python: Path, tree: Path) -> dict[str, bool]:
    """The long options of a side's ``python -m bench --help``."""
    done = subprocess.run(
        [str(python), "-m", "bench", "--help"],
        cwd=tree,
        env=side_env(tree),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    return revision.known_options(done.stdout)


def side_env(tree: Path) -> dict[str, str]:
    """The environment of a side: this one, with its tree first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    return env


def run_side(
    tree: revision.Tree, tokens: Sequence[str], known: dict[str, bool], directory: Path
) -> tuple[dict[int, pairs.Figures], str | None]:
    """Run one side's bench; its figures by pipe count, or why there are none."""
    directory.mkdir(parents=True, exist_ok=True)
    output, result_file = revision.result_options(known, directory)
    argv = [str(tree.python), "-m", "bench", *tokens, *output]
    log = directory / "bench.log"
    try:
        with open(log, "w") as stderr:
            done = subprocess.run(
                argv,
                cwd=tree.path,
                env=side_env(tree.path),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                check=False,
                timeout=SIDE_TIMEOUT,
            )
    except subprocess.TimeoutExpired:
        return {}, f"no result after {SIDE_TIMEOUT:.0f} s: {_tail(log)}"
    result = None
    if result_file is not None and result_file.exists():
        try:
            result = json.loads(result_file.read_text())
        except ValueError:
            result = None
    if result is None:
        result = pairs.parse_output(done.stdout)
    if result is None:
        return {}, f"exit {done.returncode}, no result: {_tail(log)}"
    found = pairs.figures_of(result)
    if not found:
        return {}, f"exit {done.returncode}, no throughput run in its result: {_tail(log)}"
    return found, None


def _tail(path: Path, size: int = 600) -> str:
    """The end of a side's log, on one line."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return " | ".join(text[-size:].strip().splitlines()[-4:])


def main(argv: Sequence[str] | None = None) -> int:
    """Build the sides, run the pairs, print them and their summary; 1 if any side failed."""
    args, given = parse_arguments(sys.argv[1:] if argv is None else argv)
    opened: dict[str, revision.Tree] = {}
    try:
        opened["A"] = revision.open_tree(args.revisions[0], progress, cache=args.cache)
        if len(args.revisions) == 2:
            opened["B"] = revision.open_tree(args.revisions[1], progress, cache=args.cache)
        else:
            opened["B"] = revision.working_tree()
            stale = revision.unbuilt(opened["B"].path)
            if stale:
                progress(
                    f"B: the working tree's {', '.join(stale)} is newer than its build, or not "
                    "built: pip install -e . first, or B is not what it says"
                )
        return run_pairs(args.pairs, opened, given, PACED_DEFAULTS if args.paced else DEFAULTS)
    except revision.BuildError as exc:
        progress(f"cannot run the pairs: {exc}")
        return 2
    finally:
        for tree in opened.values():
            revision.close(tree)


def run_pairs(
    count: int,
    trees: dict[str, revision.Tree],
    given: Sequence[str],
    defaults: Sequence[str] = DEFAULTS,
) -> int:
    """Run ``count`` pairs of the two trees' benches; print them; 1 if any side failed."""
    commands: dict[str, list[str]] = {}
    known: dict[str, dict[str, bool]] = {}
    for side, tree in trees.items():
        known[side] = side_options(tree.python, tree.path)
        if not known[side]:
            progress(f"{side}: its bench printed no options with --help; its options as given")
        merged = revision.merge(defaults, given, known[side])
        dropped: list[str] = []
        commands[side] = merged
        if known[side]:
            commands[side], dropped = revision.options(merged, known[side])
        if dropped:
            progress(f"{side} ({tree.label}) does not know {', '.join(dropped)}: left out")
        progress(f"{side}: {tree.label}: python -m bench {shlex.join(commands[side])}")
    sys.stdout.write(pairs.render_header({side: tree.label for side, tree in trees.items()}))
    sys.stdout.flush()
    done: list[pairs.Pair] = []
    failed = False
    with tempfile.TemporaryDirectory(prefix="tradebalancer-ab-runs-") as scratch:
        for index, sides in enumerate(pairs.order(count), start=1):
            pair = pairs.Pair(index, sides[0])
            for side in sides:
                progress(f"pair {index} of {count}: {side} ({trees[side].label})")
                directory = Path(scratch) / f"{index}-{side}"
                figures, problem = run_side(trees[side], commands[side], known[side], directory)
                pair.figures[side] = figures
                if problem is not None:
                    pair.problems[side] = problem
                failed = failed or problem is not None
                failed = failed or not all(f.verified for f in figures.values())
            done.append(pair)
            pipe_counts = sorted({p for fs in pair.figures.values() for p in fs})
            sys.stdout.write(pairs.render_pair(pair, pipe_counts))
            sys.stdout.flush()
    pipe_counts = sorted({p for pair in done for fs in pair.figures.values() for p in fs})
    summaries = [pairs.summarize(done, pipes) for pipes in pipe_counts]
    sys.stdout.write(pairs.render_summary(summaries, len(done)))
    result = pairs.to_json(done, summaries)
    result["sides"] = {side: tree.label for side, tree in trees.items()}
    result["options"] = commands
    sys.stdout.write(json.dumps(result, separators=(",", ":")) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
