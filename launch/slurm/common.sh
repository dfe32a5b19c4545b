# shellcheck shell=bash
# Shell functions shared by train.sbatch and prep.sbatch (sourced, not run). Kept apart so that
# tests/test_launch.py can exercise the requeue decision on its own.

# Print a command the way it would be typed (each word quoted as needed), on one line.
shd_print_cmd() {
  local line
  line="$(printf '%q ' "$@")"
  printf '%s\n' "${line% }"
}

# Set SHD_PREEMPTED to the preemption exit code, read from its single source, pipeline/runtime/faults.py.
# Slurm may signal every process of a step at any moment: the command substitution ignores
# USR1/TERM from its first command on (so do the python it runs), instead of dying of one and
# taking the script down with it.
shd_read_preempted_exit_code() {
  SHD_PREEMPTED="$(trap '' USR1 TERM
                   python -c 'from pipeline.runtime.faults import PREEMPTED_EXIT_CODE; print(PREEMPTED_EXIT_CODE)')" || {
    echo "error: cannot import pipeline.runtime.faults with '$(command -v python)': run from the repository" \
         "root with the project's environment (launch/env_setup.sh, or SHD_NO_VENV=1 with your own)" >&2
    return 2
  }
}

# Source launch/env_setup.sh (.venv and the project, installed once) unless SHD_ENV_SETUP=0. Its
# checks survive the SIGTERM Slurm sends every process of a job; an install it runs does not. A
# failed set-up returns its code with the reason said: after a SIGTERM (the caller's got_term is 1,
# read once the set-up has returned: scancel or preemption) that is the stop the user asked for,
# otherwise an error to fix.
shd_env_setup() {
  local rc=0
  [[ "${SHD_ENV_SETUP:-1}" == "0" ]] && return 0
  # shellcheck source=launch/env_setup.sh
  source launch/env_setup.sh || rc=$?
  ((rc == 0)) && return 0
  if [[ "${got_term:-0}" == 1 ]]; then
    echo "[setup] SIGTERM during launch/env_setup.sh, which stopped (exit $rc): nothing was" \
         "started, not requeued. After a scancel resubmit the same command (the set-up runs" \
         "again); a preemption that requeues starts the job again by itself." >&2
  else
    echo "error: launch/env_setup.sh failed (exit $rc): see the [setup] lines and pip's output" \
         "above; fix it and resubmit (or set SHD_ENV_SETUP=0 and provide the environment)." >&2
  fi
  return "$rc"
}

# Does process $1 have a handler for signal $2 (USR1, TERM)? Read from the caught-signals mask
# (SigCgt) of /proc/$1/status; without /proc, assume it does. A process that does not catch a
# signal yet dies of it (srun in its first ~0.1 s) or ignores it (a rank before its handler is
# installed), so the launch scripts forward a stop signal only to processes that catch it.
# Builtins only: no child process that a signal to the whole step could kill.
_shd_signum_USR1="$(kill -l USR1)" _shd_signum_TERM="$(kill -l TERM)"
shd_catches() {
  local key value mask="" num="_shd_signum_$2"
  [[ -r "/proc/$1/status" ]] || return 0
  while read -r key value; do
    if [[ "$key" == SigCgt: ]]; then mask="$value"; break; fi
  done 2>/dev/null <"/proc/$1/status"
  [[ -n "$mask" ]] && (( (16#$mask >> (${!num} - 1)) & 1 ))
}

# This job as scontrol names it: ARRAYJOB_TASK for an array task (its SLURM_JOB_ID may be the
# array's own id, and `scontrol requeue ARRAYJOB` requeues every task of the array), else JOBID.
shd_job_ref() {
  if [[ -n "${SLURM_ARRAY_JOB_ID:-}" && -n "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    echo "${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
  else
    echo "$SLURM_JOB_ID"
  fi
}

# Is Slurm itself requeueing this job (`scontrol requeue`, or preemption with
# PreemptMode=REQUEUE)? It then counts the restart at once: the controller's Restarts is above
# the SLURM_RESTART_COUNT this run started with. (A plain scancel leaves it equal.)
shd_slurm_requeues() {
  local restarts
  restarts="$(scontrol show job -o "$(shd_job_ref)" 2>/dev/null | sed -n 's/.* Restarts=\([0-9]*\).*/\1/p')"
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
# `scontrol requeue $(shd_job_ref)` when the step stopped after saving a checkpoint (code $2):
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
  echo "[job] stopped after a stop request (exit $rc): scontrol requeue $(shd_job_ref)" \
       "(restart count so far: ${SLURM_RESTART_COUNT:-0}); the next start continues from the" \
       "newest complete checkpoint" >&2
  if scontrol requeue "$(shd_job_ref)"; then
    return 0
  fi
  echo "[job] error: 'scontrol requeue $(shd_job_ref)' failed (the job needs --requeue and a" \
       "cluster that allows requeueing). The checkpoint is saved: resubmit the same command to" \
       "continue." >&2
  return "$rc"
}
