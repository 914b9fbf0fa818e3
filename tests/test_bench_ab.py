"""bench/pairs.py and bench/revision.py: A/B pairs of benchmark runs, on numbers made up here.

The order of the pairs, the B/A ratios and their summary are fed synthetic results in the
shape ``bench/report.py`` gives them; the sides' command lines are built from a ``--help``
written here. One real smoke run of ``python -m bench.ab`` (HEAD against the working tree,
one short pair) closes the module. bench/ is no package of the project: its modules are
loaded from their files.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def load(name: str) -> ModuleType:
    """bench/<name>.py as a module of its own."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


pairs = load("pairs")
revision = load("revision")


def result(by_pipes: dict[int, tuple[float, float]], verified: bool = True) -> dict[str, Any]:
    """A bench result with a ws run per pipe count: (trades/s, CPU ns per trade), and wss-16."""
    configurations = [
        {
            "name": f"ws-{pipes}",
            "pipes": pipes,
            "tls": False,
            "trades_per_s": rate,
            "balancer_cpu_ns_per_trade": cpu,
            "verified": verified,
        }
        for pipes, (rate, cpu) in by_pipes.items()
    ]
    configurations.append(
        {"name": "wss-16", "pipes": 16, "tls": True, "trades_per_s": 1.0, "verified": True}
    )
    return {"bench": "tradebalancer", "configurations": configurations, "ratios": {}}


def pair(index: int, a: dict[int, tuple[float, float]], b: dict[int, tuple[float, float]]) -> Any:
    """A finished pair with A's and B's figures."""
    done = pairs.Pair(index, pairs.order(index)[-1][0])
    done.figures = {"A": pairs.figures_of(result(a)), "B": pairs.figures_of(result(b))}
    return done


def test_the_sides_alternate_which_goes_first() -> None:
    """Pairs run A B, B A, A B, ...: each side goes first in half of an even number of pairs."""
    assert pairs.order(5) == [("A", "B"), ("B", "A"), ("A", "B"), ("B", "A"), ("A", "B")]
    firsts = [first for first, _ in pairs.order(6)]
    assert firsts.count("A") == firsts.count("B") == 3


def test_figures_are_the_plain_ws_runs_by_pipe_count() -> None:
    """A result's ws runs give each pipe count's trades/s and CPU; wss runs are left out."""
    found = pairs.figures_of(result({4: (3.8e6, 235.0), 16: (3.5e6, 246.0)}))
    assert found == {
        4: pairs.Figures(3.8e6, 235.0, True),
        16: pairs.Figures(3.5e6, 246.0, True),
    }


def test_the_ratio_is_b_over_a_within_the_pair() -> None:
    """A pair's ratios are B's figure over A's, for trades/s and for CPU per trade alike."""
    done = pair(1, {4: (4e6, 200.0)}, {4: (5e6, 150.0)})
    assert done.ratio(4, "trades_per_s") == pytest.approx(1.25)
    assert done.ratio(4, "cpu_ns_per_trade") == pytest.approx(0.75)
    assert done.ratio(16, "trades_per_s") is None


def test_a_side_not_verified_gives_no_ratio() -> None:
    """Figures of a run whose sinks found a difference are not compared."""
    done = pairs.Pair(1, "A")
    done.figures = {
        "A": pairs.figures_of(result({4: (4e6, 200.0)})),
        "B": pairs.figures_of(result({4: (9e6, 100.0)}, verified=False)),
    }
    assert done.ratio(4, "trades_per_s") is None
    assert pairs.summarize([done], 4).pairs == 0


