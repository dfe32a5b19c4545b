#!/usr/bin/env bash
# Per-node launcher: starts this node's training processes (one per GPU), forwards preemption
# signals to them, and exits with one code for the node. train.sbatch runs it once per node
# (srun --ntasks-per-node=1), launch/local.sh runs it for a single machine, and
# tests/test_launch.py runs it for a real two-"node" rendezvous on loopback.
#
#   launch/slurm/node_launch.sh [--dry-run] --nnodes N [--node-rank R] --nproc-per-node P \
#       --master-addr HOST --master-port PORT -- --config CONFIG.yaml [train args ...]
#
# Rank r of node R gets the environment torchrun would give it (RANK=R*P+r, LOCAL_RANK=r,
# WORLD_SIZE=N*P, LOCAL_WORLD_SIZE=P, MASTER_ADDR, MASTER_PORT) and runs
# `python -m pipeline.train ARGS`. --node-rank defaults to $SLURM_NODEID.
#
# Why not torchrun or the DeepSpeed launcher as the per-node process:
#   - torchrun exits 1 when any worker fails, so the preemption code (75, "checkpoint saved,
#     requeue me") would never reach the SLURM script; it also dies on SIGUSR1 (default action)
#     and answers SIGTERM by killing its workers 30 s later, possibly in the middle of a save;
#   - the DeepSpeed launcher (launch.py) answers SIGTERM by killing its workers at once.
# This script instead forwards SIGUSR1/SIGTERM to every rank and waits for them to save.
#
# Signals (to this script):
#   USR1, TERM  forwarded as they are to every rank: the ranks agree at the next step boundary,
#               save a complete checkpoint and exit with PREEMPTED_EXIT_CODE.
#   INT         (Ctrl-C) first: TERM to every rank (save and stop); second: KILL every rank.
# A signal is never lost or fatal during start-up: the traps are set before anything else; the
# ranks start with USR1/TERM ignored (Slurm signals every process of the step directly, which
# would otherwise kill a rank that has not yet installed its handler); a signal is forwarded to a
# rank once it catches it (SigCgt in /proc/PID/status), which `python -m pipeline.train` does
# before its heavy imports. SHD_STOP_SIGNAL=USR1|TERM (set by train.sbatch when the signal came
# before srun started) counts as a signal received before the first rank started.
# When some rank has exited and others are still running SHD_EXIT_GRACE_S seconds later
# (default 120), those are SIGKILLed: after a crash they would otherwise wait in a collective
# until the communication timeout.
#
# Exit code of the node: 0 when every rank exited 0; else the code of the rank that failed first
# otherwise than by preemption (its log says why); else PREEMPTED_EXIT_CODE.
set -euo pipefail

# ---- stop signals: recorded from the first line on, forwarded once the ranks catch them ------
pids=()       # pid of each local rank (python itself)
owed=()       # per local rank: the signal to forward once the rank catches it, or empty
stop_signal="${SHD_STOP_SIGNAL:-}"  # the first USR1/TERM received (forwarded to ranks started later)

deliver() {  # forward the owed signal to every rank that now catches it
  local r
  for r in "${!owed[@]}"; do
    if [[ -n "${owed[r]}" ]] && shd_catches "${pids[r]}" "${owed[r]}"; then
      kill -s "${owed[r]}" "${pids[r]}" 2>/dev/null || true
      owed[r]=""
    fi
  done
}
forward() {  # signal $1 to every rank: at once for KILL, else as soon as the rank catches it
  local r
  [[ "$1" == KILL || -n "$stop_signal" ]] || stop_signal="$1"
  for r in "${!pids[@]}"; do
    if [[ "$1" == KILL ]]; then kill -KILL "${pids[r]}" 2>/dev/null || true; else owed[r]="$1"; fi
  done
  deliver
}
int_count=0
# shellcheck disable=SC2329  # invoked by the INT trap
on_int() {
  int_count=$((int_count + 1))
  if ((int_count == 1)); then
    echo "[node ${node_rank:-?}] interrupted: asking the ranks to save and stop (Ctrl-C again kills them)" >&2
    forward TERM
  else
    forward KILL
  fi
}
stop_traps() {
  trap 'echo "[node ${node_rank:-?}] SIGUSR1: forwarding to the ranks" >&2; forward USR1' USR1
  trap 'echo "[node ${node_rank:-?}] SIGTERM: forwarding to the ranks" >&2; forward TERM' TERM
}
stop_traps
trap on_int INT
# From the traps on, builtins where possible: a signal to every process of the step kills an
# external command and the subshell waiting for it.
here="${BASH_SOURCE[0]%/*}"
[[ "$here" != "${BASH_SOURCE[0]}" ]] || here=.
# shellcheck source=launch/slurm/common.sh
source "$here/common.sh"

