#!/usr/bin/env bash
# The main job on one machine: sets up .venv if needed, prepares MNIST, trains configs/mnist.yaml.
# Anything after `--` is passed on as config overrides, e.g. scripts/run_local.sh -- train.epochs=2
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"
overrides=(--set data.limit=10000 --set train.epochs=1)
if [ "${1:-}" = "--" ]; then
    shift
    for kv in "$@"; do overrides+=(--set "$kv"); done
elif [ $# -gt 0 ]; then
    echo "usage: scripts/run_local.sh [-- section.key=value ...]" >&2
    exit 2
fi
python -m pipeline data prepare --dataset mnist
exec python -m pipeline train --config configs/mnist.yaml "${overrides[@]}"
