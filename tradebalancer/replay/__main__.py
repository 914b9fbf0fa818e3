"""``python -m tradebalancer.replay``: the same as ``tradebalancer replay``."""

import sys

from .cli import main

sys.exit(main())