def test_the_summary_is_the_median_ratio_and_the_pairs_b_was_ahead_in() -> None:
    """Over five pairs: the median of the B/A ratios and how many pairs B won, per figure."""
    rates = [(4.0, 4.4), (4.2, 4.0), (3.0, 3.3), (4.1, 4.5), (3.9, 3.9)]  # M trades/s, A then B
    cpus = [(200, 180), (190, 200), (250, 240), (200, 190), (210, 210)]  # ns per trade
    done = [
        pair(i, {16: (ra * 1e6, ca)}, {16: (rb * 1e6, cb)})
        for i, ((ra, rb), (ca, cb)) in enumerate(zip(rates, cpus, strict=True), start=1)
    ]
    summary = pairs.summarize(done, 16)
    assert summary.pairs == 5
    # Of 1.1, 0.952, 1.1, 1.098 and 1.0; of 0.9, 1.053, 0.96, 0.95 and 1.0.
    assert summary.trades_per_s_ratio == pytest.approx(4.5 / 4.1)
    assert summary.cpu_ratio == pytest.approx(0.96)
    assert (summary.b_faster, summary.b_cheaper) == (3, 3)  # a tie is no win


def test_a_failed_side_is_shown_and_left_out_of_the_summary() -> None:
    """A side without figures prints as failed with its reason; the other pairs still count."""
    good = pair(1, {4: (4e6, 200.0)}, {4: (4.4e6, 190.0)})
    bad = pairs.Pair(2, "B", {"A": pairs.figures_of(result({4: (4e6, 200.0)})), "B": {}})
    bad.problems["B"] = "exit 2, no result: error: unrecognized arguments"
    text = pairs.render_pair(bad, [4])
    assert "failed" in text and "B failed: exit 2" in text
    summary = pairs.summarize([good, bad], 4)
    assert summary.pairs == 1
    assert summary.trades_per_s_ratio == pytest.approx(1.1)


def test_the_pair_line_and_summary_show_each_side_and_the_ratios() -> None:
    """A pair's line has both sides' M trades/s and ns/trade, then B/A; the summary counts."""
    done = pair(1, {4: (4e6, 200.0)}, {4: (5e6, 150.0)})
    line = pairs.render_pair(done, [4]).splitlines()[0]
    assert line.split() == [
        *("1", "A", "4"),
        *("4.00", "M/s", "200", "ns"),
        *("5.00", "M/s", "150", "ns"),
        *("1.250", "0.750"),
    ]
    summary = pairs.render_summary([pairs.summarize([done], 4)], 1)
    assert "trades/s median 1.250, B faster in 1 of 1" in summary
    assert "CPU per trade median 0.750, B cheaper in 1 of 1" in summary
    assert "A: main~1" in pairs.render_header({"A": "main~1", "B": "working tree"})


def test_the_result_is_read_from_the_last_json_line_of_stdout() -> None:
    """An old side without --results or --json is read from the JSON line its tables end with."""
    stdout = "table\n{not json\n" + json.dumps(result({4: (4e6, 200.0)})) + "\ntargets table\n"
    parsed = pairs.parse_output(stdout)
    assert parsed is not None and pairs.figures_of(parsed)[4].trades_per_s == 4e6
    assert pairs.parse_output('table\n{"other": 1}\n') is None


def test_everything_goes_into_one_json_document() -> None:
    """to_json holds every pair's figures and the summary, and json can write it."""
    done = [pair(1, {4: (4e6, 200.0)}, {4: (5e6, 150.0)})]
    document = json.loads(json.dumps(pairs.to_json(done, [pairs.summarize(done, 4)])))
    assert document["pairs"][0]["figures"]["B"]["4"]["trades_per_s"] == 5e6
    assert document["summary"][0]["b_faster"] == 1


def paced_result(cpu: float, paced: dict[str, tuple[float, float, float]]) -> dict[str, Any]:
    """A result of ``bench.ab --paced``: ws-4, and its paced runs: rate -> (ns, p50, p99)."""
    document = result({4: (4e6, cpu)})
    document["configurations"][0]["latency"] = {
        label: {
            "rate": float(label.removesuffix("k")) * 1000,
            "balancer_cpu_ns_per_trade": ns,
            "p50_us": p50,
            "p99_us": p99,
            "verified": True,
        }
        for label, (ns, p50, p99) in paced.items()
    }
    return document


