# ppml-kms developer entry points. `make demo` and `make test` work on a fresh machine with
# Python 3.11+ and Java 17+ (Spark); both create .venv when missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_FLAGS ?= --disable-pip-version-check -q

.PHONY: setup setup-test demo test bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml
	@command -v java >/dev/null 2>&1 || { echo "Java 17+ is needed for Spark (e.g. apt-get install openjdk-17-jre-headless)"; exit 1; }
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PIP_FLAGS) -e .
	@touch $@

setup-test: $(VENV)/.setup-test-done

$(VENV)/.setup-test-done: $(VENV)/.setup-done
	$(PY) -m pip install $(PIP_FLAGS) -e '.[test]'
	@touch $@

demo: setup
	$(VENV)/bin/ppml-kms demo

test: setup-test
	$(PY) -m pytest

bench: setup
	$(PY) bench/format_bench.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
