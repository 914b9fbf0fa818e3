#!/bin/sh
# A cached Debian build root per suite, for building (and lintian-checking) the package of a
# Debian release that is not the host's:
#
#   build-root.sh path SUITE                   print the root's path, debootstrapping it first
#   build-root.sh run SUITE DIR COMMAND...     run COMMAND in the root, in /build, which is DIR
#
# SUITE is bookworm or trixie; both modes need root (debootstrap, chroot, mounts).
#
# Why a build root: the package's private venv is made with the distribution's own
# /usr/bin/python3 (3.11 in Debian 12, 3.13 in Debian 13) and links to it, and its C
# extensions are built for that Python and that distribution's libraries, so a package for
# trixie must be built on trixie. A debootstrapped chroot is the robust and fast way from a
# Debian 12 host: it runs at native speed (in the trixie VM guest the build would run under
# TCG, several times slower, and the test image would need the whole toolchain), it is made
# once in about 3 minutes and cached like the VM images, and `run` enters it read-only in a
# private mount namespace, so concurrent builds share it, none can change it, and no mount
# outlives a command whatever happens to it.
#
# The root holds minbase plus build-essential, lintian (the suite's own: a package is checked
# by the lintian of its release) and debian/control's Build-Depends. It lives in
# ${TB_BUILD_ROOT_CACHE:-/var/cache/tradebalancer-build}/SUITE-KEY, where KEY hashes the suite,
# the package list and ROOT_FORMAT: a new Build-Depends makes a new root (older ones of the
# suite are removed). TB_BUILD_ROOT_MIRROR picks another Debian mirror (not part of the key).
#
# `run` brings the host's resolver, CA bundle, pip configuration and PIP_*/proxy variables
# along, so that pip reaches the package index from the root as it does from the host; the
# command runs with HOME=/build/home, and DIR must be writable.
set -eu

# Bump when the way the root is made changes (not the package list: that is hashed itself).
ROOT_FORMAT=1

die() {
	echo "build-root.sh: $*" >&2
	exit 1
}

usage="usage: build-root.sh path SUITE | build-root.sh run SUITE DIR COMMAND..."
[ $# -ge 2 ] || die "$usage"
mode=$1
suite=$2
shift 2
case $mode in
path) [ $# -eq 0 ] || die "$usage" ;;
run) [ $# -ge 2 ] || die "$usage" ;;
*) die "$usage" ;;
esac
case $suite in
bookworm | trixie) ;;
*) die "unknown suite '$suite': the package is built for bookworm (Debian 12) and trixie (13)" ;;
esac
[ "$(id -u)" = 0 ] || die "a $suite build root needs root (debootstrap, chroot, mounts): run as root"
for tool in debootstrap chroot unshare flock sha256sum; do
	command -v "$tool" >/dev/null ||
		die "$tool not found (apt-get install debootstrap util-linux coreutils; or make deps)"
done

