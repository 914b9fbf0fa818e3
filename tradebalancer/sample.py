"""``python -m tradebalancer.sample``: the sample worker, which lives in the worker library.

Kept under this name for the commands and demos that use it; ``tradebalancer.reader.sample``
is the same worker on a host where only the reader is installed.
"""

import sys

from .reader.sample import main

if __name__ == "__main__":
    sys.exit(main())
