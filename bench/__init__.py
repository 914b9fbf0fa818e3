"""The benchmark of tradebalancer (``make bench``) and its verifying sink worker."""
