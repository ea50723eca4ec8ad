# Sourced by run_local.sh and test.sh: create or refresh .venv, then activate it.
# Idempotent: reinstalls only when pyproject.toml changed since the last successful install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3.11}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
    echo "error: Python >= 3.11 is required (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    exit 2
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.pipeline-installed"
WANT="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
        # torch's CUDA build alone is 5.5 GB: fail with the reason, not with pip's ENOSPC half-way through.
        free_kb="$(df -Pk "$VENV" | awk 'NR == 2 {print $4}')"
        if [ "${free_kb:-0}" -lt $((8 * 1024 * 1024)) ]; then
            echo "error: installing into $VENV needs about 8 GB free; $((free_kb / 1024)) MB are free there." >&2
            echo "       Free some disk (old clones' .venv folders, ~/.cache/pip) and run this again." >&2
            exit 2
        fi
    fi
    echo "[setup] installing the project and its pinned dependencies into .venv (first run: several minutes)"
    "$VENV/bin/python" -m pip install --upgrade --quiet pip
    "$VENV/bin/python" -m pip install --progress-bar off -e "$ROOT[dev]"
    echo "$WANT" > "$STAMP"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
