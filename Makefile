# MuseTalk warm server. Every target installs what it needs on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
HOST ?= 127.0.0.1
PORT ?= 8000
ARGS ?=
REPLICAS ?= 0

.PHONY: setup test test-slow lint typecheck unit serve serve-cluster demo weights weights-check bench clean help

help:
	@echo "make setup    create .venv and install pinned requirements (idempotent)"
	@echo "make serve    run the server + web page on http://$(HOST):$(PORT)"
	@echo "make serve-cluster  the same on a local Ray Serve cluster (REPLICAS=N, one GPU each; RAY_ADDRESS joins one)"
	@echo "make demo     prepare the demo avatar, speak two sentences, print the session video"
	@echo "make test     ruff + mypy + pytest, the quick suite (CI runs it and make test-slow)"
	@echo "make test-slow  the slow tests (real subprocesses, browsers, dlib-heavy prep)"
	@echo "make weights  fetch the real MuseTalk weights into models/ (needs internet)"
	@echo "make bench    CPU benchmarks (GPU numbers: see docs/BENCHMARKS.md)"

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt scripts/setup_system.sh
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if (3, 10) <= v <= (3, 12) else f"Python 3.10-3.12 needed, {sys.version.split()[0]} found: set PYTHON=python3.X")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	PIP_CONSTRAINT=constraints.txt $(PY) -m pip install --disable-pip-version-check -q -r requirements.txt
	bash scripts/setup_system.sh
	@touch $(STAMP)

lint: setup
	$(PY) -m ruff check .

typecheck: setup
	$(PY) -m mypy

unit: setup
	$(PY) -m pytest -m "not gpu and not slow"

test: lint typecheck unit

test-slow: setup
	$(PY) -m pytest -m "slow and not gpu"

weights: setup
	$(PY) -m scripts.download_weights $(ARGS)

weights-check: setup
	$(PY) -m scripts.download_weights --check $(ARGS)

DEMO_VIDEO := data/video/demo.mp4

$(DEMO_VIDEO): | setup
	$(PY) -m scripts.make_demo_video --out $@

serve: setup $(DEMO_VIDEO)
	$(PY) server_fast.py --host $(HOST) --port $(PORT) $(ARGS)

serve-cluster: setup $(DEMO_VIDEO)
	$(PY) -m scripts.serve_cluster --replicas $(REPLICAS) --host $(HOST) --port $(PORT) $(ARGS)

demo: setup $(DEMO_VIDEO)
	$(PY) -m scripts.demo $(ARGS)

bench: setup
	$(PY) bench/bench_engine.py --device cpu --size tiny --out results/bench_engine_cpu.json $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
