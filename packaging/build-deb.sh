#!/bin/sh
# Builds the Debian package of tradebalancer: packaging/out/tradebalancer_VERSION_ARCH.deb,
# for Debian 12 (bookworm, the default) or Debian 13 (trixie).
#
# The source tree (the files git tracks or would track, so no .venv or build output) is copied
# to build/deb/tradebalancer-UPSTREAM/ with packaging/debian/ as its debian/, and built there
# with dpkg-buildpackage; the repository itself is never written to except packaging/out/.
# The build installs the Python dependencies from PyPI (pinned and hash-checked in
# packaging/requirements*.txt) into the package's private venv; see debian/build-venv.
#
# The venv is made with the distribution's own python3 (3.11 in 12, 3.13 in 13), so a package
# is built on the distribution it is for: on the host if the host is that distribution, else
# in a cached debootstrapped build root of it (build-root.sh says why a chroot), entered in a
# private mount namespace with the root read-only. lintian is the distribution's own too.
#
# Versions: the bookworm package has the changelog's version; the trixie one the same with
# +deb13 added (0.1.0-1+deb13), so that both can live in one apt repository and a system
# upgraded from 12 to 13 moves on to the package built for it, which sorts higher.
#
# Environment:
#   TB_DEB_DIST       bookworm (default) or trixie: the distribution to build for (make deb
#                     DIST=trixie)
#   TB_DEB_VERSION    build this Debian version instead of the changelog's (e.g. 0.1.0+test2
#                     for an upgrade test; "-1" is added when it has no Debian revision): a
#                     changelog entry is added in the build copy only
#   TB_DEB_BUILD_DIR  where to build (default: build/deb)
#   TB_DEB_OUT_DIR    where to put the .deb (default: packaging/out)
#   TB_DEB_LINTIAN    0 to skip lintian (default: run it; any error or warning fails the build)
#   TB_BUILD_ROOT_CACHE  where build-root.sh keeps its build roots
set -eu

cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD_DIR=${TB_DEB_BUILD_DIR:-build/deb}
OUT_DIR=${TB_DEB_OUT_DIR:-packaging/out}
case $BUILD_DIR in /*) ;; *) BUILD_DIR=$ROOT/$BUILD_DIR ;; esac
case $OUT_DIR in /*) ;; *) OUT_DIR=$ROOT/$OUT_DIR ;; esac

DIST=${TB_DEB_DIST:-bookworm}
case $DIST in
bookworm) DIST_SUFFIX= ;;
trixie) DIST_SUFFIX=+deb13 ;;
*)
	echo "build-deb: unknown distribution '$DIST': set TB_DEB_DIST (make deb DIST=...) to" \
		"bookworm or trixie" >&2
	exit 1
	;;
esac
HOST_DIST=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
if [ "$HOST_DIST" = "$DIST" ]; then
	for tool in dpkg-buildpackage dh /usr/bin/python3; do
		command -v "$tool" >/dev/null || {
			echo "build-deb: $tool is missing: apt-get install debhelper dpkg-dev python3-venv" >&2
			exit 1
		}
	done
fi

UPSTREAM=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' tradebalancer/__init__.py)
CHANGELOG_VERSION=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "${CHANGELOG_VERSION%-*}" != "$UPSTREAM" ]; then
	echo "build-deb: packaging/debian/changelog is at $CHANGELOG_VERSION but" \
		"tradebalancer.__version__ is $UPSTREAM: add a changelog entry" >&2
	exit 1
fi
VERSION=${TB_DEB_VERSION:-$CHANGELOG_VERSION}
case $VERSION in *-*) ;; *) VERSION=$VERSION-1 ;; esac
VERSION=$VERSION$DIST_SUFFIX
SOURCE_VERSION=${VERSION%-*}
SRC=$BUILD_DIR/tradebalancer-$SOURCE_VERSION

# A fresh copy of the source tree.
rm -rf "$BUILD_DIR"
mkdir -p "$SRC" "$OUT_DIR"
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
	git ls-files -z --cached --others --exclude-standard |
		xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh |
		tar --null -T - -cf - | tar -xf - -C "$SRC"
else
	tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./packaging/out \
		-cf - . | tar -xf - -C "$SRC"
fi
if [ ! -f "$SRC/etc/tradebalancer.toml" ]; then
	echo "build-deb: etc/tradebalancer.toml is missing (it becomes /etc/tradebalancer.toml)" >&2
	exit 1
fi
tar -C "$BUILD_DIR" -czf "$BUILD_DIR/tradebalancer_$SOURCE_VERSION.orig.tar.gz" \
	"tradebalancer-$SOURCE_VERSION"
cp -R packaging/debian "$SRC/debian"

if [ "$VERSION" != "$CHANGELOG_VERSION" ]; then
	{
		printf 'tradebalancer (%s) %s; urgency=medium\n\n' "$VERSION" "$DIST"
		printf '  * Rebuilt as %s for %s from the %s sources.\n\n' "$VERSION" "$DIST" \
			"$CHANGELOG_VERSION"
		printf ' -- %s  %s\n\n' "$(dpkg-parsechangelog -l packaging/debian/changelog -S Maintainer)" \
			"$(date -R)"
		cat packaging/debian/changelog
	} >"$SRC/debian/changelog"
fi

# The build must not see the caller's Python environment (a developer's activated venv).
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP VIRTUAL_ENV PIP_REQUIRE_VIRTUALENV PIP_TARGET PIP_USER
# Nor share pip's cache: two pip installs at once corrupt it (pypa/pip#9034), and the upgrade
# test builds two versions side by side. A fresh cache costs a few seconds of downloads.
export PIP_CACHE_DIR="$BUILD_DIR/pip-cache"

# on_build_host COMMAND...: run COMMAND where the package is built: on the host if it is of
# the distribution, else in the distribution's build root, where $BUILD_DIR is /build.
if [ "$HOST_DIST" = "$DIST" ]; then
	IN_BUILD=$BUILD_DIR
	echo "build-deb: building tradebalancer $VERSION in $SRC (log: $BUILD_DIR/build.log)"
	on_build_host() { "$@"; }
else
	sh packaging/build-root.sh path "$DIST" >/dev/null || {
		echo "build-deb: no $DIST build root (see above): a package for $DIST is built in one" \
			"on a ${HOST_DIST:-non-Debian} host" >&2
		exit 1
	}
	IN_BUILD=/build
	echo "build-deb: building tradebalancer $VERSION in $SRC, in the $DIST build root" \
		"(log: $BUILD_DIR/build.log)"
	on_build_host() { sh "$ROOT/packaging/build-root.sh" run "$DIST" "$BUILD_DIR" "$@"; }
fi
if ! on_build_host sh -c 'cd "$1" && dpkg-buildpackage -us -uc -b' sh \
	"$IN_BUILD/${SRC#"$BUILD_DIR"/}" \
	>"$BUILD_DIR/build.log" 2>&1; then
	tail -n 40 "$BUILD_DIR/build.log" >&2
	echo "build-deb: dpkg-buildpackage failed; the whole log is $BUILD_DIR/build.log" >&2
	exit 1
fi

ARCH=$(dpkg-architecture -qDEB_HOST_ARCH)
DEB=tradebalancer_${VERSION#*:}_$ARCH.deb
cp "$BUILD_DIR/$DEB" "$OUT_DIR/$DEB"
# The distribution's own lintian: the host's, or the build root's.
if [ "${TB_DEB_LINTIAN:-1}" != 0 ]; then
	if [ "$IN_BUILD" = /build ] || command -v lintian >/dev/null; then
		on_build_host lintian --fail-on error,warning "$IN_BUILD/$DEB"
	fi
fi
echo "$OUT_DIR/$DEB"
