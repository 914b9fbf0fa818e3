"""The chaos soak (tests/chaos.py): a hostile feed, workers killed, stopped and continued, the
balancer SIGTERMed at random moments and restarted; every event accounted for.

About two minutes, bounded: TRADEBALANCER_CHAOS_SECONDS sets the playing time (the run under
way is finished after it). The seed is printed; TRADEBALANCER_CHAOS_SEED=N replays its choices
(the machine's timing still differs).
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import chaos
import pytest
from tlsca import make_ca

REPO = Path(__file__).resolve().parent.parent
SECONDS = float(os.environ.get("TRADEBALANCER_CHAOS_SECONDS", "120"))


@pytest.mark.timeout(SECONDS + 600)
def test_chaos_soak_every_event_once_in_order_or_counted(tmp_path: Path) -> None:
    """Every event sent whole while connected: recorded once, in order, or counted as not
    delivered in the final line; only a dying worker's message may go; no process left;
    every stop within 2 * drain_timeout + 5 s."""
    seed = int(os.environ.get("TRADEBALANCER_CHAOS_SEED", random.randrange(1 << 31)))
    print(f"\n  chaos seed {seed} (TRADEBALANCER_CHAOS_SEED={seed} replays it)")
    ca, cert, key = make_ca(tmp_path)
    soak_dir = tmp_path / "soak"
    soak_dir.mkdir()
    soak = chaos.run_soak(
        soak_dir,
        seed=seed,
        seconds=SECONDS,
        balancer=[sys.executable, "-m", "tradebalancer"],
        env={"PYTHONPATH": f"{REPO}:{REPO / 'tests'}"},
        certfile=str(cert),
        keyfile=str(key),
        ca_file=str(ca),
    )
    print("  " + soak.summary())
    assert not soak.problems, f"seed {seed}:\n" + "\n".join(soak.problems[:40])
    # The soak did what it claims: enough of it, and every kind of trouble at least once.
    assert soak.events_recorded > 10_000, soak.summary()
    assert len(soak.runs) >= 5, soak.summary()
    if SECONDS >= 60:
        for kind in [*chaos.ENDINGS, *chaos.STREAM, "worker-kill", "worker-stop"]:
            assert soak.actions[kind], f"seed {seed}: no {kind} in {soak.summary()}"
        assert any(run.stopped_workers for run in soak.runs), soak.summary()
