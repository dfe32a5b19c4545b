# Sourced by tests/run.sh and the launch scripts: creates and activates .venv and installs the
# project into it, doing nothing that is already done.
#   - no torch importable and no NVIDIA GPU: install the CPU build of torch first, so that the
#     project's plain "torch" requirement does not pull a multi-GB CUDA build;
#   - an existing torch (CPU or CUDA) is never replaced.
# Set SHD_NO_VENV=1 to use the current Python environment instead of .venv.
_shd_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_shd_torch_cpu_version="2.13.0"

if [ "${SHD_NO_VENV:-0}" != "1" ]; then
  if [ ! -x "$_shd_root/.venv/bin/python" ]; then
    echo "[setup] creating $_shd_root/.venv" >&2
    python3 -m venv "$_shd_root/.venv" || return
  fi
  # shellcheck disable=SC1091
  source "$_shd_root/.venv/bin/activate"
  # DeepSpeed's C++ ops are compiled against this venv's torch; a cache shared with other
  # environments gets rebuilt (50-140 s) whenever another venv builds into it.
  export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$_shd_root/.venv/torch_extensions}"
fi

# The checks ignore USR1/TERM (as do the python they run): Slurm signals every process of a job
# (a scancel or preemption during start-up), and a check killed by it would read as "not
# installed" and start a long install. The batch script that trapped the signal goes on to its own
# stop handling. A failed install returns non-zero to the caller (`source ... || ...`).
_shd_imports() { (trap '' USR1 TERM; python -c "import $1") >/dev/null 2>&1; }
if ! _shd_imports torch; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] NVIDIA GPU found and no torch installed: the project's requirement will install a CUDA build" >&2
  else
    echo "[setup] no torch and no NVIDIA GPU: installing the CPU build torch==$_shd_torch_cpu_version" >&2
    python -m pip install --quiet --disable-pip-version-check "torch==$_shd_torch_cpu_version" || return
  fi
fi

# Reinstall the project only when pyproject.toml changed since the last install (pip would
# otherwise re-resolve every dependency on each run, which costs ~20 s offline-ish).
_shd_stamp="$_shd_root/.venv/.shd-installed"
[ "${SHD_NO_VENV:-0}" = "1" ] && _shd_stamp="$_shd_root/.shd-installed"
_shd_hash="$(trap '' USR1 TERM; sha256sum "$_shd_root/pyproject.toml" | cut -d' ' -f1)"
_shd_installed=""
[ -f "$_shd_stamp" ] && read -r _shd_installed < "$_shd_stamp"
if [ "$_shd_installed" != "$_shd_hash" ] \
   || ! _shd_imports "pipeline, data_prep, deepspeed, transformers"; then
  echo "[setup] installing the project and its dependencies (pip install -e '.[dev]')" >&2
  python -m pip install --quiet --disable-pip-version-check -e "$_shd_root[dev]" || return
  echo "$_shd_hash" > "$_shd_stamp"
fi
unset _shd_root _shd_torch_cpu_version _shd_stamp _shd_hash _shd_installed
unset -f _shd_imports
