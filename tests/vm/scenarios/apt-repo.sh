#!/bin/bash
# The apt repository scenario, run as root in the test guest by tests/test_apt_repo.py.
#
# The host serves the share's www/ over HTTP (10.0.2.2:PORT from here). www/repo is what a user
# would host; the other directories are what the repository becomes later, or what an attacker
# could serve in its place, and this script moves one into www/repo's place at each step (a
# rename in the share is a rename on the host, so the same URL serves it next):
#   www/repo           version N, signed                   (what README's lines point at)
#   www/repo-foreign   N+1, signed by another key
#   www/repo-tampered  N+1, its InRelease altered after signing
#   www/repo-unsigned  N+1, no InRelease, no Release.gpg
#   www/repo-v2        N+1 added to the repository by build-repo.sh, signed again
#
# Steps: add the key and the source exactly as README.md shows (readme-install.sh, written by
# the host from README's block), apt-get update, apt-get install tradebalancer (N), configure
# and start an instance on a replay feed; then each of the three bad repositories must be
# refused and leave N installed; then apt-get upgrade to the real N+1 restarts the instance
# with its configuration kept. Like systemd-e2e.sh, the script only records what it saw in
# results/results.env; the host-side test judges it.
#
# Parameters (scenario.env): REPO_URL, KEY.
# shellcheck source=common.sh
. /mnt/share/common.sh
www=$share/www

installed() { dpkg-query -W -f='${Version}' tradebalancer 2>/dev/null; }
candidate() { apt-cache policy tradebalancer | sed -n 's/^ *Candidate: //p'; }
config_sha() { sha256sum /etc/tradebalancer.toml | cut -d' ' -f1; }
# serve NAME: put www/NAME where www/repo is (the current one goes back to its own name).
serve() {
	mv "$www/repo" "$www/repo-$serving" && mv "$www/$1" "$www/repo" && serving=${1#repo-}
}
serving=v1

step "network"
/lib/systemd/systemd-networkd-wait-online --timeout=60 >/dev/null 2>&1
record network $?
# The image has every dependency of the package installed; Debian's own mirror would only add
# megabytes of indices to every apt-get update. This source is the only one.
mkdir -p /root/apt-sources-aside
mv /etc/apt/sources.list /etc/apt/sources.list.d/* /root/apt-sources-aside/ 2>/dev/null

step "add the repository as README.md shows"
# README's lines run as root here: sudo is not in the image.
sudo() { "$@"; }
# shellcheck source=/dev/null
(. "$share/readme-install.sh") >"$out/readme-install.log" 2>&1
record readme_status $?
record keyring "$(ls /etc/apt/keyrings/)"
cp /etc/apt/sources.list.d/tradebalancer.sources "$out/tradebalancer.sources" 2>/dev/null
record source_signed_by "$(sed -n 's/^Signed-By: //p' /etc/apt/sources.list.d/tradebalancer.sources)"
record source_suite "$(sed -n 's/^Suites: //p' /etc/apt/sources.list.d/tradebalancer.sources)"

step "apt-get update; apt-get install tradebalancer"
apt-get update >"$out/update1.log" 2>&1
record update1_status $?
record candidate1 "$(candidate)"
apt-get install -y tradebalancer >"$out/install.log" 2>&1
record install_status $?
record version1 "$(installed)"
record install_origin "$(apt-cache policy tradebalancer | grep -c "$REPO_URL")"

step "an instance on a replay feed"
"$python" -I -m tradebalancer replay --port 9443 \
	--certfile "$share/tlsca/server.pem" --keyfile "$share/tlsca/server.key" \
	--accept-key "$KEY" --source "$share/loop.jsonl" --loop --rate 500 \
	>"$out/replay.log" 2>&1 &
replay_pid=$!
wait_for 60 grep -q '^wss://' "$out/replay.log"
record replay_listening $?
cat >/etc/tradebalancer.toml <<EOF
# tradebalancer apt repository test: a replay feed on localhost, the sample workers.
[feeds.feed]
url = "wss://localhost:9443/stocks"
subscribe = ["T.*"]
ca_file = "$share/tlsca/ca.pem"
pipes = 3
workers = 1
command = ["{{ python }}", "-m", "tradebalancer.sample", "--name", "{{ feed }}-{{ worker }}"]
EOF
printf '%s\n' "$KEY" | install -m 0600 -o root /dev/stdin /etc/tradebalancer/feed.key
config=$(config_sha)
since=$(date +%s)
systemctl enable --now "$unit" >"$out/start.log" 2>&1
record start_status $?
wait_for 60 journal_has "$since" "subscription confirmed"
record streaming1 $?
pid=$(prop MainPID)
record pid1 "$pid"

# bad NAME: serve www/NAME; apt-get update must fail, and nothing may change.
bad() {
	local name=$1
	step "served: $name"
	serve "repo-$name"
	apt-get update >"$out/update-$name.log" 2>&1
	record "${name}_update_status" $?
	record "${name}_candidate" "$(candidate)"
	apt-get upgrade -y >"$out/upgrade-$name.log" 2>&1
	record "${name}_upgrade_status" $?
	record "${name}_version" "$(installed)"
}
bad foreign
bad tampered
bad unsigned

step "served: the repository updated to N+1"
serve repo-v2
apt-get update >"$out/update2.log" 2>&1
record update2_status $?
record candidate2 "$(candidate)"
since=$(date +%s)
apt-get upgrade -y >"$out/upgrade.log" 2>&1
record upgrade_status $?
record version2 "$(installed)"
wait_for 60 main_pid_is_not "$pid"
wait_for 60 active
record upgrade_active "$(systemctl is-active "$unit")"
record upgrade_enabled "$(systemctl is-enabled "$unit")"
record pid2 "$(prop MainPID)"
wait_for 60 journal_has "$since" "subscription confirmed"
record streaming2 $?
record config_kept "$([ "$(config_sha)" = "$config" ] && echo yes || echo no)"
ls /etc/tradebalancer.toml.dpkg-* 2>/dev/null >"$out/dpkg-config-files.txt"
record config_prompts "$(cat "$out/dpkg-config-files.txt")"

step "done"
systemctl stop "$unit"
kill "$replay_pid" 2>/dev/null
journalctl -u "$unit" -o cat --no-pager >"$out/journal.txt"
exit 0
