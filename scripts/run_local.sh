#!/usr/bin/env bash
# The main job on one machine: sets up .venv if needed, prepares MNIST, runs the local sweep
# (configs/local.yaml) on a fresh local Ray, and records everything in <project>/mlflow.db.
#
#   scripts/run_local.sh [--ui] [--name NAME] [-- section.key=value ...]
#
#   --ui         also start the MLflow UI on http://127.0.0.1:5000 when the sweep is done (Ctrl-C stops it)
#   --name NAME  sweep name (default: mnist-sweep-<date>-<time>); a sweep interrupted earlier resumes
#                with: scripts/run_local.sh --name NAME --resume
#   -- k=v ...   config overrides, e.g. -- train.epochs=1 tune.num_samples=2
set -euo pipefail
source "$(dirname "$0")/_venv.sh"
cd "$ROOT"

ui=0
args=()
overrides=()
while [ $# -gt 0 ]; do
    case "$1" in
        --ui) ui=1; shift ;;
        --name) args+=(--name "$2"); shift 2 ;;
        --resume) args+=(--resume); shift ;;
        --) shift; for kv in "$@"; do overrides+=(--set "$kv"); done; break ;;
        -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
        *) echo "error: unknown option $1; usage: scripts/run_local.sh [--ui] [--name NAME [--resume]] [-- key=value ...]" >&2; exit 2 ;;
    esac
done

export PYTHONUNBUFFERED=1
store="$ROOT/mlflow.db"
echo "[run_local] MLflow store: sqlite:///$store"
python -m pipeline data prepare --dataset mnist
python -m pipeline tune --config configs/local.yaml --set "tracking.uri=sqlite:///$store" \
    ${args[@]+"${args[@]}"} ${overrides[@]+"${overrides[@]}"}
if [ "$ui" = 1 ]; then
    echo "[run_local] MLflow UI on http://127.0.0.1:5000: open the link above (Ctrl-C to stop)"
    exec mlflow ui --backend-store-uri "sqlite:///$store" --host 127.0.0.1 --port 5000
fi
