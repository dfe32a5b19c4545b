# shellcheck shell=bash
# Shell functions shared by train.sbatch and prep.sbatch (sourced, not run). Kept apart so that
# tests/test_launch.py can exercise the requeue decision on its own.

# Print a command the way it would be typed (each word quoted as needed), on one line.
shd_print_cmd() {
  local line
  line="$(printf '%q ' "$@")"
  printf '%s\n' "${line% }"
}

# The single source of the preemption exit code: pipeline/faults.py.
shd_preempted_exit_code() {
  python -c 'from pipeline.faults import PREEMPTED_EXIT_CODE; print(PREEMPTED_EXIT_CODE)' || {
    echo "error: cannot import pipeline.faults with '$(command -v python)': run from the repository" \
         "root with the project's environment (launch/env_setup.sh, or SHD_NO_VENV=1 with your own)" >&2
    return 2
  }
}

# Does process $1 have a handler for signal $2 (USR1, TERM)? Read from the caught-signals mask
# (SigCgt) of /proc/$1/status; without /proc, assume it does. A process that does not catch a
# signal yet dies of it (srun in its first ~0.1 s, python before its handler is installed), so
# the launch scripts forward a stop signal only to processes that catch it.
shd_catches() {
  local mask
  [[ -r "/proc/$1/status" ]] || return 0
  mask="$(sed -n 's/^SigCgt:[[:space:]]*//p' "/proc/$1/status" 2>/dev/null)"
  [[ -n "$mask" ]] || return 0
  (( (16#$mask >> ($(kill -l "$2") - 1)) & 1 ))
}

# Is Slurm itself requeueing this job (`scontrol requeue`, or preemption with
# PreemptMode=REQUEUE)? It then counts the restart at once: the controller's Restarts is above
# the SLURM_RESTART_COUNT this run started with. (A plain scancel leaves it equal.)
shd_slurm_requeues() {
  local restarts
  restarts="$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Restarts=\([0-9]*\).*/\1/p')"
  [[ -n "$restarts" ]] && ((restarts > ${SLURM_RESTART_COUNT:-0}))
}

# Wait for background process $1 and set SHD_STEP_RC to its exit code. A trapped signal (USR1,
# TERM) interrupts `wait` with a code > 128 while the process is still running, so wait again
# until it has really exited; bash keeps a reaped child's status, so the final `wait` returns it.
# shellcheck disable=SC2034  # SHD_STEP_RC is read by the sourcing script
shd_wait_step() {
  local pid="$1"
  while kill -0 "$pid" 2>/dev/null; do
    wait "$pid" || true
  done
  SHD_STEP_RC=0
  wait "$pid" || SHD_STEP_RC=$?
}

# Decide what a finished step means for the job, given its exit code ($1), the preemption code
# ($2) and whether the batch shell itself got SIGTERM ($3: 0/1). Requeues with
# `scontrol requeue $SLURM_JOB_ID` when the step stopped after saving a checkpoint (code $2):
# the requeued job runs this script again and `--resume auto` continues from that checkpoint.
# Not after a SIGTERM to the batch shell: that is `scancel` (the user wants it stopped), or
# Slurm requeueing the job itself (`scontrol requeue`, preemption with PreemptMode=REQUEUE:
# said so in the log); set SHD_REQUEUE_ON_TERM=1 on clusters whose preemption only cancels.
# Returns the job's exit code.
shd_finish() {
  local rc="$1" preempted="$2" got_term="$3"
  if ((rc == 0)); then
    echo "[job] finished (exit 0)" >&2
    return 0
  fi
  if ((rc != preempted)); then
    echo "[job] the step failed with exit code $rc: not requeued (a requeue would fail the same" \
         "way). The per-node logs say which rank failed and why; fix it and resubmit the same" \
         "command, which resumes from the newest complete checkpoint." >&2
    return "$rc"
  fi
  if ((got_term)) && shd_slurm_requeues; then
    echo "[job] stopped by SIGTERM (exit $rc): Slurm is requeueing this job itself (scontrol" \
         "requeue or preemption); the next start continues from the newest complete checkpoint" >&2
    return 0
  fi
  if ((got_term)) && [[ "${SHD_REQUEUE_ON_TERM:-0}" != "1" ]]; then
    echo "[job] stopped by SIGTERM (exit $rc): not requeued (scancel, or a preemption that does" \
         "not requeue). Resubmit the same command to continue from the newest complete" \
         "checkpoint; set SHD_REQUEUE_ON_TERM=1 to requeue here instead." >&2
    return "$rc"
  fi
  echo "[job] stopped after a stop request (exit $rc): scontrol requeue $SLURM_JOB_ID" \
       "(restart count so far: ${SLURM_RESTART_COUNT:-0}); the next start continues from the" \
       "newest complete checkpoint" >&2
  if scontrol requeue "$SLURM_JOB_ID"; then
    return 0
  fi
  echo "[job] error: 'scontrol requeue $SLURM_JOB_ID' failed (the job needs --requeue and a" \
       "cluster that allows requeueing). The checkpoint is saved: resubmit the same command to" \
       "continue." >&2
  return "$rc"
}
