#!/bin/bash
# What every scenario starts with, sourced first by each (the test copies it into the share
# beside run.sh): the share's paths, the parameters the host wrote (scenario.env), and the
# helpers that record results and wait on the instance. Scenarios assert nothing themselves:
# they record KEY=VALUE lines in results/results.env, evidence files in results/, and the
# host-side test judges them.
set -u
share=/mnt/share
out=$share/results
unit=tradebalancer@feed.service
python=/usr/lib/tradebalancer/venv/bin/python3
mkdir -p "$out"
: >"$out/results.env"
# shellcheck source=/dev/null
. "$share/scenario.env"
export DEBIAN_FRONTEND=noninteractive SYSTEMD_PAGER=cat LC_ALL=C.UTF-8

# record KEY VALUE: one result line; the value is folded onto one line.
record() {
	printf '%s=%s\n' "$1" "$(printf '%s' "$2" | tr '\n' ' ')" >>"$out/results.env"
}
step() { echo "== $(date +%T.%3N) $*"; }
# wait_for SECONDS COMMAND...: run COMMAND every 0.25 s until it succeeds; 1 on timeout.
wait_for() {
	local deadline=$(($(date +%s) + $1))
	shift
	until "$@"; do
		[ "$(date +%s)" -lt "$deadline" ] || return 1
		sleep 0.25
	done
}
prop() { systemctl show -P "$1" "$unit"; }
active() { systemctl is-active --quiet "$unit"; }
main_pid_is_not() { [ "$(prop MainPID)" != "$1" ] && [ "$(prop MainPID)" != 0 ]; }
# journal_has SINCE TEXT: the instance logged TEXT since the epoch second SINCE.
journal_has() { journalctl -u "$unit" --since "@$1" -o cat --no-pager | grep -qF "$2"; }
