#!/usr/bin/env bash
# The one-command demo: distil a small LLaMA teacher into a smaller student three ways and compare.
#
#   bash launch/demo.sh                 # ~10-13 minutes on 2 CPU cores, no GPU, no download
#   bash launch/demo.sh --help
#
# From a fresh clone: sets up .venv (launch/env_setup.sh, as tests/run.sh does), then
#   1. trains a SentencePiece tokenizer on the embedded python-stdlib corpus and shards it
#      (runs/demo/data),
#   2. pre-trains a 4-layer, 8-head (2 kv heads) LLaMA teacher with the engine's pretrain stage
#      and exports it (runs/demo/teacher),
#   3. distils a 2-layer, 3-head student three ways with the same budget, seed and data order,
#      2 processes under DeepSpeed ZeRO-3: CE only; CE + logit KD; CE + KD + attention KD with
#      the default target (distill.plan=select: each student head distils one teacher head of its group)
#      (runs/demo/runs/<variant>/seed1234),
#   4. reports the held-out perplexity of each: runs/demo/summary.md (table), runs/demo/curves.png
#      (training loss and held-out perplexity against tokens), TensorBoard logs in runs/demo/tb.
# Every stage leaves a DONE marker: running the demo again reuses what is finished (an interrupted
# stage resumes from its newest checkpoint or starts over). --fresh deletes runs/demo first.
#
# Options (all but --fresh/--help are python -m pipeline.study's, which does the work):
#   --budget ci|demo|small|large   steps, vocabulary and evaluation size (default demo;
#                                  or DEMO_BUDGET=...). ci = a 2-3 minute smoke run
#   --steps N / --tokens N         student budget;   --teacher-steps N   teacher budget
#   --batch-tokens N               tokens per process per micro-batch (default 1024 = 8 x 128)
#   --seeds 3                      seeds 1..3 (paired) instead of the single seed 1234
#   --variants ce,kd,kd_select,kd_shd,kd_group,kd_mean,shd_only   other variants (kd_shd: the
#                                  paper's pairwise SHD)
#   --nproc N                      processes per run (default 2, or NPROC)
#   --corpus PATH...               your own text (files, directories, globs, .jsonl/.parquet,
#                                  datasets) instead of python-stdlib; --vocab N for its tokenizer
#   --teacher HF_DIR               your own LLaMA-family teacher (Hugging Face directory); the data
#                                  is tokenized with its tokenizer (or --tokenizer DIR); the student
#                                  keeps 3 heads (--student-heads N, N <= teacher heads)
#   --data SHARDS --tokenizer DIR  already prepared shards (data_prep.shard) and their tokenizer
#   --student-config / --teacher-config YAML   other model shapes (defaults configs/demo_*.yaml)
#   --override key=value           extra engine setting for every student (repeatable, each key once)
#   --out DIR                      output directory (default runs/demo)
#   --launcher CMD                 how a run is started (default 'bash launch/local.sh')
#   --dry-run                      check every run config, print the stages and commands,
#                                  run nothing
#   --fresh                        delete the output directory first
# Examples:
#   bash launch/demo.sh --budget ci --out runs/demo-ci         # smoke test
#   bash launch/demo.sh --steps 1000 --teacher-steps 2000 --seeds 3
#   bash launch/demo.sh --corpus ~/texts/ --vocab 8000 --out runs/mytexts
#   bash launch/demo.sh --teacher /models/TinyLlama --corpus data.jsonl --student-config my_student.yaml
# More: python -m pipeline.study --help (or python bench/distill_compare.py --help); sweeps and
# the analysis: docs/results.md.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

fresh=0
args=()
out="runs/demo"
while (($#)); do
  case "$1" in
    -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; exit 0 ;;
    --fresh) fresh=1; shift ;;
    --out) out="$2"; args+=("$1" "$2"); shift 2 ;;
    --out=*) out="${1#--out=}"; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done

t0=$(date +%s)
echo "[demo] setting up the environment (launch/env_setup.sh)" >&2
if [[ "${SHD_ENV_SETUP:-1}" != "0" ]]; then
  # shellcheck source=launch/env_setup.sh
  source "$root/launch/env_setup.sh"
fi
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  export DS_ACCELERATOR=cpu
fi
export PYTHONUNBUFFERED=1

if ((fresh)) && [[ -d "$out" ]]; then
  echo "[demo] --fresh: deleting $out" >&2
  rm -rf -- "$out"
fi

python -m pipeline.study --preset demo "${args[@]}"

for a in "${args[@]}"; do [[ "$a" == "--dry-run" ]] && exit 0; done
elapsed=$(( $(date +%s) - t0 ))
cat <<EOF

[demo] finished in $((elapsed / 60)) min $((elapsed % 60)) s. Results:
  table             $out/summary.md
  curves            $out/curves.png
  all numbers       $out/results.json
  runs (logs, metrics.jsonl, checkpoints)  $out/runs/<variant>/seed<N>/
  teacher           $out/teacher/export   (Hugging Face model; pre-training run in $out/teacher)
  data              $out/data/tokenizer, $out/data/shards
  TensorBoard       tensorboard --logdir $out/tb     (then open http://localhost:6006)

EOF
cat "$out/summary.md"
