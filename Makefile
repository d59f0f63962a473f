# `make demo`, `make figure`, `make test` and `make test-fast` build .venv from requirements.txt, with this
# project installed in it (editable), on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo figure test test-fast clean

$(BIN)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install --quiet --disable-pip-version-check -e .
	touch $@

demo: $(BIN)/.installed
	$(BIN)/python train_sequential.py --config configs/shapes.yaml --out runs/shapes

# The seed's figure on shapes: a sequential run and a 2-rank run with the same seed, one after the other, one
# thread per process; plot.py draws every figure into runs/figure, and accuracy.png is copied to docs/.
FIGURE := runs/figure
figure: $(BIN)/.installed
	rm -rf $(FIGURE)
	OMP_NUM_THREADS=1 $(BIN)/python train_sequential.py --config configs/shapes.yaml --seed 0 --out $(FIGURE)/sequential
	OMP_NUM_THREADS=1 $(BIN)/torchrun --standalone --nproc_per_node=2 train_parallel.py --config configs/shapes.yaml \
		--seed 0 --out $(FIGURE)/2-ranks
	$(BIN)/python plot.py $(FIGURE)/sequential $(FIGURE)/2-ranks --labels "sequential, 1 process" "2 ranks" \
		--out $(FIGURE)
	cp $(FIGURE)/accuracy.png docs/accuracy.png

# Tests run on TEST_WORKERS pytest-xdist workers, two by default: much of the suite waits on process
# start-ups, signals and timeouts, so a 2-core machine finishes it in about 5 minutes rather than 7.
TEST_WORKERS ?= 2
test: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# The in-process tests only (the maths, every algorithm, learning evidence, loaders, planning): under a minute.
test-fast: $(BIN)/.installed
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
