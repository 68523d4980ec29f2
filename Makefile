# The README's two commands: `make demo` and `make test`. Every target sets itself up: it creates
# .venv when missing, installs requirements.txt, and (re)builds the native extension when csrc/,
# CMakeLists.txt or setup.py changed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
NATIVE_SOURCES := $(shell find csrc -type f) CMakeLists.txt setup.py pyproject.toml

.PHONY: all build test test-fast demo bench clean device-check

all: build

$(VENV)/.deps: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip setuptools wheel
	$(PIP) install -r requirements.txt
	@touch $@

$(VENV)/.built: $(VENV)/.deps $(NATIVE_SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	@touch $@

build: $(VENV)/.built

test: build
	$(PY) -m pytest -q tests

demo: build
	$(VENV)/bin/fourm-fast info
	$(PY) -m fourm_fast.demo --out demo_out

bench: build
	$(PY) bench/bench_vq.py
	$(PY) bench/bench_sampling.py

device-check:
	bash bench/device_check.sh

clean:
	rm -rf build fourm_fast/_C*.so *.egg-info
