#!/bin/sh
# Builds or updates a signed apt repository of tradebalancer for Debian 12 and 13:
#
#   build-repo.sh                      build the package for each distribution (build-deb.sh)
#                                      and add it
#   build-repo.sh DIST=DEB ...         add these packages (DIST: bookworm or trixie)
#
# The repository is a static directory, to be served as it is by any web server:
#
#   tradebalancer-archive-keyring.asc  the public signing key (what users put in
#                                      /etc/apt/keyrings, see README.md)
#   pool/DIST/main/t/tradebalancer/    every package ever added for DIST (older versions stay,
#                                      so a user can pin or go back)
#   dists/DIST/InRelease, Release, Release.gpg
#   dists/DIST/main/binary-amd64/Packages, Packages.gz
#
# It is made with Debian's own tools: apt-ftparchive (apt-utils) writes the indices and the
# Release files, gpg signs them (InRelease inline, Release.gpg detached, both as apt reads
# them). Each run regenerates every index from the pool and signs it again.
#
# The signing key is made on the first run (an ed25519 key, no passphrase: a repository built
# by a machine; protect the key directory instead) in its own GnuPG home, outside the
# repository and never in git: only the public key is copied into the repository.
#
# Environment:
#   TB_REPO_DIR        the repository (default: packaging/out/repo)
#   TB_REPO_KEY_DIR    the GnuPG home holding the signing key (default: packaging/out/repo-key)
#   TB_REPO_DISTS      the distributions it carries (default: "bookworm trixie")
#   TB_REPO_ORIGIN     Origin and Label of the Release files (default: tradebalancer)
set -eu

cd "$(dirname "$0")/.."
ROOT=$(pwd)
REPO=${TB_REPO_DIR:-packaging/out/repo}
KEY_DIR=${TB_REPO_KEY_DIR:-packaging/out/repo-key}
DISTS=${TB_REPO_DISTS:-bookworm trixie}
ORIGIN=${TB_REPO_ORIGIN:-tradebalancer}
KEY_NAME="tradebalancer archive signing key"
KEYRING=tradebalancer-archive-keyring.asc
case $REPO in /*) ;; *) REPO=$ROOT/$REPO ;; esac
case $KEY_DIR in /*) ;; *) KEY_DIR=$ROOT/$KEY_DIR ;; esac

die() {
	echo "build-repo: $*" >&2
	exit 1
}

for tool in apt-ftparchive gpg dpkg-deb; do
	command -v "$tool" >/dev/null || die "$tool is missing: apt-get install apt-utils gnupg dpkg"
done
case $KEY_DIR/ in
"$REPO"/*) die "the key directory $KEY_DIR is inside the repository $REPO: the secret key would be published; set TB_REPO_KEY_DIR elsewhere" ;;
esac

# add DIST DEB: copy DEB into DIST's pool.
add() {
	case " $DISTS " in
	*" $1 "*) ;;
	*) die "$2: '$1' is not a distribution of this repository ($DISTS)" ;;
	esac
	[ -f "$2" ] || die "$2: no such package"
	[ "$(dpkg-deb -f "$2" Package)" = tradebalancer ] || die "$2: not a tradebalancer package"
	pool=$REPO/pool/$1/main/t/tradebalancer
	mkdir -p "$pool"
	if [ -e "$pool/$(basename "$2")" ] && ! cmp -s "$2" "$pool/$(basename "$2")"; then
		die "$pool/$(basename "$2") is already in the repository with other contents: a" \
			"version is published once (apt would refuse the new file's hashes); build a" \
			"new version (TB_DEB_VERSION)"
	fi
	cp "$2" "$pool/"
	echo "build-repo: $1: added $(basename "$2")"
}

mkdir -p "$REPO"
if [ $# -eq 0 ]; then
	for dist in $DISTS; do
		built=$(TB_DEB_DIST=$dist TB_DEB_OUT_DIR=packaging/out/$dist sh packaging/build-deb.sh) ||
			die "building the package for $dist failed (see above)"
		printf '%s\n' "$built"
		add "$dist" "$(printf '%s\n' "$built" | tail -n 1)"
	done
else
	for arg; do
		case $arg in
		*=*) add "${arg%%=*}" "${arg#*=}" ;;
		*) die "'$arg': give packages as DIST=DEB (e.g. trixie=packaging/out/trixie/X.deb)" ;;
		esac
	done
fi

# The signing key: made once, kept in its own GnuPG home.
mkdir -p "$KEY_DIR"
chmod 0700 "$KEY_DIR"
gpg() { command gpg --homedir "$KEY_DIR" --batch --quiet "$@"; }
# gpg starts an agent for the key directory: stop it when done, whatever happens.
trap 'gpgconf --homedir "$KEY_DIR" --kill gpg-agent 2>/dev/null || true' EXIT
if ! gpg --list-secret-keys "$KEY_NAME" >/dev/null 2>&1; then
	echo "build-repo: making the signing key in $KEY_DIR (keep it: a new key means every user" \
		"fetches the new public key)"
	gpg --passphrase '' --quick-generate-key "$KEY_NAME <tradebalancer@example.org>" \
		ed25519 sign never
fi
fingerprint=$(gpg --with-colons --list-secret-keys "$KEY_NAME" | awk -F: '$1 == "fpr" { print $10; exit }')
gpg --armor --export "$fingerprint" >"$REPO/$KEYRING"

cd "$REPO"
for dist in $DISTS; do
	[ -d "pool/$dist" ] || die "no package for $dist in $REPO/pool: add one (build-repo.sh $dist=DEB)"
	index=dists/$dist/main/binary-amd64
	mkdir -p "$index"
	apt-ftparchive packages "pool/$dist" >"$index/Packages"
	gzip -9n <"$index/Packages" >"$index/Packages.gz"
	rm -f "dists/$dist/Release" "dists/$dist/InRelease" "dists/$dist/Release.gpg"
	apt-ftparchive \
		-o APT::FTPArchive::Release::Origin="$ORIGIN" \
		-o APT::FTPArchive::Release::Label="$ORIGIN" \
		-o APT::FTPArchive::Release::Suite="$dist" \
		-o APT::FTPArchive::Release::Codename="$dist" \
		-o APT::FTPArchive::Release::Architectures=amd64 \
		-o APT::FTPArchive::Release::Components=main \
		-o APT::FTPArchive::Release::Description="tradebalancer for Debian $dist" \
		release "dists/$dist" >"$REPO/Release.tmp"
	mv "$REPO/Release.tmp" "dists/$dist/Release"
	gpg --local-user "$fingerprint" --digest-algo SHA512 --clearsign \
		--output "dists/$dist/InRelease" "dists/$dist/Release"
	gpg --local-user "$fingerprint" --digest-algo SHA512 --armor --detach-sign \
		--output "dists/$dist/Release.gpg" "dists/$dist/Release"
	echo "build-repo: $dist: $(grep -c '^Package:' "$index/Packages") package(s), signed by $fingerprint"
done
echo "$REPO"
