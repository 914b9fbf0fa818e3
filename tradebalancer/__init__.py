"""tradebalancer: a market-data websocket feed, load-balanced by symbol over pipes to workers."""

__version__ = "0.1.0"