usage() {
  sed -n '7,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
die() { echo "node_launch.sh: error: $*" >&2; exit 2; }

dry_run="${DRY_RUN:-0}"
nnodes="" node_rank="${SLURM_NODEID:-}" nproc="" master_addr="" master_port=""
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --nnodes) nnodes="${2:-}"; shift 2 ;;
    --node-rank) node_rank="${2:-}"; shift 2 ;;
    --nproc-per-node) nproc="${2:-}"; shift 2 ;;
    --master-addr) master_addr="${2:-}"; shift 2 ;;
    --master-port) master_port="${2:-}"; shift 2 ;;
    --) shift; break ;;
    -h|--help) usage ;;
    *) die "unknown option '$1' (the training arguments go after '--')" ;;
  esac
done
is_int() { [[ "$1" =~ ^[0-9]+$ ]]; }
{ is_int "$nnodes" && ((nnodes >= 1)); } || die "--nnodes '$nnodes': give the number of nodes (>= 1)"
{ is_int "$nproc" && ((nproc >= 1)); } || die "--nproc-per-node '$nproc': give the processes per node (>= 1)"
is_int "$node_rank" || die "--node-rank '$node_rank': give this node's rank (or run under srun, which sets SLURM_NODEID)"
((node_rank < nnodes)) || die "--node-rank $node_rank must be < --nnodes $nnodes"
[[ -n "$master_addr" ]] || die "--master-addr: give the rendezvous host (node rank 0)"
{ is_int "$master_port" && ((master_port > 0 && master_port < 65536)); } || die "--master-port '$master_port': give a TCP port"
(($#)) || die "no training arguments after '--' (expected: -- --config CONFIG.yaml [key=value ...])"

root="$(cd "$here/../.." && pwd)"
{ cd "$root" && shd_read_preempted_exit_code && cd "$OLDPWD"; } || exit 2
preempted="$SHD_PREEMPTED"
grace="${SHD_EXIT_GRACE_S:-120}"
world=$((nnodes * nproc))
# Threads per rank: this node's CPUs shared out (torchrun would set 1, which starves CPU-only
# ranks and data loading). The CPUs are those Slurm gave the task, else those `nproc` sees.
cpus="${SLURM_CPUS_PER_TASK:-$(command nproc)}"
omp="${OMP_NUM_THREADS:-$((cpus / nproc > 0 ? cpus / nproc : 1))}"

rank_env() {  # sets renv to the environment of local rank $1 (NAME=VALUE words)
  local r="$1"
  renv=("RANK=$((node_rank * nproc + r))" "LOCAL_RANK=$r" "WORLD_SIZE=$world" "LOCAL_WORLD_SIZE=$nproc"
        "NODE_RANK=$node_rank" "GROUP_RANK=$node_rank" "MASTER_ADDR=$master_addr"
        "MASTER_PORT=$master_port" "OMP_NUM_THREADS=$omp")
  # Shown in the dry run because it decides CPU vs GPU; exported anyway when set.
  if [[ -n "${DS_ACCELERATOR:-}" ]]; then renv+=("DS_ACCELERATOR=$DS_ACCELERATOR"); fi
}
renv=()
cmd=(python -m pipeline.train "$@")

if [[ "$dry_run" == "1" ]]; then
  for ((r = 0; r < nproc; r++)); do
    rank_env "$r"
    line="$(printf '%q ' env "${renv[@]}" "${cmd[@]}")"
    printf '[node %d rank %d] %s\n' "$node_rank" "$((node_rank * nproc + r))" "${line% }"
  done
  exit 0
fi

# No `cd`: relative paths in the arguments and in the config (output_dir, data.dir) keep meaning
# what they mean where the launcher was started (the repository root under train.sbatch).
codes=()      # exit code per local rank, empty while running

# The ranks and their output filters are forked while this shell ignores USR1/TERM, so they
# inherit that from their first instant (a child that set it itself could die of a step-wide
# signal before it runs its first command, which on a loaded machine can take a while). A stop
# signal that comes during these milliseconds is lost on this node: train.sbatch sends its USR1
# again every 10 s until the step ends.
trap '' USR1 TERM
for ((r = 0; r < nproc; r++)); do
  # Each rank's lines are prefixed with its global rank so an 8-rank log stays readable;
  # $! is python's own pid (the output goes through a process substitution, not a pipe, and env
  # execs python), so signals and exit codes are those of the rank itself. The rank ignores USR1/TERM until its handler is installed (see the top); the filter
  # ignores USR1/TERM/INT for good: Slurm signals every process of the step, and a filter killed
  # by the preemption signal would break the rank's stdout in the middle of its checkpoint save.
  rank_env "$r"
  env "${renv[@]}" "${cmd[@]}" > >(trap '' INT; exec sed -u "s/^/[rank $((node_rank * nproc + r))] /") 2>&1 &
  pids+=("$!")
  codes+=("")
  owed[r]="$stop_signal"  # a signal received before this rank started
done
stop_traps
echo "[node $node_rank] started ranks $((node_rank * nproc))..$((node_rank * nproc + nproc - 1)) of $world" \
     "(pids ${pids[*]}), master $master_addr:$master_port" >&2

# Poll rather than `wait -n`: it needs no bash >= 5.1 feature, and bash reaps exited children in
# the background and keeps their status for `wait PID`. `sleep & wait` keeps traps responsive.
first_exit_at="" first_fail="" first_fail_rank=""
running=$nproc
while ((running > 0)); do
  sleep 0.5 & wait $! || true
  deliver
  for ((r = 0; r < nproc; r++)); do
    [[ -z "${codes[r]}" ]] || continue
    kill -0 "${pids[r]}" 2>/dev/null && continue
    code=0; wait "${pids[r]}" || code=$?
    codes[r]=$code
    running=$((running - 1))
    if ((code != 0 && code != preempted)) && [[ -z "$first_fail" ]]; then
      first_fail=$code first_fail_rank=$((node_rank * nproc + r))
    fi
    [[ -n "$first_exit_at" ]] || first_exit_at=$SECONDS
  done
  if ((running > 0)) && [[ -n "$first_exit_at" ]] && ((SECONDS - first_exit_at > grace)); then
    echo "[node $node_rank] $running rank(s) still running ${grace}s after another exited" \
         "(codes so far: ${codes[*]}): killing them (SHD_EXIT_GRACE_S)" >&2
    forward KILL
  fi
done
wait  # the output filters (sed) flush and exit once their rank has gone

describe_exit() {  # what exit status $1 of a rank means, and where to look
  local code="$1"
  if ((code > 128)); then
    local sig
    sig="$(kill -l "$((code - 128))" 2>/dev/null || echo "$((code - 128))")"
    echo "killed by signal SIG$sig (exit status $code) before it could report anything itself:" \
         "SIGKILL is usually the out-of-memory killer (see the node's kernel log) or the" \
         "SHD_EXIT_GRACE_S kill above; its last '[rank $first_fail_rank]' lines, if any, are in this log"
  else
    echo "exit code $code: its '[rank $first_fail_rank]' lines in this log say why"
  fi
}
result=0
for c in "${codes[@]}"; do
  if ((c == preempted)); then result=$c; fi
done
if [[ -n "$first_fail" ]]; then
  # The first failure in time is the cause; ranks that failed later were usually its victims
  # (a broken collective, or killed above).
  result=$first_fail
  echo "[node $node_rank] rank $first_fail_rank failed first: $(describe_exit "$first_fail")" >&2
fi
echo "[node $node_rank] exit codes of local ranks: ${codes[*]} -> node exits $result" >&2
exit "$result"
