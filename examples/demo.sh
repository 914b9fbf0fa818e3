#!/bin/sh
# Runs the replay feed and the balancer with two sample workers; Ctrl-C stops both cleanly.
set -u
PY=${PY:-python3}
"$PY" -m tradebalancer replay --port 9943 --rate 20000 --accept-key demo &
replay=$!
trap 'kill $replay 2>/dev/null; wait $replay 2>/dev/null' EXIT
trap 'exit 0' INT TERM
sleep 1
TRADEBALANCER_DEMO_KEY=demo "$PY" -m tradebalancer --config examples/demo.toml run demo
