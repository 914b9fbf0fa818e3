#!/bin/sh
# Builds the Debian package of tradebalancer: packaging/out/tradebalancer_VERSION_ARCH.deb.
#
# The source tree (the files git tracks or would track, so no .venv or build output) is copied
# to build/deb/tradebalancer-UPSTREAM/ with packaging/debian/ as its debian/, and built there
# with dpkg-buildpackage; the repository itself is never written to except packaging/out/.
# The build installs the Python dependencies from PyPI (pinned and hash-checked in
# packaging/requirements*.txt) into the package's private venv; see debian/build-venv.
#
# Environment:
#   TB_DEB_VERSION    build this Debian version instead of the changelog's (e.g. 0.1.0+test2
#                     for an upgrade test; "-1" is added when it has no Debian revision): a
#                     changelog entry is added in the build copy only
#   TB_DEB_BUILD_DIR  where to build (default: build/deb)
#   TB_DEB_OUT_DIR    where to put the .deb (default: packaging/out)
#   TB_DEB_LINTIAN    0 to skip lintian (default: run it; any error or warning fails the build)
set -eu

cd "$(dirname "$0")/.."
ROOT=$(pwd)
BUILD_DIR=${TB_DEB_BUILD_DIR:-build/deb}
OUT_DIR=${TB_DEB_OUT_DIR:-packaging/out}
case $BUILD_DIR in /*) ;; *) BUILD_DIR=$ROOT/$BUILD_DIR ;; esac
case $OUT_DIR in /*) ;; *) OUT_DIR=$ROOT/$OUT_DIR ;; esac

for tool in dpkg-buildpackage dh /usr/bin/python3; do
	command -v "$tool" >/dev/null || {
		echo "build-deb: $tool is missing: apt-get install debhelper dpkg-dev python3-venv" >&2
		exit 1
	}
done

UPSTREAM=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' tradebalancer/__init__.py)
CHANGELOG_VERSION=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
if [ "${CHANGELOG_VERSION%-*}" != "$UPSTREAM" ]; then
	echo "build-deb: packaging/debian/changelog is at $CHANGELOG_VERSION but" \
		"tradebalancer.__version__ is $UPSTREAM: add a changelog entry" >&2
	exit 1
fi
VERSION=${TB_DEB_VERSION:-$CHANGELOG_VERSION}
case $VERSION in *-*) ;; *) VERSION=$VERSION-1 ;; esac
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
		printf 'tradebalancer (%s) bookworm; urgency=medium\n\n' "$VERSION"
		printf '  * Rebuilt as %s from the %s sources.\n\n' "$VERSION" "$CHANGELOG_VERSION"
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
echo "build-deb: building tradebalancer $VERSION in $SRC (log: $BUILD_DIR/build.log)"
if ! (cd "$SRC" && dpkg-buildpackage -us -uc -b) >"$BUILD_DIR/build.log" 2>&1; then
	tail -n 40 "$BUILD_DIR/build.log" >&2
	echo "build-deb: dpkg-buildpackage failed; the whole log is $BUILD_DIR/build.log" >&2
	exit 1
fi

ARCH=$(dpkg-architecture -qDEB_HOST_ARCH)
DEB=tradebalancer_${VERSION#*:}_$ARCH.deb
cp "$BUILD_DIR/$DEB" "$OUT_DIR/$DEB"
if [ "${TB_DEB_LINTIAN:-1}" != 0 ] && command -v lintian >/dev/null; then
	lintian --fail-on error,warning "$OUT_DIR/$DEB"
fi
echo "$OUT_DIR/$DEB"
