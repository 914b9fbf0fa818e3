"""SIGTERM at random moments of the balancer's life, over two hundred times: always honoured.

The trials (tests/stopstress.py) aim at every phase: start-up and worker spawn, a TCP connect
that hangs, the TLS handshake and what follows it (the kernel TLS hand-off; user space here,
for real in the Debian guest: tests/test_ktls_vm.py), the websocket upgrade, the greeting,
auth, the subscription, streaming, the reconnect backoff against a feed that is gone, workers
that die and are respawned, and stats ticks every 20 ms. Each trial checks exit 0 within 2 s of
the signal, "SIGTERM received: stopping" in the log, and every worker gone. The seed is
printed; TRADEBALANCER_STRESS_SEED=N replays a run's choices.
"""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import stopstress
from tlsca import make_ca

REPO = Path(__file__).resolve().parent.parent
TRIALS_PER_SCENARIO = 18  # x 12 scenarios = 216 SIGTERMs
BOUND = 2.0  # seconds from the SIGTERM to the exit


@pytest.mark.timeout(900)
def test_sigterm_at_random_moments_is_always_honoured(tmp_path: Path) -> None:
    """Over 200 SIGTERMs at random moments of every phase: exit 0 in 2 s, logged, no worker left."""
    seed = int(os.environ.get("TRADEBALANCER_STRESS_SEED", random.randrange(1 << 31)))
    ca, cert, key = make_ca(tmp_path)
    setup = stopstress.Setup(
        balancer=[sys.executable, "-m", "tradebalancer"],
        certfile=str(cert),
        keyfile=str(key),
        ca_file=str(ca),
        env={"PYTHONPATH": str(REPO)},
    )
    counts = dict.fromkeys(stopstress.SCENARIOS, TRIALS_PER_SCENARIO)
    outcomes = stopstress.run_trials(setup, counts, seed=seed)
    report = stopstress.summary(outcomes, BOUND)
    print(f"\n  seed {seed}: {len(outcomes)} SIGTERMs")
    for name, row in sorted(report["scenarios"].items()):  # type: ignore[attr-defined]
        print(f"  {name:14} {row}")
    failures = report["failures"]
    assert not failures, f"seed {seed}:\n" + json.dumps(failures, indent=1)[:20000]
    assert len(outcomes) >= 200
    # The start-up window before the handlers are in is hit now and then, never more.
    early = sum(outcome.early for outcome in outcomes)
    assert early <= TRIALS_PER_SCENARIO, early
