"""``python -m tradebalancer.bridge``: the bridge as the balancer starts it (plan.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sys
from collections.abc import Sequence

from ..keyguard import seal
from ..ledger import Ledger
from ..reader import fds_from_environment
from .options import BridgeError, parse_options
from .publisher import Bridge

logger = logging.getLogger("tradebalancer.bridge")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bridge; the exit code: 0 when every pipe closed and all was stored."""
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    # Started without the key cover (plan.py: it reads the NATS credentials): keep the
    # workers, the same user's processes, out of its memory as the balancer keeps them.
    seal()
    options = parse_options(sys.argv[1:] if argv is None else argv)
    try:
        try:
            ledger = Ledger.from_environment(os.environ, max(options.partitions) + 1)
        except (ValueError, OSError) as exc:
            raise BridgeError(f"{exc}: the bridge must be started by the balancer") from exc
        bridge = Bridge(options, fds_from_environment(), secrets.token_hex(6), ledger)
        return asyncio.run(bridge.run_until_done())
    except BridgeError as exc:
        logger.error("%s", exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
