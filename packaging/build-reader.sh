#!/bin/sh
# Builds the worker library alone as a wheel: packaging/out/tradebalancer_reader-VERSION-*.whl.
#
# A worker host needs tradebalancer.reader and nothing else: no third-party package, none of
# the balancer. The wheel holds exactly tradebalancer/reader/ (tradebalancer is then a
# namespace package there, PEP 420), its C loop compiled, and depends on nothing. The balancer's
# own package (pip's tradebalancer, the .deb) carries the same files: install one or the other.
#
# The reader's files are copied into build/reader/src/tradebalancer/reader/ beside
# packaging/reader/pyproject.toml and built there; the repository is never written to except
# packaging/out/. Needs setuptools and wheel in the Python that runs it ($PYTHON, default
# python3; the project's .venv has both).
set -eu

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${PYTHON:-python3}
BUILD_DIR=${TB_READER_BUILD_DIR:-$ROOT/build/reader}
OUT_DIR=${TB_READER_OUT_DIR:-$ROOT/packaging/out}
VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' tradebalancer/__init__.py)

rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR/src/tradebalancer" "$OUT_DIR"
cp -r tradebalancer/reader "$BUILD_DIR/src/tradebalancer/reader"
find "$BUILD_DIR/src" \( -name '__pycache__' -o -name '*.so' \) -prune -exec rm -rf {} +
sed "s/@VERSION@/$VERSION/" packaging/reader/pyproject.toml >"$BUILD_DIR/pyproject.toml"
cp packaging/reader/setup.py packaging/reader/README.md "$BUILD_DIR/"
rm -f "$OUT_DIR"/tradebalancer_reader-*.whl
"$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$OUT_DIR" "$BUILD_DIR"
ls "$OUT_DIR"/tradebalancer_reader-"$VERSION"-*.whl