def test_paced_runs_are_paired_at_their_lowest_rate() -> None:
    """With paced runs, a pair has a second line (CPU, p50, p99 and B/A), and the summary
    their medians; the lowest rate is the one taken."""
    a = pairs.figures_of(
        paced_result(200.0, {"1000k": (300.0, 1.0, 2.0), "100k": (500.0, 200, 400)})
    )
    assert (a[4].paced_rate, a[4].paced_cpu_ns_per_trade, a[4].p50_us) == ("100k", 500.0, 200)
    done = []
    for index, (ns, p50) in enumerate([(450.0, 180.0), (520.0, 190.0), (400.0, 210.0)], 1):
        b = pairs.figures_of(paced_result(200.0, {"100k": (ns, p50, 380.0)}))
        done.append(pairs.Pair(index, "A", {"A": a, "B": b}))
    line = pairs.render_pair(done[0], [4]).splitlines()[1]
    assert line.split() == [
        *("paced", "100k", "500", "ns", "200/400", "us"),
        *("100k", "450", "ns", "180/380", "us"),
        *("B/A", "CPU", "0.900", "p50", "0.900", "p99", "0.950"),
    ]
    summary = pairs.summarize(done, 4)
    assert summary.paced_cpu_ratio == pytest.approx(0.9)  # of 0.9, 1.04 and 0.8
    assert summary.b_cheaper_paced == 2
    assert (summary.p50_ratio, summary.p99_ratio) == (pytest.approx(0.95), pytest.approx(0.95))
    text = pairs.render_summary([summary], 3)
    assert "4 pipes, paced: CPU per trade median 0.900, B cheaper in 2 of 3" in text
    assert "paced" not in pairs.render_pair(pair(1, {4: (4e6, 2.0)}, {4: (4e6, 2.0)}), [4])
    # A paced run not verified loses its own ratios, not the throughput run's.
    unverified = paced_result(200.0, {"100k": (400.0, 180.0, 380.0)})
    unverified["configurations"][0]["latency"]["100k"]["verified"] = False
    bad = pairs.Pair(4, "B", {"A": a, "B": pairs.figures_of(unverified)})
    assert bad.ratio(4, "cpu_ns_per_trade") == 1.0
    assert bad.ratio(4, pairs.PACED_CPU) is None and bad.ratio(4, "p99_us") is None
    assert "(NOT verified)" in pairs.render_pair(bad, [4])
    summary = pairs.summarize([*done, bad], 4)
    assert (summary.pairs, summary.paced_pairs) == (4, 3)


HELP = """usage: python -m bench [-h] [--quick] [--repeat REPEAT] [--trades TRADES]
options:
  --quick               a smoke run: 200k trades, 1 repeat, short paces
  --repeat REPEAT       repeats of every run (default 3; quick 1)
  --trades TRADES       trades per throughput run (default 5,000,000)
  --pipes PIPES         pipe counts, comma-separated (default 4,16)
  --no-tls              skip the wss runs
  --no-latency          skip the paced runs
  --balancer-option KEY=VALUE
                        a line for the balancer's [feeds.bench] table
  --results DIR         write the result as bench.json (default bench-results; '' for neither)
"""


def test_a_help_text_gives_the_options_and_which_take_a_value() -> None:
    """--help's option list says each long option's name and whether a value follows."""
    known = revision.known_options(HELP)
    assert known["--quick"] is False and known["--no-tls"] is False
    assert known["--trades"] is True and known["--balancer-option"] is True
    assert known["--results"] is True
    assert "--json" not in known


def test_given_options_replace_the_defaults_of_the_same_name() -> None:
    """--trades given replaces the default --trades; the defaults' flags and values stay."""
    known = revision.known_options(HELP)
    defaults = ["--trades", "5000000", "--pipes", "4,16", "--no-tls", "--results", ""]
    merged = revision.merge(defaults, ["--trades", "200000", "--pipes=4", "--quick"], known)
    assert merged == ["--no-tls", "--results", "", "--trades", "200000", "--pipes=4", "--quick"]


