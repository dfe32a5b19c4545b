#!/bin/bash
# Tokenize a corpus on many nodes: a Slurm job array of `data_prep.shard` tasks, then a merge job
# that starts only when every task has succeeded. Run it on the login node, from the repository
# root (it calls sbatch twice; it is not itself submitted):
#
#   bash launch/slurm/prep_array.sh --tasks 64 --parallel 16 --input /data/corpus/ --tokenizer runs/tok --out /data/shards
#   bash launch/slurm/prep_array.sh --dry-run --tasks 64 ...   (or DRY_RUN=1: print, submit nothing)
#
#   --tasks N      number of array tasks (--task-count N); each takes 1/N of the input bytes
#   --parallel K   at most K tasks run at once (default: N)
# The other arguments are those of `python -m data_prep.shard` (--out is required). Each array task
# is launch/slurm/prep.sbatch (its #SBATCH lines: one node, its CPUs as --workers, SIGUSR1 before
# the time limit -> requeue of that task, which resumes), run as
#   python -m data_prep.shard ARGS --task-count N --task-index $SLURM_ARRAY_TASK_ID --workers CPUS
# The merge job (`sbatch --dependency=afterok:ARRAY_JOB`) runs `python -m data_prep.shard merge --out OUT`.
# SBATCH_ARGS="--partition=cpu --account=x" is added to both submissions, MERGE_SBATCH_ARGS to the
# merge only (it asks for 1 CPU, 2 GB and 2 hours; e.g. MERGE_SBATCH_ARGS="--mem=500M").
# When sbatch refuses the merge job, the array is cancelled at once (its tasks would otherwise wait
# or run for a merge that never comes) and the message names it.
set -euo pipefail

usage="usage: bash launch/slurm/prep_array.sh [--dry-run] --tasks N [--parallel K] --input ... --tokenizer DIR --out DIR [data_prep.shard options]"
die() { echo "error: $*" >&2; exit 2; }

dry_run="${DRY_RUN:-0}" tasks="" parallel=""
while (($#)); do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --tasks) (($# >= 2)) || die "--tasks needs a value; $usage"; tasks="$2"; shift 2 ;;
    --parallel) (($# >= 2)) || die "--parallel needs a value; $usage"; parallel="$2"; shift 2 ;;
    *) break ;;
  esac
done
[[ "$tasks" =~ ^[1-9][0-9]*$ ]] || die "--tasks ${tasks:-(missing)}: give the number of array tasks, >= 1; $usage"
parallel="${parallel:-$tasks}"
[[ "$parallel" =~ ^[1-9][0-9]*$ ]] || die "--parallel $parallel: must be an integer >= 1"

out="" prev=""
for a in "$@"; do
  case "$a" in
    --task-index* | --task-count*) die "$a: set by this script (--tasks N, and the array index per task)" ;;
    --out=*) out="${a#--out=}" ;;
  esac
  [[ "$prev" == --out ]] && out="$a"
  prev="$a"
done
[[ -n "$out" ]] || die "--out is required (the merge job needs it); $usage"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# shellcheck source=launch/slurm/common.sh
source "$root/launch/slurm/common.sh"
cd "$root"

read -ra extra <<< "${SBATCH_ARGS:-}"
read -ra merge_extra <<< "${MERGE_SBATCH_ARGS:-}"
array=(sbatch --parsable "--array=0-$((tasks - 1))%$parallel" "${extra[@]}"
       launch/slurm/prep.sbatch "$@" --task-count "$tasks")
merge_cmd() {  # the merge submission, after array job $1
  merge=(sbatch --parsable "--dependency=afterok:$1" --job-name=shd-prep-merge --nodes=1 --cpus-per-task=1
         --mem=2G --time=02:00:00 "${extra[@]}" "${merge_extra[@]}" launch/slurm/prep.sbatch merge --out "$out")
}

if [[ "$dry_run" == "1" ]]; then
  echo "# dry run: nothing is submitted. The array ($tasks tasks, at most $parallel at once):"
  shd_print_cmd "${array[@]}"
  echo "# the merge job, once every task has succeeded:"
  merge_cmd ARRAY_JOB_ID
  shd_print_cmd "${merge[@]}"
  echo "# each array task runs (prep.sbatch adds --workers = the CPUs of its node):"
  for ((k = 0; k < tasks; k++)); do
    shd_print_cmd python -m data_prep.shard "$@" --task-count "$tasks" --task-index "$k"
  done
  exit 0
fi

array_id="$("${array[@]}")"
array_id="${array_id%%;*}"  # --parsable prints JOBID or JOBID;CLUSTER
[[ "$array_id" =~ ^[0-9]+$ ]] || die "sbatch did not return a job id for the array (got '$array_id')"
merge_cmd "$array_id"
if ! merge_id="$("${merge[@]}")"; then
  scancel "$array_id" || true
  die "sbatch refused the merge job (its message is above), so array job $array_id was cancelled" \
      "(scancel $array_id). Fix the merge's request (MERGE_SBATCH_ARGS for the merge only, e.g." \
      "MERGE_SBATCH_ARGS=\"--mem=500M\"; SBATCH_ARGS for both) and run this command again: tasks" \
      "that had started resume from their completed shards."
fi
merge_id="${merge_id%%;*}"
echo "submitted array job $array_id ($tasks tasks of data_prep.shard, at most $parallel at once) and merge job" \
     "$merge_id (runs when all tasks have succeeded)"
echo "if a task fails: fix the cause, resubmit it with the same arguments (it resumes), e.g. for tasks 3 and 7:"
shd_print_cmd sbatch --array=3,7 "${extra[@]}" launch/slurm/prep.sbatch "$@" --task-count "$tasks"
echo "then merge (the first merge job waits forever on a failed task: scancel $merge_id):"
shd_print_cmd python -m data_prep.shard merge --out "$out"
