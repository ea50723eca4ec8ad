#!/usr/bin/env bash
# The test command: sets up .venv if needed, checks lint, then runs every test (slow ones included).
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for the fast suite alone.
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
echo "[test] ruff check + format check"
ruff check .
ruff format --check .
echo "[test] pytest"
exec python -m pytest "$@"
