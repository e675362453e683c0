# The targets a newcomer looks for. `make install` makes .venv; everything else uses it.
VENV ?= .venv
PY := $(VENV)/bin/python
SHARED ?= ../shared/data

.PHONY: install tools test lint demo experiment bench bench-daemon bench-retrain bench-overload bench-hostile model experiments clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# System tools the tests use (redis-server, prometheus, chromium, docker-compose, docker.io,
# debootstrap, nodejs, python3-venv): whatever is missing is installed with apt-get when root;
# otherwise one message says what is missing and which tests will fail or be skipped.
tools:
	@VENV=$(VENV) bash .ci/install-tools

# The README's test command (.ci/run calls it too): the tools, the venv, the whole suite.
test: tools install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check streamcast tests bench
	$(VENV)/bin/ruff format --check streamcast tests bench
	$(VENV)/bin/mypy

# The main job: embedded Redis, a synthetic feed, the daemon, live forecasts (Ctrl+C stops).
demo: install
	$(VENV)/bin/streamcast demo

# The tutorial's experiment on the built-in sine (train + the three prediction modes).
experiment: install
	$(VENV)/bin/streamcast experiment --out runs/sine

# Benchmarks record their reports in docs/results/ and refresh the docs that include them.
bench: install
	$(PY) bench/engine.py --record && $(PY) bench/results.py

bench-daemon: install
	$(PY) bench/daemon.py --record && $(PY) bench/results.py

# p99 latency with the daemon retraining under a load, next to the same load without.
bench-retrain: install
	$(PY) bench/daemon.py --retrain --symbols 100 --rate 400 --seconds 60 --history-points 300 --record && $(PY) bench/results.py

bench-overload: install
	$(PY) bench/overload.py --symbols 500 --rate 20000 --seconds 30 --producers 2 --record && $(PY) bench/results.py

# Everything operators and hostile clients do, at once, against one deployment (exit 1 if any case fails).
bench-hostile: install
	$(PY) bench/hostile.py --record && $(PY) bench/results.py

# The shipped default model: the project's own synthetic series, reproducible from the seed.
model: install
	$(VENV)/bin/streamcast train --synthetic 64 --points 400 --batch-size 64 --seed 0 --out streamcast/models/default

# The README's figures and numbers.
experiments: install
	$(VENV)/bin/streamcast train --data $(SHARED)/sinwave.csv --out runs/sine
	$(VENV)/bin/streamcast evaluate --model runs/sine --data $(SHARED)/sinwave.csv --out docs/figures/sine
	$(VENV)/bin/streamcast train --data $(SHARED)/sp500.csv --out runs/sp500
	$(VENV)/bin/streamcast evaluate --model runs/sp500 --data $(SHARED)/sp500.csv --out docs/figures/sp500
	$(VENV)/bin/streamcast train --data $(SHARED)/sp500.csv --residual --out runs/sp500-residual
	$(VENV)/bin/streamcast evaluate --model runs/sp500-residual --data $(SHARED)/sp500.csv --out docs/figures/sp500-residual

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
