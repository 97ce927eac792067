#!/bin/sh
# Start the team MLflow server: refuse unsafe credentials, then basic auth over Postgres + S3.
#   docker compose -f infra/mlflow/compose.yaml --env-file infra/mlflow/.env up -d
# Every setting comes from the environment (infra/mlflow/.env.example lists them).
set -eu
config="${MLFLOW_AUTH_CONFIG_OUT:-/tmp/mlflow/basic_auth.ini}"
python -m tuneloop.mlflow_auth --template "${MLFLOW_AUTH_TEMPLATE:-/etc/mlflow/basic_auth.ini}" --out "$config"
export MLFLOW_AUTH_CONFIG_PATH="$config"
# 0.0.0.0 inside the container only: compose publishes the port on the host's loopback.
# --serve-artifacts: clients upload and download through the server, so only it holds the
# object store's keys. No job runner: the flows run elsewhere (Prefect workers).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false
exec mlflow server --app-name basic-auth --host "${MLFLOW_HOST:-0.0.0.0}" --port "${MLFLOW_SERVER_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --serve-artifacts --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --allowed-hosts "$MLFLOW_SERVER_ALLOWED_HOSTS"
