# cnncli: the two commands a newcomer needs are `make demo` and `make test` (both set up everything).
# Versions come from constraints.txt (the set CI tests); pyproject.toml only states ranges.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet -c constraints.txt
RUN_DIR ?= runs/lenet5_fashion_mnist

.PHONY: setup data demo test test-fast test-wheel lint bench clean clean-runs

# cnncli and what training needs: no test tools, no PyTorch
$(VENV)/.cnncli: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) -e .
	touch $@

# + the test extra: pytest, ruff, and the references the tests compare with (PyTorch, torchmetrics, TFDS)
$(VENV)/.test: $(VENV)/.cnncli
	$(PIP) -e '.[test]'
	$(PIP) --no-deps jax2onnx torchattacks  # the export and test extras in pyproject.toml say why --no-deps
	touch $@

setup: $(VENV)/.test  ## .venv with cnncli (editable) and its test tools

# Fashion-MNIST from Debian (offline); without root or apt, cnncli still runs on `digits`.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; fi

demo: $(VENV)/.cnncli data  ## train LeNet-5 on Fashion-MNIST and evaluate it
	$(BIN)/cnncli train lenet5_fashion_mnist --run-dir $(RUN_DIR) --overwrite
	$(BIN)/cnncli eval $(RUN_DIR)

test: setup data  ## the whole test suite (what .ci/run runs), then its 25 slowest tests
	$(BIN)/python -m pytest -q --durations=25

test-fast: setup data  ## while working: the tests not marked `slow` (docs/design.md, rule 9, says which are)
	$(BIN)/python -m pytest -q -m "not slow" --durations=10

# The package as a user gets it: a wheel in a fresh venv, run from outside the checkout (.ci/run runs it).
test-wheel:
	rm -rf build/wheel-check && mkdir -p build/wheel-check
	$(PYTHON) -m venv build/wheel-check/venv
	build/wheel-check/venv/bin/pip wheel --quiet --no-deps -w build/wheel-check/dist .
	build/wheel-check/venv/bin/pip install --quiet -c constraints.txt build/wheel-check/dist/cnncli-*.whl
	cd build/wheel-check && venv/bin/cnncli recipes
	cd build/wheel-check && venv/bin/cnncli datasets | grep -q "cnncli\[tfds\]"  # TFDS is an extra, and says so
	cd build/wheel-check && venv/bin/cnncli train recipes/mlp_fashion_mnist.yaml --data digits --epochs 1 \
	  --run-dir run && venv/bin/cnncli eval run

lint: setup
	$(BIN)/ruff check cnncli tests benchmarks docs

bench: setup  ## cnncli vs the PyTorch peer, side by side (torch comes with the test extra)
	@for m in lenet5 resnet18 vgg16; do \
	  $(BIN)/python benchmarks/side_by_side.py --rounds 3 \
	    --a "$(BIN)/cnncli benchmark --model $$m --json" \
	    --b "$(BIN)/python benchmarks/torch_peer.py --model $$m"; done

clean:  ## the virtualenv and caches; trained runs stay (make clean-runs deletes them)
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache

clean-runs:  ## every run under runs/: trained models are lost
	rm -rf runs
