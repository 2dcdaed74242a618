# exitflow: two set-up commands (README): `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOME_DIR  ?= $(or $(EXITFLOW_HOME),$(HOME)/.cache/exitflow)
CAL_MATRIX := $(HOME_DIR)/matrices/sst2-dev.npz
CAL        := $(HOME_DIR)/calibration/splitee.json
DEMO_ARGS ?= --dataset imdb --limit 2000 --rate 30 --policy splitee --set calibration=$(CAL) --json artifacts/demo.json

.PHONY: install run test bench fault fault-repeat soak reproduce clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Prepares the default model (fine-tunes it on SST-2 the first time: 5.3 min measured on 2 cores),
# calibrates SplitEE's starting α on the SST-2 dev split (labels enter only here), and runs the demo on IMDb
# (o = 5λ·6/12 = 2.5λ; α then learned online from agreement with the final exit).
run: $(STAMP)
	$(BIN)/exitflow model prepare
	test -f $(CAL_MATRIX) || $(BIN)/exitflow export-matrix --dataset sst2 --split dev --out $(CAL_MATRIX)
	test -f $(CAL) || (mkdir -p $(dir $(CAL)) && $(BIN)/exitflow policy calibrate splitee --matrix $(CAL_MATRIX) --out $(CAL))
	mkdir -p artifacts
	$(BIN)/exitflow demo $(DEMO_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not fault"

fault: $(STAMP)
	$(BIN)/python -m pytest -q -m fault

# The papers' tables under their own protocols, beside the published figures (artifacts/reproduce/).
reproduce: $(STAMP)
	$(BIN)/exitflow reproduce all --out artifacts/reproduce

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) artifacts .pytest_cache

# The rebalance fault test N times in a row (issue #11): one line per run, the tally, and non-zero unless
# every run passed. Logs of failed runs stay in artifacts/fault-repeat/.
N ?= 20
fault-repeat: $(STAMP)
	@mkdir -p artifacts/fault-repeat; pass=0; \
	for i in $$(seq 1 $(N)); do \
	  log=artifacts/fault-repeat/run-$$i.log; start=$$(date +%s); \
	  if $(BIN)/python -m pytest -q -s -m fault -k rebalance tests/test_faults.py > $$log 2>&1; then \
	    pass=$$((pass + 1)); echo "run $$i: pass ($$(( $$(date +%s) - start )) s) $$(grep -o 'lost=.*' $$log)"; rm -f $$log; \
	  else echo "run $$i: FAIL ($$(( $$(date +%s) - start )) s), log in $$log"; fi; \
	done; echo "rebalance: $$pass of $(N) passed"; [ $$pass -eq $(N) ]