def test_an_option_a_side_does_not_know_is_left_out_with_its_value() -> None:
    """An old side gets only what its --help lists; what it lacks is named, value and all."""
    known = revision.known_options(HELP)
    tokens = ["--trades", "200000", "--no-stages", "--json", "out.json", "--no-tls"]
    kept, dropped = revision.options(tokens, known)
    assert kept == ["--trades", "200000", "--no-tls"]
    assert dropped == ["--no-stages", "--json"]


def test_a_side_writes_its_result_the_newest_way_it_knows(tmp_path: Path) -> None:
    """--json FILE if the side has it, else --results DIR's bench.json, else its stdout."""
    known = revision.known_options(HELP)
    assert revision.result_options(known, tmp_path) == (
        ["--results", str(tmp_path)],
        tmp_path / "bench.json",
    )
    known["--json"] = True
    options, path = revision.result_options(known, tmp_path)
    assert options[-2:] == ["--json", str(tmp_path / "bench.json")] and path is not None
    assert revision.result_options({"--trades": True}, tmp_path) == ([], None)


def test_a_c_source_without_its_extension_is_reported(tmp_path: Path) -> None:
    """unbuilt names each C source of the package that has no compiled extension beside it."""
    package = tmp_path / "tradebalancer"
    (package / "reader").mkdir(parents=True)
    (package / "_fastsplit.c").write_text("")
    (package / "_fastsplit.cpython-311-x86_64-linux-gnu.so").write_text("")
    (package / "reader" / "_fastread.c").write_text("")
    assert revision.unbuilt(tmp_path) == ["tradebalancer/reader/_fastread.c"]


def _in_git() -> bool:
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, check=False
    )
    return done.returncode == 0


def run_ab(*options: str) -> subprocess.CompletedProcess[str]:
    """One pair of ``python -m bench.ab HEAD`` against the working tree; it must succeed."""
    done = subprocess.run(
        [sys.executable, "-m", "bench.ab", "HEAD", "--pairs", "1", *options],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=280,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.skipif(not _in_git(), reason="needs the source tree's git repository")
@pytest.mark.timeout(300)  # the first run builds HEAD's venv; later ones take it from the cache
def test_a_real_pair_of_head_against_the_working_tree() -> None:
    """bench.ab builds HEAD, runs one short pair against the working tree, removes its tree."""
    done = run_ab("--trades", "200000", "--pipes", "4", "--pool", "200000", "--no-ceiling")
    lines = done.stdout.splitlines()
    row = next(line for line in lines if line.split()[:3] == ["1", "A", "4"])
    assert row.count("M/s") == 2
    assert "4 pipes: trades/s median" in done.stdout
    document = json.loads(lines[-1])
    assert document["summary"][0]["pairs"] == 1
    after = subprocess.run(
        ["git", "-C", str(REPO), "worktree", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert "tradebalancer-ab-" not in after


@pytest.mark.skipif(not _in_git(), reason="needs the source tree's git repository")
@pytest.mark.timeout(300)
def test_a_real_paced_pair_of_head_against_the_working_tree() -> None:
    """bench.ab --paced pairs a paced run too: each side's CPU per trade and latency, B/A."""
    done = run_ab("--paced", "--trades", "100000", "--pool", "200000", "--latency-seconds", "1")
    assert "--no-latency" not in done.stderr and "--rates 100000" in done.stderr
    paced = next(line for line in done.stdout.splitlines() if line.split()[:2] == ["paced", "100k"])
    assert paced.count(" us") == 2 and "B/A CPU" in paced and "p99" in paced
    assert "4 pipes, paced: CPU per trade median" in done.stdout
    document = json.loads(done.stdout.splitlines()[-1])
    assert document["summary"][0]["paced_cpu_ratio"] is not None
