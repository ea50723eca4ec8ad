#!/usr/bin/env bash
# Starts a node of cluster.yaml's cluster; `ray up` runs it on every node (never run it on a machine that runs other
# Ray clusters: it starts Ray's processes, and cluster.yaml stops the node's earlier ones first).
#
#   cluster_node.sh head     the MLflow server (below), then Ray's head with the tracking URI and credentials
#   cluster_node.sh worker   Ray on a worker node, joining $RAY_HEAD_IP, with the tracking URI and credentials
#   cluster_node.sh mlflow   only the MLflow server: basic-auth, its stores off the head (a database and S3, so that
#                            `ray down` deletes no run), on the head's private address and on 127.0.0.1 (the SSH
#                            tunnel of `ray attach cluster.yaml -p 5000` reaches that one)
#
# Settings come from the file $GAN_ENV_FILE (default ~/gan-pipeline.env; cluster.yaml copies cluster/cluster.env
# there, made from cluster/env.example): NAME=value lines, read literally (nothing in a value is run or expanded).
# Worker nodes keep only the tracking credentials of it.
# For tests and other hosts: GAN_MLFLOW_HOST (the private address; default: the first of `hostname -I`),
# GAN_MLFLOW_PORT (5000), GAN_MLFLOW_HOME (~/mlflow: its log, pid and auth config).
set -euo pipefail

ENV_FILE="${GAN_ENV_FILE:-$HOME/gan-pipeline.env}"
PORT="${GAN_MLFLOW_PORT:-5000}"
HOME_DIR="${GAN_MLFLOW_HOME:-$HOME/mlflow}"

fail() { echo "error: $*" >&2; exit 2; }

[ -f "$ENV_FILE" ] || fail "$ENV_FILE is missing; make cluster/cluster.env from cluster/env.example (docs/clusters.md), then ray up again"
chmod 600 "$ENV_FILE"

