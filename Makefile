# cnncli: the two commands a newcomer needs are `make demo` and `make test` (both set up everything).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/lenet5_fashion_mnist

.PHONY: setup data demo test lint bench clean

$(BIN)/cnncli: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/cnncli  ## create .venv and install cnncli with its test tools

# Fashion-MNIST from Debian (offline); without root or apt, cnncli still runs on `digits`.
data:
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist; fi; fi

demo: setup data  ## train LeNet-5 on Fashion-MNIST and evaluate it
	$(BIN)/cnncli train lenet5_fashion_mnist --run-dir $(RUN_DIR) --overwrite
	$(BIN)/cnncli eval $(RUN_DIR)

test: setup data  ## the whole test suite (what .ci/run runs)
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check cnncli tests

bench: setup  ## cnncli vs the PyTorch peer, side by side (torch comes with the dev extra)
	@for m in lenet5 resnet18 vgg16; do \
	  $(BIN)/python benchmarks/side_by_side.py --rounds 3 \
	    --a "$(BIN)/cnncli benchmark --model $$m --json" \
	    --b "$(BIN)/python benchmarks/torch_peer.py --model $$m"; done

clean:
	rm -rf $(VENV) runs .pytest_cache
