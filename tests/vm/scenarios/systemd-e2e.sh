#!/bin/bash
# The systemd end-to-end scenario, run as root in the test guest by tests/test_e2e_systemd.py.
#
# One boot, step by step: install the package, check the kernel settings, refuse a wrong API
# key, stream a replay feed over wss with kernel TLS into two verifying sink workers, stop,
# restart on a watchdog timeout, upgrade, purge. The script asserts nothing itself: it records
# what it saw as KEY=VALUE lines in results/results.env (and larger evidence as files in
# results/), and the host-side test judges each value. It goes on after a failed step so that
# one run reports every problem; a step that cannot go on says so with step_failed=NAME.
#
# Parameters come from scenario.env, written by the host beside this script in the share:
# DEB1, DEB2 (file names in the share), KEY, WRONG_KEY, EVENTS, SEED, PIPES, WORKERS,
# WATCHDOG_SEC, LOOP_RECORDING (a recording file in the share, for the endless replay).
# shellcheck source=common.sh
. /mnt/share/common.sh
state=/var/lib/private/tradebalancer/feed

clock() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(clock)" 'BEGIN { printf "%.2f", b - a }'; }
restarted_since() { [ "$(prop NRestarts)" -gt "$1" ] && main_pid_is_not "$2" && active; }
failed() { systemctl is-failed --quiet "$unit"; }
inactive_or_failed() { ! systemctl is-active --quiet "$unit" && [ "$(prop ActiveState)" != deactivating ]; }
files_exist() { for f; do [ -e "$f" ] || return 1; done; }
# status_streaming FILE: `systemctl status` shows the instance streaming at a non-zero rate
# (kept in FILE).
status_streaming() {
	systemctl status --no-pager --lines=0 "$unit" >"$1" 2>&1
	grep -q 'Status: "streaming:' "$1" && ! grep -q '; 0 ev/s' "$1"
}
# uptime_usec: CLOCK_MONOTONIC now, as systemd's *TimestampMonotonic properties count it.
uptime_usec() { awk '{ printf "%d", $1 * 1000000 }' /proc/uptime; }
# The cumulative kernel TLS counters: software (not offloaded) sessions the kernel handled.
tls_counter() { awk -v k="$1" '$1 == k { print $2 }' /proc/net/tls_stat 2>/dev/null; }

# start_replay NAME ARGS...: the replay feed on localhost:9443 in the background, with the
# test CA's server certificate; waits until it listens. Sets replay_pid.
start_replay() {
	local name=$1
	shift
	"$python" -I -m tradebalancer replay --port 9443 \
		--certfile "$share/tlsca/server.pem" --keyfile "$share/tlsca/server.key" \
		--accept-key "$KEY" "$@" >"$out/$name.log" 2>&1 &
	replay_pid=$!
	wait_for 60 grep -q '^wss://' "$out/$name.log"
}

# -- 1. install -----------------------------------------------------------------------------
step "install $DEB1"
# The kernel's settings before: the package's files, read from the package itself.
dpkg-deb -x "$share/$DEB1" /tmp/deb1
sysctl_keys=$(sed -n 's/^\([a-z][^ =]*\) *=.*/\1/p' /tmp/deb1/usr/lib/sysctl.d/60-tradebalancer.conf)
modules=$(grep -v '^#' /tmp/deb1/usr/lib/modules-load.d/tradebalancer.conf)
for key in $sysctl_keys; do record "before sysctl $key" "$(sysctl -n "$key")"; done
for module in $modules; do
	record "before module $module" "$([ -d "/sys/module/$module" ] && echo loaded || echo missing)"
done
started=$(clock)
# No apt lists in the guest: every dependency is already installed, nothing is downloaded.
# (apt wants an absolute path for a local package here: with ./NAME it fails "Pathname to
# install is not absolute".)
apt-get install -y "$share/$DEB1" >"$out/install1.log" 2>&1
record install1_status $?
record install1_seconds "$(elapsed "$started")"
record version1 "$(dpkg-query -W -f='${Version}' tradebalancer 2>/dev/null)"
# ... and after: the postinst applies them without a reboot.
for key in $sysctl_keys; do record "sysctl $key" "$(sysctl -n "$key")"; done
for module in $modules; do
	record "module $module" "$([ -d "/sys/module/$module" ] && echo loaded || echo missing)"
done
record umbrella_active "$(systemctl is-active tradebalancer.service)"
record umbrella_enabled "$(systemctl is-enabled tradebalancer.service)"
record keydir_mode "$(stat -c %a /etc/tradebalancer 2>/dev/null)"
systemd-analyze security --no-pager "$unit" >"$out/security.txt" 2>&1
record security_score "$(sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p' "$out/security.txt")"

