#!/usr/bin/env bash
# The GPU benchmark suite (benchmarks/gpu_suite.py): benchmarks/gpu_suite.sh OUT_DIR [--smoke] [--budget-s S]
# Needs only JAX, Flax, optax and numpy next to this checkout; writes OUT_DIR/gpu_suite.json and gpu_suite.md.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: benchmarks/gpu_suite.sh OUT_DIR [--smoke] [--budget-s S]}"
shift
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec python benchmarks/gpu_suite.py --out "$out" "$@"
