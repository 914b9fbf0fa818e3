"""``python -m tradebalancer``: the same as the ``tradebalancer`` command."""

import sys

from .cli import main

sys.exit(main())
