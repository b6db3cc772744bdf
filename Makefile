PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[peers]'
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/mnist-ann fetch
	$(BIN)/mnist-ann build --split seed --index flat --index ivf --index hnsw \
		--index deskew-flat --index deskew-pca-ivf --index deskew-pca-hnsw \
		--index pca-hnsw --index exact-pca
	$(BIN)/mnist-ann tune --collection seed --index pca-hnsw --recall 0.999
	for index in flat ivf hnsw deskew-pca-ivf pca-hnsw exact-pca; do \
		$(BIN)/mnist-ann query --collection seed --index $$index || exit 1; done
	$(BIN)/mnist-ann report --collection seed --out reports/seed

lint: $(VENV)/.installed-test
	$(BIN)/ruff check mnist_ann tests bench

test: $(VENV)/.installed-test lint
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV)
