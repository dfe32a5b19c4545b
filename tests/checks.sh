#!/usr/bin/env bash
# The code checks CI runs before the tests (configured in pyproject.toml; CONTRIBUTING.md):
# lint and import order, strict types on the layers others build on, the import rules of
# docs/architecture.md. Run from the project's environment (tests/run.sh activates it).
set -euo pipefail
cd "$(dirname "$0")/.."
echo "[checks] ruff" >&2
ruff check --quiet .
echo "[checks] mypy (strict: shd_common, pipeline/config, pipeline/shd)" >&2
mypy --no-error-summary shd_common pipeline/config pipeline/shd
echo "[checks] import rules (lint-imports)" >&2
lint-imports --no-cache >/dev/null || lint-imports --no-cache
