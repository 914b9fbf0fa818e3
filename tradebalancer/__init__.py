"""tradebalancer: a market-data websocket feed, load-balanced by symbol over pipes to workers.

The architecture, one idea per module, lowest layer first (tests/test_architecture.py holds
the import graph to it: nothing imports upward, no circle):

    reader/         the worker library: the pipe format (format.py), the parser (framing.py,
                    with its C loop), Reader, a sample worker; imports nothing of the rest
    errors.py       the error tree and the exit codes; units.py sizes for humans
    routing.py      symbol -> pipe, the C original's FNV-1a mapping; which member is the key
    config.py       the TOML file -> frozen dataclasses (values.py reads and checks each
                    value); credentials.py the API key
    command.py      the worker command, an argv from jinja2 templates
    plan.py         a feed -> each worker's pipes, argv, directory and environment
    transport/      the one owner of the socket: connect without blocking, TLS, kernel TLS
    feed.py         the feed's protocol, sans-I/O: its handshake a transition table, over
                    websocket.py (the upgrade, frames.py's frames read in place, keepalive)
    split.py        a frame -> each event's exact bytes, routed (_fastsplit.c its loop in C,
                    pysplit.py the Python paths, the reference and the fallback)
    pipes.py        the pipes: sizes, one write per pipe per batch, backlogs (PipeSet)
    workers.py      spawning, reaping and respawning the worker processes
    connection.py   one connection: connector, transport and feed, and why it ended
    forward.py      messages -> events on the pipes, and backpressure
    status.py       the stats line, STATUS, READY and the watchdog; stats.py the numbers
    signals.py      signals as facts the loop reads; poller.py the loop's selector
    service.py      the one event loop that wires the parts; cli.py the command line
    replay/         a local stand-in for the feed (demos, tests, benchmarks)
"""

__version__ = "0.1.0"
