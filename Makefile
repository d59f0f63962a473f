# `make demo`, `make test` and `make test-fast` build .venv from requirements.txt, with this project
# installed in it (editable), on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-fast clean

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python train_sequential.py --config configs/shapes.yaml --out runs/shapes

test: $(BIN)/.installed
	$(BIN)/python -m pytest -q

# The in-process tests only (the maths, every algorithm, learning evidence, loaders, planning): under a minute.
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
