# tradebalancer: `make demo` and `make test` do all the set-up on a fresh Debian 12 machine.

PYTHON ?= python3
# The Debian release `make deb` builds for: bookworm (Debian 12) or trixie (Debian 13).
DIST ?= bookworm
VENV := .venv
PY := $(VENV)/bin/python
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Debian packages the build, the tests and the VM test need (installed once, only if missing).
# xz-utils unpacks Debian 13's kernel modules for the VM image; apt-utils (apt-ftparchive),
# gnupg and gpgv make and check the signed apt repository.
# prometheus: tests/test_prometheus.py runs its own server and promtool on a private port and
# directory; the system service the package may start is never used.
APT_PACKAGES := python3 python3-venv python3-dev gcc libcap-dev \
	qemu-system-x86 qemu-utils debootstrap xz-utils \
	debhelper dpkg-dev fakeroot lintian openssl ca-certificates systemd e2fsprogs debian-archive-keyring \
	apt-utils gnupg gpgv prometheus

.PHONY: all deps venv demo test check lint typecheck unit e2e bench bench-ab deb repo reader-wheel clean

all: test

deps: $(VENV)/.deps-stamp
# Checked again when this file changes (a package added to APT_PACKAGES).
$(VENV)/.deps-stamp: Makefile
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages: $$missing"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing; \
	fi
	@mkdir -p $(VENV) && touch $@

venv: $(VENV)/.venv-stamp
# The editable install also builds the C loops (setup.py); a change to them reinstalls.
$(VENV)/.venv-stamp: pyproject.toml setup.py tradebalancer/_fastsplit.c tradebalancer/reader/_fastread.c \
		| $(VENV)/.deps-stamp
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# Coverage follows the balancer and its workers into their own processes.
	echo 'import coverage; coverage.process_startup()' > \
		"$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/tradebalancer-coverage.pth"
	@touch $@

demo: venv
	@PY=$(PY) sh examples/demo.sh

lint: venv
	$(VENV)/bin/ruff format --check tradebalancer tests
	$(VENV)/bin/ruff check tradebalancer tests

typecheck: venv
	$(VENV)/bin/mypy --strict tradebalancer

# Every test, the VM test included; coverage with branches over the package.
test: venv lint typecheck
	rm -f .coverage .coverage.*
	COVERAGE_PROCESS_START=$(CURDIR)/pyproject.toml $(VENV)/bin/coverage run -m pytest $(PYTEST_ARGS)
	$(VENV)/bin/coverage combine -q
	$(VENV)/bin/coverage report | tail -n 3

unit: venv
	$(VENV)/bin/pytest -m 'not vm' $(PYTEST_ARGS)

e2e: venv
	$(VENV)/bin/pytest -m vm $(PYTEST_ARGS)

# Then the same feed through JetStream beside the pipes (bench/jetstream.py: ratios).
bench: venv
	$(PY) -m bench $(BENCH_ARGS)
	$(PY) -m bench.jetstream $(BENCH_JETSTREAM_ARGS)

# make bench-ab AB=REV [BASE=REV2] [AB_ARGS="--pairs 3 --trades 2000000" or "--paced"]: interleaved pairs
# of short throughput runs, A = REV against B = BASE (default: this working tree as it is), and
# their B/A ratios (bench/ab.py; REV is built once in ~/.cache/tradebalancer-bench).
bench-ab: venv
	@test -n "$(AB)" || { echo "make bench-ab AB=REV [BASE=REV2] [AB_ARGS=...]: AB is required" >&2; exit 2; }
	$(PY) -m bench.ab $(AB) $(BASE) $(AB_ARGS)

# make deb DIST=trixie: the Debian 13 package, built in a cached trixie build root (as root).
deb: venv
	TB_DEB_DIST=$(DIST) sh packaging/build-deb.sh

# A signed apt repository of the package for Debian 12 and 13 in packaging/out/repo (see
# packaging/build-repo.sh; its signing key stays in packaging/out/repo-key, outside the tree).
repo: venv
	sh packaging/build-repo.sh

# The worker library alone, for worker hosts: packaging/out/tradebalancer_reader-*.whl.
reader-wheel: venv
	PYTHON=$(PY) sh packaging/build-reader.sh

clean:
	rm -rf build dist packaging/out .coverage .coverage.* .pytest_cache .mypy_cache .ruff_cache tradebalancer/*.so tradebalancer/*/*.so
