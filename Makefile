# kuasar-py: one command sets up and runs the main job (`bash scripts/setup.sh && make run`), one runs
# the tests (`bash scripts/setup.sh && make test`); every target that needs the setup runs it again
# (a quick no-op once done).
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
# Quoted: the checkout's path may hold spaces.
PY := "$(VENV)/bin/python"
PREFIX_DIR ?= $(CURDIR)/.prefix
export KUASAR_PREFIX := $(PREFIX_DIR)
# Root's sbin directories last: `su` without `-` leaves them out, and tc, iptables, ... live there.
export PATH := $(PREFIX_DIR)/bin:$(VENV)/bin:$(PATH):/usr/local/sbin:/usr/sbin:/sbin

.PHONY: setup protos run test test-unit test-integration test-cgroup2 lint bench bench-smoke clean binaries install uninstall guest-image

setup:
	bash scripts/setup.sh

protos:
	$(PY) scripts/gen_protos.py

# The vm-agent guest image (kernel + initramfs) in build/guest/; cached: a no-op when nothing changed.
guest-image: setup
	$(PY) scripts/build_guest_image.py

run: setup
	$(PY) scripts/demo.py

test: setup binaries
	$(PY) -m pytest -v -rs tests

test-unit: setup
	$(PY) -m pytest -v tests/unit

test-integration: setup binaries
	$(PY) -m pytest -v -rs tests/integration

# The cgroup tests on a cgroup v2 host with systemd: a Debian 13 VM made and set up by the script (the
# first run takes minutes; under TCG the tests run ~2x slower). Other tests through CGROUP2_TESTS.
CGROUP2_TESTS ?=
test-cgroup2: setup
	bash scripts/cgroup2_vm.sh $(CGROUP2_TESTS)

# Single-file executables (PyInstaller --onefile) of every [project.scripts] entry in dist/: one
# multi-call binary `kuasar` hard-linked under each name (~25 s; skipped when dist/ is up to date).
binaries: setup
	$(PY) packaging/build_binaries.py

# Binaries, systemd units, configs and containerd fragments under $(DESTDIR)$(PREFIX), with a manifest
# that `make uninstall` follows. SHIMDIR: also link the containerd shims into a dir on containerd's PATH.
PREFIX ?= /usr/local
DESTDIR ?=
SHIMDIR ?=
install: binaries guest-image
	python3 packaging/install.py install --prefix "$(PREFIX)" --destdir "$(DESTDIR)" --shimdir "$(SHIMDIR)"

uninstall:
	python3 packaging/install.py uninstall --prefix "$(PREFIX)" --destdir "$(DESTDIR)"

lint:
	"$(VENV)/bin/ruff" check .

# Benchmarks of runc-sandboxer against containerd's stock runc path (needs root); see benchmarks/README.md.
# Extra flags through BENCH_ARGS, e.g. `make bench BENCH_ARGS="--serial 50 --publish benchmarks/latest"`.
BENCH_ARGS ?=
bench: setup
	$(PY) benchmarks/run.py $(BENCH_ARGS)

bench-smoke: setup
	$(PY) benchmarks/run.py --smoke $(BENCH_ARGS)

clean:
	rm -rf build dist .pytest_cache