# -- 2. configure the instance ----------------------------------------------------------------
step "configure $unit"
cat >/etc/tradebalancer.toml <<EOF
# tradebalancer end-to-end test: a replay feed on localhost, sink workers that verify.
[feeds.feed]
url = "wss://localhost:9443/stocks"
subscribe = ["T.*"]
ca_file = "$share/tlsca/ca.pem"
pipes = $PIPES
workers = $WORKERS
stats_interval = 1.0
reconnect.initial = 0.5
reconnect.max = 2.0
command = [
    "{{ python }}", "$share/sink.py", "--pipes", "{{ pipes | join(',') }}",
    "--pipe-count", "{{ pipe_count }}", "--report", "{{ workdir }}/report-{{ worker }}.json",
    "--expect-file", "$share/expect.json", "--done", "{{ workdir }}/done-{{ worker }}.json",
]
EOF
sha256sum /etc/tradebalancer.toml | cut -d' ' -f1 >"$out/config.sha256"
tradebalancer check-config feed >"$out/check-config.txt" 2>&1
record check_config_status $?

step "replay feed: $EVENTS events, seed $SEED"
start_replay replay1 --events "$EVENTS" --seed "$SEED"
record replay1_listening $?

# -- 3. a wrong key: failed, exit 77, no restart loop ------------------------------------------
step "start with a wrong key"
printf '%s\n' "$WRONG_KEY" | install -m 0600 -o root /dev/stdin /etc/tradebalancer/feed.key
systemctl start "$unit" 2>"$out/wrongkey-start.txt"
record wrongkey_start_status $?  # READY=1 never came: the start job itself fails
wait_for 60 failed
# RestartSec=5: a restart, were one coming, would have happened within this wait.
sleep 6
record wrongkey_is_failed "$(systemctl is-failed "$unit")"
record wrongkey_exec_main_status "$(prop ExecMainStatus)"
record wrongkey_result "$(prop Result)"
record wrongkey_nrestarts "$(prop NRestarts)"
systemctl reset-failed "$unit"

# -- 4. the right key: stream every event over kernel TLS -------------------------------------
step "start with the right key"
printf '%s\n' "$KEY" | install -m 0600 -o root /dev/stdin /etc/tradebalancer/feed.key
cp /proc/net/tls_stat "$out/tls_stat-before.txt" 2>/dev/null
record tls_tx_sw_before "$(tls_counter TlsTxSw)"
record tls_rx_sw_before "$(tls_counter TlsRxSw)"
since=$(date +%s)
started=$(clock)
# Type=notify: `systemctl start` returns once the balancer has sent READY=1.
systemctl start "$unit" 2>"$out/start.txt"
record start_status $?
record start_seconds "$(elapsed "$started")"
record start_active "$(systemctl is-active "$unit")"
systemctl status --no-pager --lines=0 "$unit" >"$out/status-start.txt" 2>&1
record start_status_line "$(sed -n 's/^ *Status: //p' "$out/status-start.txt")"
record start_main_pid "$(prop MainPID)"
step "wait for every event"
done_files=()
for ((worker = 0; worker < WORKERS; worker++)); do done_files+=("$state/done-$worker.json"); done
wait_for 240 files_exist "${done_files[@]}"
record stream_complete $?
record stream_seconds "$(elapsed "$started")"
# The replay feed ends its stream with a close frame once the last event is out.
wait_for 30 journal_has "$since" "the feed closed the websocket"
cp /proc/net/tls_stat "$out/tls_stat.txt" 2>/dev/null
record tls_tx_sw_after "$(tls_counter TlsTxSw)"
record tls_rx_sw_after "$(tls_counter TlsRxSw)"

# -- 5. stop: clean and quick; the workers' final reports are written -------------------------
step "stop"
rm -f "$state"/report-*.json
started=$(clock)
systemctl stop "$unit"
record stop_status $?
record stop_seconds "$(elapsed "$started")"
record stop_active "$(systemctl is-active "$unit")"
record stop_result "$(prop Result)"
record stop_exec_main_status "$(prop ExecMainStatus)"
mkdir -p "$out/reports"
cp "$state"/report-*.json "$out/reports/" 2>/dev/null
record reports "$(cd "$out/reports" && ls)"
wait "$replay_pid" 2>/dev/null

