# kuasar-py: one command sets up and runs the main job (`make setup run`), one runs the tests (`make test`).
SHELL := /bin/bash
VENV ?= $(CURDIR)/.venv
PY := $(VENV)/bin/python
PREFIX_DIR ?= $(CURDIR)/.prefix
export KUASAR_PREFIX := $(PREFIX_DIR)
export PATH := $(PREFIX_DIR)/bin:$(VENV)/bin:$(PATH)

.PHONY: setup protos run test test-unit test-integration lint bench bench-smoke clean

setup:
	bash scripts/setup.sh

protos:
	$(PY) scripts/gen_protos.py

run: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -v -rs tests

test-unit: setup
	$(PY) -m pytest -v tests/unit

test-integration: setup
	$(PY) -m pytest -v -rs tests/integration

lint:
	$(VENV)/bin/ruff check .

clean:
	rm -rf build dist .pytest_cache