load_settings() {  # each NAME=value line exported as it is written (one pair of surrounding quotes dropped)
    local line key value
    while IFS= read -r line || [ -n "$line" ]; do
        case "$line" in '' | '#'*) continue ;; esac
        key="${line%%=*}"
        value="${line#*=}"
        [[ "$line" == *=* && "$key" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] \
            || fail "$ENV_FILE: '${line:0:40}' is no NAME=value line"
        if [[ "$value" =~ ^\"(.*)\"$ || "$value" =~ ^\'(.*)\'$ ]]; then
            value="${BASH_REMATCH[1]}"
        fi
        export "$key=$value"
    done < "$ENV_FILE"
}
load_settings

need() {  # each named variable set, and not left as the example's placeholder
    for name in "$@"; do
        value="${!name:-}"
        [ -n "$value" ] || fail "$name is not set in $ENV_FILE (cluster/env.example says what it holds)"
        case "$value" in *CHANGE-ME*|*YOUR-*) fail "$name in $ENV_FILE still holds the example's placeholder" ;; esac
    done
}

stop_earlier_server() {  # a `ray up` run again: the server this script started before (its process group), then
    # nothing else may hold the port
    local pid
    pid="$(cat "$HOME_DIR/mlflow-server.pid" 2> /dev/null || true)"
    if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2> /dev/null; then
        kill -TERM -- "-$pid" 2> /dev/null || true
        for _ in $(seq 1 20); do kill -0 "$pid" 2> /dev/null || break; sleep 0.5; done
        kill -KILL -- "-$pid" 2> /dev/null || true
        echo "stopped the MLflow server this script started before (process group $pid)"
    fi
    if curl -s -o /dev/null "http://127.0.0.1:$PORT/health"; then
        fail "port $PORT answers already (a server this script did not start); stop it, or set GAN_MLFLOW_PORT"
    fi
}

private_address() { echo "${GAN_MLFLOW_HOST:-$(hostname -I | awk '{print $1}')}"; }

start_mlflow() {
    need MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD GAN_MLFLOW_BACKEND_STORE_URI GAN_MLFLOW_AUTH_DATABASE_URI \
        GAN_MLFLOW_ARTIFACTS
    mkdir -p "$HOME_DIR"
    chmod 700 "$HOME_DIR"
    # MLflow's basic-auth app: users and permissions in their own database; the first start makes the admin user
    # from MLFLOW_AUTH_ADMIN_USERNAME/_PASSWORD (the same credentials the nodes send). No anonymous access.
    # (configparser reads the file: a % of a percent-encoded password is written %%)
    cat > "$HOME_DIR/basic_auth.ini" <<EOF
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = ${GAN_MLFLOW_AUTH_DATABASE_URI//%/%%}
admin_username = $MLFLOW_TRACKING_USERNAME
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
EOF
    chmod 600 "$HOME_DIR/basic_auth.ini"
    # The auth app's CSRF key: made once on this head (a new one only ends open UI sessions).
    [ -s "$HOME_DIR/flask_secret" ] || (umask 077 && python3 -c 'import secrets; print(secrets.token_hex(32))' \
        > "$HOME_DIR/flask_secret")
    stop_earlier_server
    local host
    host="$(private_address)"
    # gunicorn listens on both addresses (uvicorn, MLflow's default, takes one); a process group of its own, whose
    # id is in mlflow-server.pid.
    # The Host headers it answers (its guard against DNS rebinding): the private address and the tunnel's end.
    MLFLOW_SERVER_ALLOWED_HOSTS="$host:$PORT,127.0.0.1:$PORT,localhost:$PORT" \
        MLFLOW_AUTH_CONFIG_PATH="$HOME_DIR/basic_auth.ini" MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$HOME_DIR/flask_secret")" \
        MLFLOW_AUTH_ADMIN_USERNAME="$MLFLOW_TRACKING_USERNAME" MLFLOW_AUTH_ADMIN_PASSWORD="$MLFLOW_TRACKING_PASSWORD" \
        MLFLOW_BACKEND_STORE_URI="$GAN_MLFLOW_BACKEND_STORE_URI" \
        setsid nohup mlflow server --app-name basic-auth \
        --artifacts-destination "$GAN_MLFLOW_ARTIFACTS" \
        --host "$host" --port "$PORT" --gunicorn-opts "--bind 127.0.0.1:$PORT" \
        > "$HOME_DIR/mlflow-server.log" 2>&1 < /dev/null &
    echo $! > "$HOME_DIR/mlflow-server.pid"
    for _ in $(seq 1 120); do
        if curl -sf "http://127.0.0.1:$PORT/health" > /dev/null; then
            echo "MLflow server on http://$host:$PORT (and 127.0.0.1:$PORT), basic-auth; log $HOME_DIR/mlflow-server.log"
            return 0
        fi
        kill -0 "$(cat "$HOME_DIR/mlflow-server.pid")" 2> /dev/null || break
        sleep 1
    done
    tail -n 20 "$HOME_DIR/mlflow-server.log" >&2
    fail "the MLflow server did not start; its log is above"
}

# What Ray's processes on a node get: the file's variables but the MLflow server's stores, and the tracking URI.
SERVER_ONLY=(-u GAN_MLFLOW_BACKEND_STORE_URI -u GAN_MLFLOW_AUTH_DATABASE_URI -u GAN_MLFLOW_ARTIFACTS)

case "${1:-}" in
    mlflow)
        start_mlflow
        ;;
    head)
        start_mlflow
        env "${SERVER_ONLY[@]}" MLFLOW_TRACKING_URI="http://$(private_address):$PORT" \
            ray start --head --port=6379 --object-manager-port=8076 \
            --autoscaling-config="$HOME/ray_bootstrap_config.yaml" --dashboard-host=127.0.0.1
        ;;
    worker)
        [ -n "${RAY_HEAD_IP:-}" ] || fail "RAY_HEAD_IP is not set (ray up sets it on worker nodes)"
        need MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD
        sed -i '/^GAN_MLFLOW_/d' "$ENV_FILE"  # a worker node keeps no database credentials on its disk
        env "${SERVER_ONLY[@]}" MLFLOW_TRACKING_URI="http://$RAY_HEAD_IP:$PORT" \
            ray start --address="$RAY_HEAD_IP:6379" --object-manager-port=8076
        ;;
    *)
        fail "usage: cluster_node.sh head|worker|mlflow"
        ;;
esac
