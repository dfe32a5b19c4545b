#!/usr/bin/env bash
# The project's test command (README): sets up everything from nothing, then runs pytest.
#   bash tests/run.sh [pytest args...]
# Creates .venv if missing, installs the CPU build of torch when no torch is importable and no
# NVIDIA GPU is present (never replaces an existing torch), installs the project with its dev
# extra, then runs the code checks and pytest (with arguments: pytest with those arguments only). A
# second run reuses everything.
set -euo pipefail
cd "$(dirname "$0")/.."
source launch/env_setup.sh
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
# Default (what CI runs): the code checks (lint, types, import rules), then every test except the
# long end-to-end runs marked slow. With arguments: pytest with those arguments only.
if [ $# -eq 0 ]; then
  bash tests/checks.sh
  set -- -m "not slow"
fi
exec python -m pytest "$@"