# -- 5b. the key out of the workers' reach, under the unit: a worker that snoops ---------------
step "snooping workers"
snoop_unit=tradebalancer@snoop.service
snoop_state=/var/lib/private/tradebalancer/snoop
snoop_credentials=/run/credentials/$snoop_unit
start_replay replay_snoop --source "$share/$LOOP_RECORDING" --loop --rate 2000
printf '%s\n' "$KEY" | install -m 0600 -o root /dev/stdin /etc/tradebalancer/snoop.key
cat >>/etc/tradebalancer.toml <<EOF

# The snooping workers of the e2e test (tests/snoop.py): every way to the key they can try.
[feeds.snoop]
url = "wss://localhost:9443/stocks"
ca_file = "$share/tlsca/ca.pem"
pipes = 3
workers = 2
command = ["$python", "$share/snoop.py"]
EOF
sha256sum /etc/tradebalancer.toml | cut -d' ' -f1 >"$out/config.sha256"
mkdir -p "/etc/systemd/system/$snoop_unit.d"
printf '[Service]\nEnvironment=SNOOP_REPORT=%s SNOOP_PATHS=%s\n' \
	"/var/lib/tradebalancer/snoop/snoop-{worker}.json" \
	"$snoop_credentials:$snoop_credentials/api-key:/etc/tradebalancer/snoop.key" \
	>"/etc/systemd/system/$snoop_unit.d/e2e-snoop.conf"
systemctl daemon-reload
since=$(date +%s)
systemctl start "$snoop_unit" 2>"$out/snoop-start.txt"
record snoop_start_status $?
wait_for 120 files_exist "$snoop_state/snoop-0.json" "$snoop_state/snoop-1.json"
record snoop_reported $?
systemctl stop "$snoop_unit"
record snoop_stop_status $?
mkdir -p "$out/snoop"
cp "$snoop_state"/snoop-*.json "$out/snoop/" 2>/dev/null
journalctl -u "$snoop_unit" --since "@$since" -o cat --no-pager >"$out/snoop-journal.txt"
rm -r "/etc/systemd/system/$snoop_unit.d" /etc/tradebalancer/snoop.key
systemctl daemon-reload
kill "$replay_pid" 2>/dev/null
wait "$replay_pid" 2>/dev/null

# -- 6. the watchdog: a stopped main process is killed and restarted ---------------------------
step "watchdog"
start_replay replay2 --source "$share/$LOOP_RECORDING" --loop --rate 2000
# A short watchdog, for this step only, so a wedged process is caught within seconds (the
# unit's own 30 s holds elsewhere: a busy TCG guest must not trip it by accident).
dropin=/etc/systemd/system/$unit.d
mkdir -p "$dropin"
printf '[Service]\nWatchdogSec=%s\n' "$WATCHDOG_SEC" >"$dropin/e2e-watchdog.conf"
systemctl daemon-reload
since=$(date +%s)
systemctl start "$unit"
wait_for 60 active
record watchdog_usec "$(prop WatchdogUSec)"
wait_for 60 journal_has "$since" "subscription confirmed"
record watchdog_streaming $?
# An endless stream: now `systemctl status` shows the instance streaming, at its rate, and the
# kernel holds the session's keys.
wait_for 30 status_streaming "$out/status-streaming.txt"
record streaming_status_line "$(sed -n 's/^ *Status: //p' "$out/status-streaming.txt")"
record tls_tx_sw_current "$(tls_counter TlsCurrTxSw)"
record tls_rx_sw_current "$(tls_counter TlsCurrRxSw)"
pid=$(prop MainPID)
restarts=$(prop NRestarts)
record watchdog_pid_before "$pid"
record watchdog_nrestarts_before "$restarts"
started=$(clock)
kill -STOP "$pid"
wait_for 90 restarted_since "$restarts" "$pid"
record watchdog_restarted $?
record watchdog_seconds "$(elapsed "$started")"
record watchdog_pid_after "$(prop MainPID)"
record watchdog_nrestarts_after "$(prop NRestarts)"
record watchdog_active "$(systemctl is-active "$unit")"
record watchdog_old_pid_gone "$([ -d "/proc/$pid" ] && echo no || echo yes)"
record watchdog_timeout_logged "$(journal_has "$since" "Watchdog timeout" && echo yes || echo no)"
rm -r "$dropin"
systemctl daemon-reload

