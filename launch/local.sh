#!/usr/bin/env bash
# Train on one machine: one process per GPU, or NPROC CPU processes (gloo) when there is no GPU.
#
#   launch/local.sh CONFIG.yaml [key.sub=value ...] [--resume auto|none|DIR] [--force-resume] [--move-aside]
#   launch/local.sh --dry-run CONFIG.yaml ...     (or DRY_RUN=1: print the commands, run nothing)
#   NPROC=4 launch/local.sh configs/tiny_cpu.yaml teacher.path=runs/teacher data.dir=data/tiny
#
# Environment: NPROC (processes; default: the GPU count, or 2 without a GPU), MASTER_PORT
# (default: a free port), DS_ACCELERATOR=cpu (force CPU), SHD_NO_VENV=1 (use the current Python
# environment instead of .venv), SHD_ENV_SETUP=0 (use the current environment as it is, no
# install check), SHD_EXIT_GRACE_S (see launch/slurm/node_launch.sh).
#
# The processes are started by launch/slurm/node_launch.sh as a one-node job, the same code path
# as the Slurm script. Exit code: the training's (0 done, 75 stopped after saving a checkpoint,
# 3 non-finite loss, 2 bad config: pipeline/runtime/faults.py). Ctrl-C once: every rank saves a
# checkpoint and stops (exit 75; run the same command again to continue); twice: kill.
set -euo pipefail

dry_run="${DRY_RUN:-0}"
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if (($# < 1)) || [[ "$1" == -* ]]; then
  echo "usage: launch/local.sh [--dry-run] CONFIG.yaml [key.sub=value ...] [--resume auto|none|DIR]" \
       "[--force-resume] [--move-aside]" >&2
  exit 2
fi
config="$1"; shift
[[ -f "$config" ]] || { echo "error: config '$config' not found (from $(pwd))" >&2; exit 2; }

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ "$dry_run" != "1" && "${SHD_ENV_SETUP:-1}" != "0" ]]; then
  # .venv with the project installed, once (SHD_NO_VENV=1: current env; SHD_ENV_SETUP=0: skip)
  # shellcheck source=launch/env_setup.sh
  source "$root/launch/env_setup.sh"
fi

gpu_count() {  # GPUs this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists
  if [[ "${DS_ACCELERATOR:-}" == "cpu" ]]; then echo 0; return; fi
  if [[ -n "${CUDA_VISIBLE_DEVICES+x}" ]]; then
    local -a ids=()
    [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == "-1" ]] \
      || IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    echo "${#ids[@]}"
  elif command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}
gpus="$(gpu_count)"
if ((gpus > 0)); then
  nproc="${NPROC:-$gpus}"
  if ((nproc > gpus)); then
    echo "error: NPROC=$nproc but only $gpus GPU(s) are visible: one process per GPU" >&2
    exit 2
  fi
else
  # No GPU: CPU ranks talking over gloo. DeepSpeed must be told, or it looks for CUDA.
  export DS_ACCELERATOR=cpu
  nproc="${NPROC:-2}"
fi
if ! [[ "$nproc" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NPROC='$nproc': give a number of processes >= 1" >&2
  exit 2
fi

# A free port on this machine (bind port 0 and read what the OS gave), unless MASTER_PORT is set.
port="${MASTER_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

device="$( ((gpus > 0)) && echo "GPU" || echo "CPU (DS_ACCELERATOR=cpu, gloo)")"
echo "[local] $nproc process(es) on $device, master 127.0.0.1:$port, config $config" >&2
# exec: the exit code and the signals (Ctrl-C, SIGTERM, SIGUSR1) go straight to the launcher.
dry=()
[[ "$dry_run" == "1" ]] && dry=(--dry-run)
exec "$root/launch/slurm/node_launch.sh" "${dry[@]}" --nnodes 1 --node-rank 0 --nproc-per-node "$nproc" \
  --master-addr 127.0.0.1 --master-port "$port" -- --config "$config" "$@"
