#!/usr/bin/env bash
# Train with every GPU of one host, or as one of several processes (one per host); arguments after `--` (or all
# arguments, when none of the options below comes first) are passed to mtl_sparse_jax.main.
#
#   ./launch.sh --config configs/nyu.py --workdir runs/nyu --config.sparsity.lam=1e-5      # one host
#   srun ./launch.sh -- --config configs/nyu.py --workdir runs/nyu                         # SLURM, one task per node
#   ./launch.sh --coordinator HOST:PORT --num-processes N --process-id I -- --config ...  # by hand, on each host
#   ./launch.sh --local N [--devices-per-process K] -- --config ...                       # N processes on this host
#
# The train step is jitted over a mesh of all devices of all processes (data parallel, batch_size = global
# batch); each process drives its local devices and reads its share of the data. Under SLURM (srun) and Open MPI
# (mpirun) jax.distributed finds the other processes by itself. --local starts N processes on 127.0.0.1 (a free
# port), each with K devices: on the CPU K fake devices (default 1), on GPUs its share of the visible GPUs.
# Install with: pip install -e ".[cuda12]"
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

local_n="" per_process="" coordinator="" num_processes="" process_id=""
case "${1:-}" in
  --local | --devices-per-process | --coordinator | --num-processes | --process-id | --) own_options=1 ;;
  *) own_options=0 ;;
esac
if [[ "$own_options" == 1 ]]; then
  while [[ $# -gt 0 && "$1" != -- ]]; do
    [[ $# -ge 2 ]] || { echo "launch.sh: $1 needs a value" >&2; usage; }
    case "$1" in
      --local) local_n="$2" ;;
      --devices-per-process) per_process="$2" ;;
      --coordinator) coordinator="$2" ;;
      --num-processes) num_processes="$2" ;;
      --process-id) process_id="$2" ;;
      *) echo "launch.sh: unknown option $1" >&2; usage ;;
    esac
    shift 2
  done
  [[ $# -gt 0 ]] && shift # the `--`
fi
for v in "$local_n" "$per_process" "$num_processes" "$process_id"; do
  [[ -z "$v" || "$v" =~ ^[0-9]+$ ]] || { echo "launch.sh: '$v' is not a whole number" >&2; exit 2; }
done

# JAX preallocates 75% of GPU memory by default; TensorFlow (input pipeline only) is kept off the GPUs.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export TF_FORCE_GPU_ALLOW_GROWTH=true

gpus=0
if command -v nvidia-smi >/dev/null 2>&1 && [[ "${JAX_PLATFORMS:-}" != cpu ]]; then
  if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
    gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c . || true)
  else
    gpus=$(nvidia-smi --list-gpus | wc -l)
  fi
fi

if [[ -z "$local_n" ]]; then
  if [[ "$gpus" -gt 0 ]]; then
    echo "launch.sh: ${gpus} GPU(s) visible${CUDA_VISIBLE_DEVICES:+ (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES})}" >&2
  else
    echo "launch.sh: no NVIDIA GPU found; running on the CPU" >&2
  fi
  # jax.distributed gives each SLURM / Open MPI task one GPU unless told otherwise; with one task per node (the
  # layout this script is for) that task drives all GPUs of its node.
  tasks_here="${SLURM_TASKS_PER_NODE:-${OMPI_COMM_WORLD_LOCAL_SIZE:-}}"
  tasks_here="${tasks_here%%(*}"
  tasks_here="${tasks_here%%,*}"
  if [[ "$gpus" -gt 1 && "$tasks_here" == 1 && -z "${JAX_LOCAL_DEVICE_IDS:-}" ]]; then
    JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
    export JAX_LOCAL_DEVICE_IDS
  fi
  dist=()
  if [[ -n "$coordinator$num_processes$process_id" ]]; then
    if [[ -z "$coordinator" || -z "$num_processes" || -z "$process_id" ]]; then
      echo "launch.sh: --coordinator, --num-processes and --process-id go together" >&2
      exit 2
    fi
    dist=(--coordinator_address="$coordinator" --num_processes="$num_processes" --process_id="$process_id")
  fi
  exec python -m mtl_sparse_jax.main "${dist[@]}" "$@"
fi

# --local N: N processes on this host, coordinated over 127.0.0.1.
[[ "$local_n" -ge 1 ]] || { echo "launch.sh: --local needs at least 1 process" >&2; exit 2; }
if [[ "$gpus" -gt 0 ]]; then
  per_process="${per_process:-$((gpus / local_n))}"
  if [[ "$per_process" -lt 1 || $((per_process * local_n)) -gt "$gpus" ]]; then
    echo "launch.sh: ${local_n} processes x ${per_process} GPU(s) do not fit on ${gpus} visible GPU(s)" >&2
    exit 2
  fi
else
  per_process="${per_process:-1}"
  # Each process fakes its share of CPU devices (replacing a device count already in XLA_FLAGS).
  flags=$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<<"${XLA_FLAGS:-}")
  export XLA_FLAGS="${flags} --xla_force_host_platform_device_count=${per_process}"
fi
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "launch.sh: ${local_n} local process(es) x ${per_process} device(s), coordinator 127.0.0.1:${port}" >&2

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap 'cleanup; exit 130' INT TERM
for ((i = 0; i < local_n; i++)); do
  if [[ "$gpus" -gt 0 ]]; then
    export JAX_LOCAL_DEVICE_IDS
    JAX_LOCAL_DEVICE_IDS=$(seq -s, $((i * per_process)) $(((i + 1) * per_process - 1)))
  fi
  python -m mtl_sparse_jax.main --coordinator_address="127.0.0.1:${port}" --num_processes="$local_n" \
    --process_id="$i" "$@" &
  pids+=("$!")
done
# Every process is waited for; a process that loses its peers exits by itself (main.py's --heartbeat_timeout).
rc=0
for pid in "${pids[@]}"; do
  status=0
  wait "$pid" || status=$?
  [[ "$rc" -ne 0 ]] || rc=$status
done
exit "$rc"
