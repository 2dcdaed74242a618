# exitflow: two set-up commands (README): `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_ARGS ?= --dataset imdb --limit 2000 --json artifacts/demo.json

.PHONY: install run test bench fault soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Prepares the default model (fine-tunes it on SST-2 the first time: 5.3 min measured on 2 cores) and runs the demo.
run: $(STAMP)
	$(BIN)/exitflow model prepare
	mkdir -p artifacts
	$(BIN)/exitflow demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not fault"

fault: $(STAMP)
	$(BIN)/python -m pytest -q -m fault

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) artifacts .pytest_cache