here=$(cd "$(dirname "$0")" && pwd)
control=$here/debian/control
cache=${TB_BUILD_ROOT_CACHE:-/var/cache/tradebalancer-build}
mirror=${TB_BUILD_ROOT_MIRROR:-http://deb.debian.org/debian}

# The Build-Depends of debian/control, without versions or alternatives (dpkg-buildpackage
# checks the versions in the root itself), and the tools of a build.
build_depends=$(sed -n '/^Build-Depends:/,/^[A-Z]/{ /^Build-Depends:/{ s/^[^:]*://; p; }; /^ /p; }' \
	"$control" | tr ',' '\n' | sed -e 's/[(|[].*//' -e 's/ //g' -e 's/^debhelper-compat$/debhelper/' |
	awk 'NF')
[ -n "$build_depends" ] || die "no Build-Depends found in $control"
packages=$(printf '%s\n' build-essential dpkg-dev debhelper lintian $build_depends | sort -u |
	paste -sd' ' -)
key=$(printf '%s\n' "$suite" "$ROOT_FORMAT" "$packages" | sha256sum | cut -c1-16)
root=$cache/$suite-$key

# make_root: debootstrap the root into a temporary directory and rename it into place.
make_root() {
	# A build killed outright leaves its directory behind: the lock is held, none runs now.
	for old in "$cache"/.building-*; do
		[ ! -e "$old" ] || rm -rf "$old"
	done
	building=$cache/.building-$suite-$key-$$
	log=$cache/$suite-$key.log
	echo "build-root.sh: debootstrapping the $suite build root (about 3 minutes, once;" \
		"log: $log)" >&2
	# minbase first, then apt installs the build tools: debootstrap's own resolver knows no
	# virtual packages, which lintian's dependencies need (perl-openssl-abi-3, ...).
	# debootstrap mounts /proc and /sys in the new root: in a private mount namespace, a killed
	# build leaves no mount behind.
	if ! unshare --mount --propagation private \
		debootstrap --variant=minbase --components=main "$suite" "$building" "$mirror" \
		>"$log" 2>&1; then
		tail -n 20 "$log" >&2
		rm -rf "$building"
		die "debootstrap of $suite from $mirror failed (log: $log): is the mirror reachable?"
	fi
	# shellcheck disable=SC2086 # $packages: one name per word
	if ! unshare --mount --propagation private sh -eu -c '
		root=$1
		shift
		mount -t proc proc "$root/proc"
		mount --rbind /dev "$root/dev"
		mount --bind /etc/resolv.conf "$root/etc/resolv.conf"
		chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 \
			DEBIAN_FRONTEND=noninteractive sh -eu -c "
			apt-get update -q
			apt-get install -y -q --no-install-recommends $*"' \
		sh "$building" $packages >>"$log" 2>&1; then
		tail -n 20 "$log" >&2
		rm -rf "$building"
		die "installing the build tools in the $suite build root failed (log: $log)"
	fi
	chroot "$building" apt-get clean
	rm -rf "$building"/var/lib/apt/lists/*
	mkdir -p "$building/build" # where `run` mounts its directory
	for old in "$cache/$suite"-*; do
		[ ! -d "$old" ] || [ "$old" = "$root" ] || rm -rf "$old" "$old.log"
	done
	mv "$building" "$root"
}

mkdir -p "$cache"
if [ ! -d "$root" ]; then
	(
		flock 9
		[ -d "$root" ] || make_root
	) 9>"$cache/lock"
fi
[ -d "$root/build" ] || die "$root is not a complete build root: remove it and try again"

if [ "$mode" = path ]; then
	echo "$root"
	exit 0
fi

dir=$(cd "$1" && pwd) || die "$1: no such directory"
shift
# The environment of the command: the host's pip and proxy settings, nothing else.
{
	env | grep -E '^(PIP_[A-Z_]+|https?_proxy|HTTPS?_PROXY|no_proxy|NO_PROXY)=' |
		grep -v -e '^PIP_CACHE_DIR=' -e '^PIP_CONFIG_FILE=' | while IFS= read -r line; do
		printf "export %s='%s'\n" "${line%%=*}" "$(printf '%s' "${line#*=}" | sed "s/'/'\\\\''/g")"
	done
	echo "export HOME=/build/home LC_ALL=C.UTF-8 PATH=/usr/sbin:/usr/bin:/sbin:/bin"
	[ -z "${PIP_CACHE_DIR:-}" ] || echo "export PIP_CACHE_DIR=/build/pip-cache"
} >"$dir/build-root.env"
# pip's configuration, site-wide and the user's, at the same places in the root.
mkdir -p "$dir/home/.config/pip"
[ ! -f /etc/pip.conf ] || cp /etc/pip.conf "$dir/home/.config/pip/pip.conf"
for file in "$HOME/.pip/pip.conf" "${XDG_CONFIG_HOME:-$HOME/.config}/pip/pip.conf"; do
	if [ -f "$file" ]; then
		cp "$file" "$dir/pip-user.conf"
		echo "export PIP_CONFIG_FILE=/build/pip-user.conf" >>"$dir/build-root.env"
	fi
done
exec unshare --mount --propagation private sh -eu -c '
	root=$1 dir=$2
	shift 2
	mount --bind "$root" "$root"
	mount -o remount,bind,ro "$root"
	mount --bind "$dir" "$root/build"
	mount -t proc proc "$root/proc"
	mount --rbind /dev "$root/dev"
	mount -t tmpfs tmpfs "$root/tmp"
	for file in /etc/resolv.conf /etc/ssl/certs/ca-certificates.crt; do
		[ ! -f "$file" ] || mount --bind "$file" "$root$file"
	done
	cd "$root/build"
	exec chroot "$root" /usr/bin/env -i /bin/sh -c \
		". /build/build-root.env && cd /build && exec \"\$@\"" sh "$@"' sh "$root" "$dir" "$@"
