PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# the indexes of the main job: exact, approximate, two-stage, certified, and a deskew space
RUN_INDEXES := flat ivf hnsw pca-hnsw exact-pca deskew-pca-ivf

.PHONY: run test lint browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml mnist_ann/_kernels.c | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

# hnswlib, the report's peer (pyproject's `peers` extra), compiles from source for about a
# minute: `make run` has it built in the background while it fetches MNIST and builds the
# collection. Only hnswlib is installed there, so that mnist-ann itself, in use meanwhile,
# is not reinstalled under the running commands.
PEERS := hnswlib>=0.8
$(VENV)/.installed-peers: $(VENV)/.installed
	$(BIN)/python -m pip install -q '$(PEERS)'
	touch $@

$(VENV)/.installed-test: pyproject.toml mnist_ann/_kernels.c | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# The browser test drives Debian's Chromium headless shell with playwright (never
# `playwright install`, which downloads browsers): installed here when it is missing.
CHROMIUM := /usr/lib/chromium/chromium-headless-shell
browser:
	@test -x $(CHROMIUM) || { \
	  if [ "$$(id -u)" -eq 0 ]; then sudo=; else sudo=sudo; fi; \
	  echo "installing Debian's chromium-headless-shell for the browser test"; \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium-headless-shell \
	    >/dev/null; }

run: $(VENV)/.installed
	@echo "building hnswlib (the report's peer) in the background; log in $(VENV)/peers.log"
	@$(MAKE) --no-print-directory $(VENV)/.installed-peers > $(VENV)/peers.log 2>&1 & \
		echo $$! > $(VENV)/peers.pid
	$(BIN)/mnist-ann fetch
	$(BIN)/mnist-ann build --split seed $(foreach index,$(RUN_INDEXES),--index $(index))
	$(BIN)/mnist-ann tune --collection seed --index pca-hnsw --recall 0.999
	for index in flat exact-pca deskew-pca-ivf; do \
		$(BIN)/mnist-ann query --collection seed --index $$index || exit 1; done
	@while kill -0 $$(cat $(VENV)/peers.pid) 2>/dev/null; do sleep 1; done
	@test -f $(VENV)/.installed-peers || { cat $(VENV)/peers.log; exit 1; }
	$(BIN)/mnist-ann report --collection seed --sample 2000 --latency-queries 100 --out reports/seed

lint: $(VENV)/.installed-test
	$(BIN)/ruff check mnist_ann tests bench

test: $(VENV)/.installed-test lint browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
