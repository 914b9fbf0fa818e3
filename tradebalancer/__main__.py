"""``python -m tradebalancer``: the same as the ``tradebalancer`` command.

The signal handlers go in before the rest of the package is imported, so that a SIGTERM during
start-up is recorded and honoured, not the default action that kills the process without a
word (signals.py); ``cli.main`` gives them back for the commands that do not run the loop.
"""

import sys

from . import signals

signals.install()

from .cli import main  # noqa: E402  (after the handlers, on purpose)

sys.exit(main())
