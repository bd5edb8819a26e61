#!/usr/bin/env bash
# Every GPU measurement of issue 21 in one command: the record recipe's time to accuracy over 5 seeds
# (airbench timing), cold- and warm-cache wall times of `cnncli train`, training img/s against the
# PyTorch peer (eager bf16 and torch.compile, side by side), steps per dispatch and EMA stride, and
# XLA's GPU autotune level. Results: JSON/JSONL files and summary.md under $OUT (default gpu-results/).
#
# The GPU machine needs python3 with JAX (CUDA), Flax, Optax, Orbax, Typer, Rich, pydantic, PyYAML,
# NumPy, Pillow, scikit-learn, matplotlib, safetensors, and PyTorch with torch.compile for the peer;
# this script installs and downloads nothing. It needs Fashion-MNIST's four IDX .gz files: in
# $CNNCLI_FASHION_MNIST, or /usr/share/datasets/fashion-mnist, or .gpu-data/fashion-mnist here. To
# carry them from a machine that has them (the folder is git-ignored there, so name it in `carry`):
#   mkdir -p .gpu-data && cp -r /usr/share/datasets/fashion-mnist .gpu-data/ && echo /.gpu-data/ >> .git/info/exclude
#
# Usage: benchmarks/gpu.sh [PHASE ...]     phases: env wall record tables steps autotune (default: all)
#   BUDGET=540   seconds after which no phase or item starts (what was skipped is listed in summary.md)
#   ROUNDS=2     rounds of each side_by_side.py pair
# All phases take about 15-20 minutes on one H200; within a 10-minute command run, e.g.,
#   benchmarks/gpu.sh env wall record steps     then     benchmarks/gpu.sh tables autotune
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -z "${CNNCLI_FASHION_MNIST:-}" ] && [ ! -d /usr/share/datasets/fashion-mnist ] && [ -d .gpu-data/fashion-mnist ]; then
  export CNNCLI_FASHION_MNIST="$PWD/.gpu-data/fashion-mnist"
fi
# a fresh compilation cache for this measurement (the `wall` phase makes its own empty ones)
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$(mktemp -d)/jax}"
exec "${PYTHON:-python3}" benchmarks/gpu.py --out "${OUT:-gpu-results}" "$@"
