# Two entry points, each building its own environment (.venv) on a fresh machine first:
#   make experiments   the main job: train and evaluate every method on Fashion-MNIST, print the table
#   make test          the test suite (what CI runs)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DATASET ?= fashion-mnist
EPOCHS ?= 20
EMBEDDING_DIM ?= 2
METHODS ?= all
SELECTORS ?= all
SYSTEM_FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: test experiments notebooks data bench clean

test: $(VENV)/installed
	$(BIN)/python -m pytest -q -m "not cuda" --durations=15 tests

# The committed study (EPOCHS=20) writes results/ and images/; any other settings (e.g. EPOCHS=1) write under
# runs/<dataset>/<settings>/ and leave the committed tables and figures as they are.
experiments: $(VENV)/installed data
	$(BIN)/python experiments.py --dataset $(DATASET) --methods $(METHODS) --selectors $(SELECTORS) \
		--epochs $(EPOCHS) --embedding-dim $(EMBEDDING_DIM) --channels-last --download

# The notebooks committed with outputs, executed in place on the saved results (ST_TRAIN=0: results/,
# images/, weights/), after `make experiments` or another run changed them. Experiments_MNIST.ipynb
# stays without outputs (it needs the MNIST download): it is made from Experiments_FashionMNIST.ipynb
# (notebook_twin.py), so it is remade here too.
notebooks: $(VENV)/installed data
	for notebook in Experiments_FashionMNIST Experiments_Omniglot Experiments_Autoencoders; do \
		ST_TRAIN=0 ST_QUICK=0 $(BIN)/jupyter execute --inplace --timeout=3600 $$notebook.ipynb || exit 1; \
	done
	$(BIN)/python notebook_twin.py

# Fashion-MNIST from the operating system's package where the system has one and we may install
# it (Debian's dataset-fashion-mnist); otherwise experiments.py falls back to torchvision's download.
data:
	@if [ "$(DATASET)" = fashion-mnist ] && [ ! -d $(SYSTEM_FASHION_MNIST) ] \
		&& command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist \
		|| echo "apt-get could not install dataset-fashion-mnist; torchvision will download it"; \
	fi

bench: $(VENV)/installed
	$(BIN)/python benchmarks/bench_selectors.py
	$(BIN)/python benchmarks/bench_epoch.py

$(VENV)/installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements.txt
	touch $@

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
