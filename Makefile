# Two entry points: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv on first use, install the package with the torch build pinned for this machine
# (requirements/pinned.txt; the package itself accepts a range), and install the
# Fashion-MNIST IDX files from the Debian package if they are missing (needs root or sudo).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist
DEMO   ?= runs/demo

.PHONY: demo test test-all bench results install data clean

$(STAMP): pyproject.toml requirements/pinned.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]' -c requirements/pinned.txt
	touch $(STAMP)

install: $(STAMP)

data:
	@test -d $(FMNIST) || { if [ "$$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist; \
	  else sudo apt-get install -y -q dataset-fashion-mnist; fi; } || \
	  echo "warning: could not install dataset-fashion-mnist; run: sudo apt-get install -y dataset-fashion-mnist"

# The main job: train a LiResNet with EMMA on Fashion-MNIST briefly (2 epochs on 20k images, about
# 2 minutes on 2 CPU cores), then certify the 10k test images with the proven bound. The demo owns
# runs/demo, so re-running it replaces its earlier run (--overwrite); other runs are never replaced.
# The full recipe (8 epochs, about 7 minutes): $(BIN)/certify-fx train recipes/fashion_mnist.yaml
demo: $(STAMP) data
	$(BIN)/certify-fx train recipes/fashion_mnist.yaml --set epochs=2 --set data.train_subset=20000 \
	  --set output_dir=$(DEMO) --overwrite
	$(BIN)/certify-fx certify $(DEMO)/checkpoint.pt --plot $(DEMO)/certified_accuracy.png

test: $(STAMP) data
	$(BIN)/python -m pytest -q

test-all: $(STAMP) data
	$(BIN)/python -m pytest -q -m ''

bench: $(STAMP)
	$(BIN)/python benchmarks/certify_overhead.py
	$(BIN)/python benchmarks/train_overhead.py

# docs/results.md: the papers' orderings on Fashion-MNIST and two moons (about 70 minutes on 2
# cores; resumable: run it again after a stop and it continues).
results: $(STAMP) data
	$(BIN)/python benchmarks/orderings.py --write

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
