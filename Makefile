# `make run`  : set up a fresh machine and run the main job on the default model.
# `make test` : set up (with test extras) and run the whole test suite.
# `make test-fast`: the tests that need neither the real models nor llama.cpp's tools (a few minutes).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
OUT    ?= out

.PHONY: setup setup-test run test test-fast bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# pip keeps the llama-cpp-python wheel it builds from source in its cache: never pass --no-cache-dir.
$(VENV)/.setup: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e .
	touch $@

# The chat page test drives Debian's chromium through its chromedriver (never a downloaded browser).
$(VENV)/.setup-test: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[test]'
	test -x /usr/bin/chromedriver || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }
	touch $(VENV)/.setup $@

setup: $(VENV)/.setup

setup-test: $(VENV)/.setup-test

run: setup
	$(VENV)/bin/ggufkit demo --out $(OUT)

test: setup-test
	$(PY) -m pytest -q

test-fast: setup-test
	$(PY) -m pytest -q -m "not models and not tools"

bench: setup-test
	$(PY) -m benchmarks.convert_speed

clean:
	rm -rf $(VENV) $(OUT)
