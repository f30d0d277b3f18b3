#!/usr/bin/env bash
# Train on one host with all of its GPUs; every argument is passed to mtl_sparse_jax.main.
#
#   ./launch.sh --config configs/nyu.py --workdir runs/nyu --config.sparsity.lam=1e-5
#
# The train step is jitted over a mesh of all local devices (data parallel, batch_size = global batch), so one
# process drives every GPU. Set CUDA_VISIBLE_DEVICES to use a subset. Install with: pip install -e ".[cuda12]"
set -euo pipefail
cd "$(dirname "$0")"

if command -v nvidia-smi >/dev/null 2>&1; then
  n=$(nvidia-smi --list-gpus | wc -l)
  echo "launch.sh: ${n} GPU(s) visible${CUDA_VISIBLE_DEVICES:+ (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES})}"
else
  echo "launch.sh: no NVIDIA GPU found; running on the CPU" >&2
fi

# JAX preallocates 75% of GPU memory by default; TensorFlow (input pipeline only) is kept off the GPUs.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export TF_FORCE_GPU_ALLOW_GROWTH=true

exec python -m mtl_sparse_jax.main "$@"
