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
# Not after a SIGTERM to the batch shell: that is `scancel` (the user wants it stopped) or
# preemption, which Slurm requeues by itself when PreemptMode=REQUEUE; set
# SHD_REQUEUE_ON_TERM=1 on clusters whose preemption only cancels. Returns the job's exit code.
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
  if ((got_term)) && [[ "${SHD_REQUEUE_ON_TERM:-0}" != "1" ]]; then
    echo "[job] stopped by SIGTERM after saving a checkpoint (exit $rc): not requeued by this" \
         "script (scancel, or preemption that Slurm requeues itself). Resubmit the same command" \
         "to continue; set SHD_REQUEUE_ON_TERM=1 to requeue here instead." >&2
    return "$rc"
  fi
  echo "[job] checkpoint saved after a stop request (exit $rc): scontrol requeue $SLURM_JOB_ID" \
       "(restart count so far: ${SLURM_RESTART_COUNT:-0})" >&2
  if scontrol requeue "$SLURM_JOB_ID"; then
    return 0
  fi
  echo "[job] error: 'scontrol requeue $SLURM_JOB_ID' failed (the job needs --requeue and a" \
       "cluster that allows requeueing). The checkpoint is saved: resubmit the same command to" \
       "continue." >&2
  return "$rc"
}
