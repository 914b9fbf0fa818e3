"""The JetStream bridge: a built-in worker that publishes its pipes' events to NATS JetStream.

The balancer spawns it like any worker, over the pipes ``[feeds.NAME.jetstream]`` names, and
it is the package's own code (plan.py: trusted, started without the key cover). Its parts:

    options.py    its command line (plan.py renders it), BridgeError and the exit codes
    server.py     connecting (retried, said once), the stream created or checked, a subject's
                  last message
    publisher.py  the loop: pipes read into per-partition outboxes, batches cut and published
                  one in flight per partition, a predecessor's loss counted (ledger.py)
    __main__.py   ``python -m tradebalancer.bridge``

It imports the reader and the ledger, nothing else of the daemon but the key cover's seal.
"""

from .options import BridgeError, BridgeOptions, parse_options
from .publisher import Bridge, Outbox

__all__ = ["Bridge", "BridgeError", "BridgeOptions", "Outbox", "parse_options"]
