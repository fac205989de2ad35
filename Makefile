# Two entry points: `make test` (this library's tests) and, with the experiments, the main job.
# Each builds its own virtual environment on a fresh machine first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test bench clean

test: $(VENV)/installed
	$(BIN)/python -m pytest -q tests

bench: $(VENV)/installed
	$(BIN)/python benchmarks/bench_selectors.py

$(VENV)/installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
