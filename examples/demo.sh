#!/bin/sh
# Runs the replay feed and the balancer with two sample workers; Ctrl-C stops both cleanly.
#
# examples/demo.toml connects to 127.0.0.1:9943, so the balancer starts only once the replay
# feed listens there, which it says by printing its URL. If it cannot (the port is taken, by a
# demo still running say), the demo stops with the replay feed's exit code and its reason
# rather than run the balancer against nothing, or against whatever holds the port.
set -u
PY=${PY:-python3}
PORT=9943
dir=$(mktemp -d "${TMPDIR:-/tmp}/tradebalancer-demo.XXXXXX") || exit 1
mkfifo "$dir/url" || exit 1
"$PY" -m tradebalancer replay --port $PORT --rate 20000 --delay 0.02 --accept-key demo >"$dir/url" &
replay=$!
trap 'kill $replay 2>/dev/null; wait $replay 2>/dev/null; rm -rf "$dir"' EXIT
trap 'exit 0' INT TERM
# Kept open to the end: the replay feed's stdout must not become a pipe without a reader.
exec 3<"$dir/url"
if ! read -r url <&3; then # end of file: the replay feed ended without listening
	wait $replay
	status=$?
	echo "demo: the replay feed could not listen on 127.0.0.1:$PORT, where examples/demo.toml" \
		"connects (exit $status, the reason above); stop what holds the port" \
		"(ss -ltnp 'sport = $PORT' shows it) and run the demo again" >&2
	exit $status
fi
echo "demo: the replay feed serves $url" >&2
TRADEBALANCER_DEMO_KEY=demo "$PY" -m tradebalancer --config examples/demo.toml run demo
