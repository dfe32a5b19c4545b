#!/usr/bin/env bash
# The one-GPU check (bench/gpu_check.py; docs/gpu-check.md), from a bare GPU machine.
#
#   bash bench/gpu_check.sh --make-wheels     # here, where pip reaches PyPI: fills .whl/ for Python 3.12
#   bash bench/gpu_check.sh [gpu_check.py options]   # on the GPU machine (8 minutes at most)
#
# The GPU machine has torch and transformers but no DeepSpeed, hjson or pydantic and no network:
# when `import deepspeed` fails, the wheels in .whl/ are installed into /tmp/gpu_check_site (nothing
# else on the machine changes) and put on PYTHONPATH. Output goes to $OUT when set (the device tool
# brings back what is written there), else to bench/results/gpu_check; the setup's own output is in
# setup.log there, the check's in gpu_check.log, its table in summary.md.
# Exit status: gpu_check.py's (0 all passed, 1 a row failed), 2 when the setup cannot be done.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
py="${PYTHON:-python3}"
wheels="$root/.whl"

if [ "${1:-}" = "--make-wheels" ]; then
  # DeepSpeed has no wheel on PyPI: built from its sdist (pure Python, seconds). The rest are the
  # packages the GPU machine lacks, at the versions installed here (pydantic and pydantic-core pair).
  mkdir -p "$wheels"
  version() { "$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
  "$py" -m pip wheel -q --no-deps "deepspeed==$(version deepspeed)" -w "$wheels"
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$wheels" \
    "hjson==$(version hjson)" "pydantic==$(version pydantic)" "pydantic-core==$(version pydantic-core)" \
    "annotated-types==$(version annotated-types)" "typing-inspection==$(version typing-inspection)" \
    "typing-extensions==$(version typing-extensions)" "gguf==$(version gguf)"
  ls -1 "$wheels"
  echo "carry .whl to the GPU machine (the device tool: carry [\".whl\"]); it must stay out of git" >&2
  exit 0
fi

out="${OUT:-$root/bench/results/gpu_check}"
mkdir -p "$out"
setup_log="$out/setup.log"
(
  echo "=== setup $(date -u '+%Y-%m-%d %H:%M:%S') on $(hostname)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 || true
  if ! "$py" -c "import deepspeed, hjson, pydantic" 2>/dev/null; then
    if ! ls "$wheels"/*.whl >/dev/null 2>&1; then
      echo "error: DeepSpeed is not installed and $wheels holds no wheels: run 'bash bench/gpu_check.sh --make-wheels' where pip reaches PyPI, then carry .whl here"
      exit 2
    fi
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/gpu_check_site "$wheels"/*.whl || { echo "error: installing $wheels/*.whl failed"; exit 2; }
    echo "installed into /tmp/gpu_check_site: $(cd "$wheels" && ls *.whl | tr '\n' ' ')"
  fi
) >>"$setup_log" 2>&1 || { code=$?; cat "$setup_log"; exit "$code"; }
if [ -d /tmp/gpu_check_site ]; then
  export PYTHONPATH="/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$py" -c "import deepspeed, accelerate, transformers, sentencepiece, yaml, pipeline.train" >>"$setup_log" 2>&1; then
  cat "$setup_log"
  echo "error: the check's imports fail (see $setup_log above)" >&2
  exit 2
fi
cat "$setup_log"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "$py" bench/gpu_check.py --out "$out" "$@"