# -- 6b. reload and status: subscriptions change on the live connection; a restart key is refused
step "reload"
cp /etc/tradebalancer.toml "$out/config-before-reload.toml"
pid=$(prop MainPID)
record reload_pid_before "$pid"
since=$(date +%s)
sed -i '0,/^subscribe = \["T\.\*"\]$/s//subscribe = ["T.*", "Q.AAPL"]/' /etc/tradebalancer.toml
systemctl reload "$unit" >"$out/reload.txt" 2>&1
record reload_status $?
wait_for 30 journal_has "$since" "subscription confirmed: Q.AAPL"
record reload_confirmed $?
record reload_logged "$(journal_has "$since" "reloaded: feeds.feed.subscribe [T.*] -> [T.*, Q.AAPL]" && echo yes || echo no)"
record reload_job_logged "$(journal_has "$since" "Reloaded tradebalancer" && echo yes || echo no)"
# A key that needs a restart: `systemctl reload` fails, saying which, and nothing changes.
sed -i "0,/^pipes = $PIPES\$/s//pipes = $((PIPES + 2))/" /etc/tradebalancer.toml
systemctl reload "$unit" >"$out/reload-refused.txt" 2>&1
record reload_refused_status $?
record reload_refused_logged "$(journal_has "$since" "feeds.feed.pipes ($PIPES -> $((PIPES + 2)))" && echo yes || echo no)"
record reload_active "$(systemctl is-active "$unit")"
record reload_pid_after "$(prop MainPID)"
cp "$out/config-before-reload.toml" /etc/tradebalancer.toml
# The status view, from the installed command, over the control socket.
tradebalancer status feed >"$out/status-view.txt" 2>&1
record status_view_status $?
record status_view_state "$(sed -n 's/^  state *//p' "$out/status-view.txt")"
record status_view_subscribed "$(sed -n 's/^  subscribed *//p' "$out/status-view.txt")"
record control_socket_mode "$(stat -c %a "/run/tradebalancer/feed/control" 2>&1)"

# -- 7. upgrade: the running instance is restarted on the new code -----------------------------
step "upgrade to $DEB2"
# Enabled, so that the purge has an enable link to remove.
systemctl enable "$unit" 2>"$out/enable.txt"
record instance_enabled "$(systemctl is-enabled "$unit")"
pid=$(prop MainPID)
record upgrade_pid_before "$pid"
since=$(date +%s)
upgrade_began=$(uptime_usec)
started=$(clock)
apt-get install -y "$share/$DEB2" >"$out/install2.log" 2>&1
record upgrade_status $?
record upgrade_seconds "$(elapsed "$started")"
record version2 "$(dpkg-query -W -f='${Version}' tradebalancer 2>/dev/null)"
wait_for 60 main_pid_is_not "$pid"
wait_for 60 active
record upgrade_pid_after "$(prop MainPID)"
record upgrade_active "$(systemctl is-active "$unit")"
record upgrade_main_started_after "$([ "$(prop ExecMainStartTimestampMonotonic)" -gt "$upgrade_began" ] && echo yes || echo no)"
wait_for 60 journal_has "$since" "subscription confirmed"
record upgrade_streaming $?
record upgrade_config_kept "$([ "$(sha256sum /etc/tradebalancer.toml | cut -d' ' -f1)" = "$(cat "$out/config.sha256")" ] && echo yes || echo no)"

# -- 8. purge: everything the package made is gone --------------------------------------------
step "purge"
kill "$replay_pid" 2>/dev/null
wait "$replay_pid" 2>/dev/null
# Evidence first: the journal is read while the unit still exists.
journalctl -u "$unit" -o json --no-pager >"$out/journal.json"
started=$(clock)
apt-get purge -y tradebalancer >"$out/purge.log" 2>&1
record purge_status $?
record purge_seconds "$(elapsed "$started")"
record purge_instance_active "$(systemctl is-active "$unit")"
record purge_package_state "$(dpkg-query -W -f='${db:Status-Abbrev}' tradebalancer 2>/dev/null)"
left=()
for path in /usr/lib/tradebalancer /var/lib/tradebalancer /var/lib/private/tradebalancer \
	/usr/bin/tradebalancer /etc/tradebalancer.toml /lib/systemd/system/tradebalancer.service \
	/lib/systemd/system/tradebalancer@.service /usr/lib/sysctl.d/60-tradebalancer.conf \
	/usr/lib/modules-load.d/tradebalancer.conf; do
	[ -e "$path" ] && left+=("$path")
done
record purge_left "${left[*]}"
record purge_links "$(find /etc/systemd/system -name 'tradebalancer*.service' -not -path '*.d/*' | tr '\n' ' ')"
record purge_keydir "$(ls -A /etc/tradebalancer 2>/dev/null)"
record purge_unit_files "$(systemctl list-unit-files --no-legend 'tradebalancer*' | awk '{ print $1 }')"

step "done"
journalctl -b -o short-monotonic --no-pager >"$out/journal-all.txt"
exit 0
