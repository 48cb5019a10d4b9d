# torch==2.13.0 (CPU wheel) is installed before the project so that no unpinned
# dependency pulls a multi-gigabyte CUDA build of torch.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-quick test bench bench-quick clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/centerprompt demo

demo-quick: $(STAMP)
	$(BIN)/centerprompt demo --quick

# One pytest-xdist worker per core, each file on one worker (its module fixtures built once), one
# torch thread per worker: processes that each take every core slow each other down several times.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto --dist loadfile

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf $(VENV) runs data/synth
